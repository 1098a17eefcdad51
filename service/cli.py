"""The ``robustdiff`` command line.

Each subcommand lives in its own module, imported only when that subcommand runs, so that
``robustdiff serve`` never imports the training code and ``robustdiff --help`` starts at once.
A subcommand module provides ``add_arguments(parser, command)`` and ``run(args) -> int``; a
``models.errors.UserError`` it raises is printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from models.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.train.cli", "train a diffusion or consistency model"),
    "export": ("models.train.export", "write the served safetensors file from a training checkpoint"),
    "import-diffusers": (
        "models.import_command",
        "convert a diffusers DDPM or consistency-model folder into a served checkpoint",
    ),
    "serve": ("service.serve", "run the HTTP API (and, by default, a private Redis and one worker)"),
    "worker": ("service.worker", "run a worker process that executes queued jobs"),
    "sample": ("models.commands", "sample a PNG grid or .npy from a checkpoint, without the server"),
    "purify": ("models.commands", "purify images from files with a checkpoint, without the server"),
    "eval": ("models.evaluation.cli", "evaluate quality, robustness and corruption removal"),
    "bench": ("models.bench_cli", "run a benchmark from bench/"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: the reason and where to look, not the usage block
    (which for some commands is 17 lines that bury the one that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustdiff",
        description="Serve, train and evaluate adversarially trained diffusion and consistency models.",
        epilog="\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=sorted(COMMANDS), metavar="command", help="one of the commands below"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        _top_parser().parse_args(args[:1] or ["--help"])
        return 2
    name, rest = args[0], args[1:]
    module_name, text = COMMANDS[name]
    if name == "worker":  # before the module imports torch: OpenMP reads these once
        from service.threads import set_thread_env

        set_thread_env()
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"robustdiff {name}", description=text)
    module.add_arguments(parser, name)
    parsed = parser.parse_args(rest)
    parsed.command = name
    try:
        return int(module.run(parsed) or 0)
    except (UserError, OSError) as err:  # OSError: a file that vanished or could not be written
        print(f"robustdiff {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
