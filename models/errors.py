"""User-facing errors: bad configs, paths and files. Carry the offending field so messages can name it."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the CLI prints it as one line and exits non-zero, with no traceback."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated, or whose header or tensors do not match."""
