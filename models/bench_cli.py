"""``robustdiff bench NAME [ARGS...]``: run one of the scripts in the repository's bench/ folder.

The benchmarks are plain scripts (each with its own --help) so they can be run without the CLI
too; this subcommand only finds and runs them with the installed package. Files whose names start
with ``_`` are helpers the scripts import, not benchmarks.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import NoReturn

from models.errors import UserError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


class BenchParser(argparse.ArgumentParser):
    """argparse for the bench scripts with the project's one-line errors (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def benchmarks() -> list[str]:
    """The runnable scripts in bench/ (helpers starting with ``_`` left out)."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "name", help="benchmark script in bench/: " + (", ".join(benchmarks()) or "(none found)")
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    if args.name not in benchmarks():
        raise UserError(
            "name", f"no benchmark {args.name!r} in {BENCH_DIR}; known: {', '.join(benchmarks())}"
        )
    script = BENCH_DIR / f"{args.name}.py"
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        if isinstance(done.code, str):  # sys.exit("message"): the script's one-line refusal
            message = " ".join(done.code.split()).removeprefix(f"{args.name}: ")
            print(f"robustdiff bench {args.name}: error: {message}", file=sys.stderr)
            return 2
        return int(done.code or 0)
    return 0
