"""``robustdiff eval {quality,robust,corruption,compare,compare-quality,train-classifier}``: JSON + PNG, with progress bars.

Argument checks run before any model is loaded or any image is generated, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from typing import TYPE_CHECKING

from models.errors import UserError

if TYPE_CHECKING:  # the classifier module imports torch; argument checks stay light
    from models.evaluation.classifier import ClassifierConfig

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quality": ("models.evaluation.quality", "Frechet distance and precision/recall of generated samples"),
    "robust": ("models.evaluation.robust", "accuracy of the classifier behind the purifier under attacks"),
    "corruption": (
        "models.evaluation.corruption",
        "PSNR, SSIM and accuracy before/after purifying noisy images",
    ),
    "compare": (
        "models.evaluation.compare",
        "two robust reports on the same images, paired: accuracy difference, its CI, McNemar p",
    ),
    "compare-quality": (
        "models.evaluation.compare_quality",
        "two arms of quality reports, one per training seed, paired: FD/KID means, paired difference, sign-flip p",
    ),
    "train-classifier": (
        "models.evaluation.train",
        "train the Fashion-MNIST classifier (judge and FD features)",
    ),
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
    """'5,10,20' -> [5, 10, 20], with a message that names the option on a bad or empty item."""
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise UserError(field, "must not be empty")
    if not all(parts):
        raise UserError(field, f"an empty item in {text!r}; give values separated by single commas")
    try:
        return [kind(v) for v in parts]
    except ValueError as err:
        raise UserError(field, f"expected a comma-separated list of {kind.__name__}, got {text!r}") from err


def check_classifier_fits(classifier_path: str, image_shape: tuple[int, int, int]) -> None:
    """The classifier must take the images the model makes (a header-only check)."""
    from models.evaluation.classifier import read_classifier_header

    check_classifier_fits_config(read_classifier_header(classifier_path).model, image_shape)


def check_classifier_fits_config(cls: ClassifierConfig, image_shape: tuple[int, int, int]) -> None:
    """The same check on the architecture of a classifier not yet trained."""
    cls_shape = (cls.in_channels, cls.image_size, cls.image_size)
    check(
        cls_shape == image_shape,
        "classifier",
        f"expects images {'x'.join(map(str, cls_shape))}, the model makes {'x'.join(map(str, image_shape))}",
    )


def check_purifier(model_path: str, sampler: str | None, steps: int, t_stars: list[float]) -> str:
    """Header-only checks of a purifier setting: unconditional model, sampler, steps below t*.

    Returns the sampler: ``sampler``, or when None the model's own (consistency for a CM, else ddim).
    """
    from models.checkpoint import read_header
    from models.sampling_spec import check_sampler, default_sampler, steps_that_fit
    from models.schedules import Schedule

    header = read_header(model_path)
    check(
        header.model.num_classes == 0,
        "model",
        "purification needs an unconditional model (labels are unknown)",
    )
    if sampler is None:
        sampler = default_sampler(header.kind)
    check_sampler(sampler, header.kind, header.name)
    check(steps >= 1, "steps", "must be >= 1")
    T = Schedule(header.schedule).T
    for t in t_stars:
        check(1.0 / T <= t <= 1.0, "t-star", f"must be in [{1.0 / T}, 1], got {t}")
        fit = steps_that_fit(sampler, t, T)
        if fit is not None:
            check(steps <= fit, "steps", f"at most {fit} steps fit below t*={t}")
    return sampler
