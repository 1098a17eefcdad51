"""``robustdiff import-diffusers FOLDER --out NAME.safetensors``: a diffusers folder as a served checkpoint.

Prints what it read (the UNet config, the schedule, the prediction type, the kind, the parameter
count) so a user sees what will be served before serving it. Offline: it may read ``.bin``
weights (``torch.load(weights_only=True)``); the written file is safetensors with its header.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.paths import output_file


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("folder", type=Path, help="diffusers pipeline or UNet2DModel folder")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--name", default=None, help="served model name (default: the folder's name)")
    parser.add_argument(
        "--schedule",
        default=None,
        help="linear | cosine | scaled-linear | a scheduler_config.json: the noise schedule of a folder "
        "without one (or to override it)",
    )


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import save_checkpoint
    from models.diffusers_import import import_diffusers

    out = output_file(args.out, "--out", [".safetensors"])
    imported = import_diffusers(args.folder, args.name, args.schedule, allow_pickle=True)
    header = save_checkpoint(out, imported.net, imported.header)
    print(imported.summary())
    print(f"wrote {out} (model {header.name!r}, content hash {header.content_hash[:12]})")
    return 0
