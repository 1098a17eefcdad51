"""``robustdiff bench NAME [ARGS...]``: run one of the scripts in the repository's bench/ folder.

The benchmarks are plain scripts (each with its own --help) so they can be run without the CLI
too; this subcommand only finds and runs them with the installed package.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from models.errors import UserError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    names = sorted(p.stem for p in BENCH_DIR.glob("*.py")) if BENCH_DIR.is_dir() else []
    parser.add_argument("name", help="benchmark script in bench/: " + (", ".join(names) or "(none found)"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        raise UserError("name", f"no benchmark {args.name!r} in {BENCH_DIR}")
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    return 0
