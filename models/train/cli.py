"""``robustdiff train``: a config file (TOML or YAML) plus ``--set key=value`` overrides.

The convenience flags (``--method``, ``--updates``, ...) are spelled-out ``--set`` overrides. The
whole config is validated before any data is read; a mistake exits with one line naming the field.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from models.errors import UserError
from models.paths import output_dir, output_file
from models.train import state as ckpt
from models.train.config import RESUMABLE, TrainConfig, apply_override, build, load_config

FLAGS = {
    "name": "name",
    "method": "method",
    "preset": "preset",
    "dataset": "data.name",
    "data_path": "data.path",
    "updates": "updates",
    "batch_size": "batch_size",
    "out_dir": "out_dir",
    "export": "export_path",
    "max_minutes": "max_minutes",
    "seed": "seed",
    "device": "device",
    "threads": "num_threads",
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="TOML (.toml) or YAML (.yaml/.yml) config file; required unless --resume or --options",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, dotted for sections: options.eta=0.05, data.corruption.kind=gaussian",
    )
    parser.add_argument("--resume", metavar="PATH", help="continue a run folder or checkpoints/step-*.json")
    parser.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from a served/exported .safetensors model's weights (same network and kind; "
        "EMA re-initialised from them, fresh optimizer)",
    )
    parser.add_argument(
        "--options",
        metavar="METHOD",
        help="print the [options] a method takes (type, default, meaning) as Markdown and exit; 'all' for every method",
    )
    for dest, key in FLAGS.items():
        parser.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, metavar="VALUE", help=f"same as --set {key}=VALUE"
        )
    parser.add_argument(
        "--force", action="store_true", help="let --export replace an existing file (e.g. a served model)"
    )


def overrides(args: argparse.Namespace) -> list[str]:
    out = [
        f"{key}={getattr(args, dest)}" for dest, key in FLAGS.items() if getattr(args, dest, None) is not None
    ]
    return out + list(args.overrides)


def resume_config(path: str, sets: list[str]) -> TrainConfig:
    """The checkpoint's own config, with overrides only of the fields a resumed run may change."""
    meta, _ = ckpt.load(path, "--resume")
    data = meta["config"]
    for s in sets:
        key = apply_override(data, s)
        if key.split(".")[0] not in RESUMABLE:
            raise UserError(
                key, f"cannot be changed when resuming (resumable: {', '.join(sorted(RESUMABLE))})"
            )
    return build(data)


def check_outputs(cfg: TrainConfig, force: bool = False) -> None:
    """The run folder and the served file are checked before training: failing after it loses the run.
    A run writes under --out-dir only; a file elsewhere only with --export, and never over an existing
    one (the committed served weights) without --force."""
    out_dir = output_dir(cfg.out_dir, "--out-dir")
    if cfg.export_path is not None:
        path = output_file(cfg.export_path, "--export", [".safetensors"])
        if path.exists() and not force:
            raise UserError("--export", f"{path} exists; add --force to replace it")
    else:  # the default served file, inside the run folder
        output_file(out_dir / f"{cfg.name}.safetensors", "--out-dir")


def command_line(args: argparse.Namespace) -> str:
    """An equivalent command line, recorded in the checkpoint header."""
    parts = ["robustdiff", "train"]
    if args.config:
        parts.append(args.config)
    if args.resume:
        parts += ["--resume", args.resume]
    if args.init:
        parts += ["--init", args.init]
    for s in overrides(args):
        parts += ["--set", s]
    return shlex.join(parts)


def _type_name(annotation: Any) -> str:
    """A field's type as a reader would write it: Literal values spelled out, Optional as '| None'."""
    if get_origin(annotation) is Literal:
        return " \\| ".join(str(v) for v in get_args(annotation))
    if get_args(annotation):
        return " \\| ".join(_type_name(a) for a in get_args(annotation))
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def options_markdown(method: str) -> str:
    """Every ``[options]`` field of a method (or of all, for 'all') with its type, default and meaning."""
    from models.train.methods import METHODS

    names = sorted(METHODS) if method == "all" else [method]
    if method != "all" and method not in METHODS:
        raise UserError("options", f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}, all")
    parts = []
    for name in names:
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines = [f"## `{name}`", "", doc, ""]
        fields = cls.Options.model_fields
        if fields:
            lines += ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
            for key, f in fields.items():
                default = "required" if f.is_required() else f"`{f.default!r}`"
                meaning = (f.description or "").replace("|", "\\|")
                lines.append(f"| `{f.alias or key}` | {_type_name(f.annotation)} | {default} | {meaning} |")
        else:
            lines.append("No options.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.options:
        print(options_markdown(args.options), end="")
        return 0
    sets = overrides(args)
    if args.resume:
        if args.config:
            raise UserError("config", "give either a config file or --resume, not both")
        if args.init:
            raise UserError("--init", "a resumed run continues its own weights; give --init or --resume")
        cfg = resume_config(args.resume, sets)
    elif not args.config:  # README: `robustdiff train CONFIG`; no silent 1000-update default run into ./runs
        raise UserError("config", "give a config file (TOML or YAML), or --resume RUN_DIR")
    else:
        cfg = load_config(args.config, sets)
    if args.init and not Path(args.init).is_file():  # before any data is read
        raise UserError("--init", f"no checkpoint file at {args.init}")
    check_outputs(cfg, force=args.force)
    from models.train.trainer import train

    result = train(cfg, command=command_line(args), resume=args.resume, init=args.init)
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.5f}"
    stop = " (stopped early)" if result.stopped_early else ""
    print(
        f"trained {result.updates} updates in {result.wall_s:.0f} s{stop}; final loss {loss}; served file {result.export}"
    )
    return 0
