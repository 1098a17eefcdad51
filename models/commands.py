"""``robustdiff sample`` and ``robustdiff purify``: the library calls from the shell, no server.

Both show a progress bar over the sampler steps, write a PNG grid (and optionally a .npy array),
and refuse bad arguments with a one-line message before any work starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from models.devices import device_option
from models.errors import CheckpointError, UserError
from models.grid import GRID_SUFFIXES, save_grid
from models.paths import output_file
from models.sampling_spec import DDIM_EPS, DIFFUSERS_SPACINGS, SAMPLERS, default_sampler

if TYPE_CHECKING:
    from models.pipeline import Pipeline

MULTI_COMMAND = True


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint (.safetensors) to use, or the name of a served model (see GET /models: "
        "the models in ROBUSTDIFF_MODELS, by default the committed models/weights)",
    )
    parser.add_argument("--sampler", default=None, help=f"{' | '.join(SAMPLERS)} (default: the model's)")
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: 10, or 1 for consistency models)"
    )
    parser.add_argument(
        "--times",
        type=_times_option,
        default=None,
        help="comma-separated decreasing times where the network is evaluated again after the start "
        "(t = 1, or t*), e.g. 0.6,0.3: the CM re-noising times; replaces the sampler's spacing, "
        "NFE = count + 1 ('' is one step)",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: image i uses seed + i")
    parser.add_argument("--device", default="auto", type=device_option, help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--out", type=Path, required=True, help=f"output PNG grid ({', '.join(GRID_SUFFIXES)})"
    )
    parser.add_argument(
        "--npy", type=Path, default=None, help="also write the images as a .npy array in [-1, 1]"
    )
    parser.add_argument(
        "--ddim-eps",
        choices=DDIM_EPS,
        default="from-x0",
        help="ddim after x0 clipping: step along the eps of the clipped x0 (ours, diffusers' "
        "use_clipped_model_output=True) or the network's eps (diffusers' default)",
    )
    if command == "sample":
        parser.add_argument("-n", "--num-images", type=int, default=16)
        parser.add_argument(
            "--labels", type=int, nargs="*", default=None, help="class labels (conditional models)"
        )
        parser.add_argument(
            "--spacing",
            choices=DIFFUSERS_SPACINGS,
            default=None,
            help="diffusers' timestep spacing instead of ours, to reproduce a diffusers run (docs/IMPORTING.md)",
        )
    else:
        parser.add_argument(
            "inputs", nargs="+", type=Path, help="PNG/JPEG files, or .npy arrays [N, C, H, W] in [-1, 1]"
        )
        parser.add_argument(
            "--resize",
            action="store_true",
            help="convert images whose channels or size differ from the model's (as resize: true over "
            "HTTP); without it they are refused",
        )
        parser.add_argument(
            "--t-star", type=float, default=0.1, help="diffusion time to noise the inputs to, in (0, 1]"
        )


def _times_option(text: str) -> list[float]:
    """argparse ``type=`` for ``--times``: "0.6,0.3" -> [0.6, 0.3]; the range is checked with the grid."""
    try:
        return [float(part) for part in text.split(",")] if text.strip() else []
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers, e.g. 0.6,0.3") from err


@contextmanager
def _as_user_error() -> Iterator[None]:
    """The library's UserErrors (and "field: reason" ValueErrors) as the CLI's one-line
    "--field: reason" errors: the library names its arguments, the CLI its options."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, UserError):
            field, reason = err.field, err.reason
        else:
            field, _, reason = str(err).partition(": ")
        raise UserError(
            f"--{field.replace('_', '-')}" if reason else "arguments", reason or str(err)
        ) from err


def _read_inputs(paths: list[Path], shape: tuple[int, int, int], resize: bool) -> torch.Tensor:
    """The inputs decoded and fitted to the model by the HTTP API's own functions (service.images,
    numpy and Pillow only), so a file the server refuses is refused here with the same reason."""
    from service import images

    arrays: list[np.ndarray] = []
    for p in paths:
        if not p.is_file():
            raise UserError("inputs", f"{p} does not exist")
        try:  # .npy files hold [-1, 1] values here (the README's and --npy's convention)
            for d in images.decode(p.read_bytes(), str(p), "-1,1"):
                arrays.append(images.fit(d, shape, str(p), resize, hint="use --resize to convert it"))
        except images.ImageError as err:
            raise UserError("inputs", str(err)) from None
    return torch.from_numpy(np.stack(arrays))


def _check_outputs(args: argparse.Namespace) -> None:
    """Both output files are checked before the model loads: a bad --npy must not leave the grid behind."""
    args.out = output_file(args.out, "--out", GRID_SUFFIXES)
    if args.npy is not None:
        args.npy = output_file(args.npy, "--npy", [".npy"])
        if args.npy.resolve() == args.out.resolve():
            raise UserError("--npy", f"{args.npy} is also the --out file")


def resolve_model(model: str) -> str:
    """``--model``: a checkpoint file, or else the name of a model the service serves (its
    ROBUSTDIFF_MODELS, by default the committed weights), so that the names GET /models lists work
    here too. Anything that looks like a path stays a path, for the missing-file message."""
    if Path(model).is_file() or "/" in model or model.endswith(".safetensors"):
        return model
    from service.settings import load_settings

    served = load_settings().served_paths()
    if model not in served:
        raise UserError(
            "--model",
            f"{model!r} is neither a checkpoint file nor a served model ({', '.join(sorted(served))})",
        )
    return str(served[model])


def _load(path: str, device: str) -> Pipeline:
    """The --model checkpoint; its errors (missing, a classifier, a bad header) name --model."""
    from models.pipeline import Pipeline

    path = resolve_model(path)
    try:
        return Pipeline.from_checkpoint(path, device)
    except CheckpointError as err:
        raise UserError("--model", err.reason if str(path) in err.reason else f"{path}: {err}") from err


def run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    pipe = _load(args.model, args.device)
    sampler = args.sampler or default_sampler(pipe.info.kind)
    steps = pipe.info.default_steps if args.steps is None and args.times is None else args.steps
    if args.seed < 0:
        raise UserError("--seed", "must be >= 0")
    if args.command == "sample":
        if args.num_images < 1:
            raise UserError("--num-images", "must be >= 1")
        seeds = [args.seed + i for i in range(args.num_images)]
    else:
        inputs = _read_inputs(args.inputs, pipe.info.image_shape, args.resize)
        seeds = [args.seed + i for i in range(inputs.shape[0])]
    t_star = args.t_star if args.command == "purify" else None
    with _as_user_error():  # refuse before the progress bar appears
        grid = pipe.grid(
            sampler,
            steps=steps,
            times=args.times,
            eta=args.eta,
            t_star=t_star,
            spacing=getattr(args, "spacing", None),
            ddim_eps=args.ddim_eps,
        )
        nfe = len(grid) - 1
    bar = tqdm(total=nfe, desc=f"{args.command} ({sampler}, {nfe} steps)", unit="step")

    def progress(i: int, n: int) -> None:
        bar.update(1)

    common = {
        "sampler": sampler,
        "steps": steps,
        "times": args.times,
        "eta": args.eta,
        "callback": progress,
        "ddim_eps": args.ddim_eps,
    }
    try:
        with _as_user_error():
            if args.command == "sample":
                images = pipe.sample(seeds, labels=args.labels, spacing=args.spacing, **common)
            else:
                images = pipe.purify(inputs, seeds, t_star=args.t_star, **common)
    finally:
        bar.close()
    save_grid(images, args.out)
    if args.npy is not None:
        args.npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.npy, images.numpy())
    print(f"wrote {args.out}" + (f" and {args.npy}" if args.npy else ""))
    return 0
