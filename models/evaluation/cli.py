"""``robustdiff eval {quality,robust,corruption,train-classifier}``: each writes JSON (+ PNG) and shows progress.

Argument checks run before any model is loaded or any image is generated, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from models.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quality": ("models.evaluation.quality", "Frechet distance and precision/recall of generated samples"),
    "robust": ("models.evaluation.robust", "accuracy of the classifier behind the purifier under attacks"),
    "corruption": ("models.evaluation.corruption", "PSNR, SSIM and accuracy before/after purifying noisy images"),
    "train-classifier": ("models.evaluation.train", "train the Fashion-MNIST classifier (judge and FD features)"),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module_name, text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module_name = SUBCOMMANDS[args.eval_command][0]
    args.command_line = shlex.join(["robustdiff", *sys.argv[1:]])
    return int(importlib.import_module(module_name).run(args) or 0)


def check(condition: bool, field: str, reason: str) -> None:
    """Raise the one-line user error unless ``condition`` holds."""
    if not condition:
        raise UserError(field, reason)


def parse_list(text: str, kind: type, field: str) -> list:
    """'5,10,20' -> [5, 10, 20], with a message that names the option on a bad item."""
    try:
        items = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(field, f"expected a comma-separated list of {kind.__name__}, got {text!r}") from err
    if not items:
        raise UserError(field, "must not be empty")
    return items
