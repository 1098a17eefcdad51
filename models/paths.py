"""Output paths checked before the work that fills them, so a typo costs a message, not a run.

A command that trains for an hour and then cannot write its file has wasted the hour; these checks
run when the arguments are read and raise a ``UserError`` naming the option.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from models.errors import UserError


def _creatable_dir(path: Path, field: str) -> None:
    """``path`` is a directory we can write into, or can be created (nearest existing parent writable)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(field, f"{path}: {probe} is a file, not a folder")
    try:  # the one honest test of writability (permissions, read-only or virtual file systems)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UserError(field, f"{path}: cannot write in {probe} ({err.strerror or err})") from None


def output_file(path: str | Path, field: str, suffixes: Iterable[str] | None = None) -> Path:
    """A file the command will write: not a folder, with a known suffix, in a writable folder."""
    out = Path(path)
    allowed = [s.lower() for s in suffixes] if suffixes is not None else None
    if allowed is not None and out.suffix.lower() not in allowed:
        raise UserError(field, f"{out}: the file name must end in {' or '.join(allowed)}")
    if out.is_dir() or str(path).endswith(os.sep):
        raise UserError(field, f"{out} is a folder; give a file name")
    _creatable_dir(out.parent, field)
    return out


def output_dir(path: str | Path, field: str) -> Path:
    """A folder the command will create (or reuse) and write into: not an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(field, f"{out} is a file, not a folder")
    _creatable_dir(out, field)
    return out
