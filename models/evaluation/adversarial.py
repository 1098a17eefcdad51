"""Adversarial examples on disk: one folder per attack setting, one safetensors file per batch.

A full-protocol attack (>= 100 PGD steps, EOT 8, n >= 500) through a purifier runs for hours on a
CPU and can outlast the time a shared GPU is available. Batches are deterministic given their first image
index (random start and EOT noise are seeded by it), so:

- an attack that stops part way continues from its finished batches when the same command runs
  again, and ends with the images an uninterrupted run would have found, bit for bit;
- several processes running the same command on the same folder (one per GPU, or one 1-thread
  process per CPU core) share the work: a process claims a batch by creating its claim file
  exclusively, and waits at the end for the batches others hold (a helper may leave instead, and
  free its GPU). A claim whose process died (same host, pid gone) or that has not been refreshed for
  ``stale_s`` is taken over; at worst a batch is attacked twice, with the same result, since every
  file is written whole and then renamed.

The files are also the attack's output: the clean images and their adversarial versions at every
recorded step count, for inspection or reuse. An attack stored by an earlier version as one file
(``<folder>.safetensors``) is split into batch files when it is opened, so hours of attack are not
redone after an upgrade.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.errors import UserError

STALE_S = 900.0  # default: a claim unrefreshed this long is abandoned (refreshed after every PGD step)
POLL_S = 1.0  # how often a process waiting on others' batches looks again


def batch_slices(n: int, size: int) -> list[slice]:
    """Consecutive batches of ``size`` over n images (the last may be short): the unit of seeding."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass(frozen=True)
class StoredBatch:
    """One finished batch as read from (or written to) its file."""

    clean: torch.Tensor
    advs: dict[int, torch.Tensor]
    grad: dict[str, Any]
    wall_s: float


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class AdversarialStore:
    """The batches of one attack setting; a stored batch is reused only if ``settings`` match."""

    def __init__(
        self, folder: Path, settings: dict[str, Any], batch: int, *, stale_s: float = STALE_S
    ) -> None:
        self.folder, self.settings, self.batch, self.stale_s = folder, settings, batch, stale_s
        self.steps: list[int] = list(settings["attack_steps"])
        self.x: torch.Tensor | None = None
        self._done: dict[int, StoredBatch] = {}
        self._token = uuid.uuid4().hex

    # -- layout ---------------------------------------------------------------------------------
    def _file(self, start: int) -> Path:
        return self.folder / f"{start:06d}.safetensors"

    def _claim_file(self, start: int) -> Path:
        return self.folder / f"{start:06d}.claim"

    def batches(self) -> list[slice]:
        assert self.x is not None, "open(x) first"
        return batch_slices(self.x.shape[0], self.batch)

    # -- reading --------------------------------------------------------------------------------
    def _read(self, sl: slice) -> StoredBatch | None:
        """The finished batch at ``sl``, or None if it is absent or shorter (a smaller n's last batch)."""
        assert self.x is not None
        path = self._file(sl.start)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = json.loads(meta.get("settings", "{}"))
            changed = sorted(k for k in {*stored, *self.settings} if stored.get(k) != self.settings.get(k))
            if changed:
                raise UserError(
                    "out",
                    f"{self.folder} holds an attack with other settings ({', '.join(changed)}); "
                    "delete it or choose another --out",
                )
            clean = f.get_tensor("clean")
            want = self.x[sl].detach().cpu()
            if clean.shape[0] < want.shape[0]:
                return None
            if clean.shape != want.shape or not torch.equal(clean, want):
                raise UserError(
                    "data", f"{self.folder} was attacked on other images; delete it or use another --out"
                )
            advs = {s: f.get_tensor(f"adv_{s}") for s in self.steps}
        return StoredBatch(clean, advs, json.loads(meta["grad"]), float(meta["wall_s"]))

    def _split_single_file(self) -> None:
        """Rewrite an earlier version's one-file attack as batch files (its total time split evenly)."""
        single = self.folder.with_name(f"{self.folder.name}.safetensors")
        if not single.is_file() or any(self.folder.glob("*.safetensors")):
            return
        with safe_open(str(single), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(single))
        grads = json.loads(meta.get("grads", "[]"))
        slices = batch_slices(tensors["clean"].shape[0], self.batch)
        if len(grads) != len(slices) or "settings" not in meta:
            raise UserError("out", f"{single} is not an attack file this version can read; delete it")
        wall_s = float(meta.get("wall_s", 0.0)) / len(slices)
        for sl, grad in zip(slices, grads, strict=True):
            part = {k: v[sl] for k, v in tensors.items()}
            self._write(
                sl.start,
                part,
                {"settings": meta["settings"], "grad": json.dumps(grad), "wall_s": repr(wall_s)},
            )
        single.unlink()

    def open(self, x: torch.Tensor) -> int:
        """Attach the clean images and load their finished batches; returns how many images they cover.

        Every stored batch is checked here, so changed settings or images fail before any work starts.
        """
        self.x = x
        self._done = {}
        self._split_single_file()
        for sl in self.batches():
            got = self._read(sl)
            if got is not None:
                self._done[sl.start] = got
        return self.done

    @property
    def done(self) -> int:
        """Images whose adversarial examples are finished (by this or another process)."""
        return sum(b.clean.shape[0] for b in self._done.values())

    # -- claiming -------------------------------------------------------------------------------
    def _stale(self, claim: Path) -> bool:
        try:
            owner = json.loads(claim.read_text())
            age = time.time() - claim.stat().st_mtime
        except (OSError, ValueError):
            return False  # being written or just released: look again later
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
            return True
        return age > self.stale_s

    def _try_claim(self, start: int) -> bool:
        claim = self._claim_file(start)
        self.folder.mkdir(parents=True, exist_ok=True)
        if claim.exists() and self._stale(claim):
            with contextlib.suppress(FileNotFoundError):
                claim.unlink()
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": self._token}, f)
        return True

    def claim(self, wait: bool = True) -> slice | None:
        """The next batch for this process to attack, or None once every batch is finished.

        While the only unfinished batches are held by other live processes it waits (polling), so
        it can take over a batch whose process dies; with ``wait=False`` it returns None instead.
        """
        while True:
            pending = [sl for sl in self.batches() if sl.start not in self._done]
            if not pending:
                return None
            for sl in pending:
                got = self._read(sl)
                if got is not None:
                    self._done[sl.start] = got
                    continue
                if self._try_claim(sl.start):
                    got = self._read(sl)  # finished by another process between the look and the claim
                    if got is None:
                        return sl
                    self._done[sl.start] = got
                    self.release(sl)
            if all(sl.start in self._done for sl in pending):
                continue
            if not wait:
                return None
            time.sleep(POLL_S)

    def heartbeat(self, sl: slice) -> None:
        """Refresh this process's claim so others do not take it over as abandoned."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._claim_file(sl.start))

    def release(self, sl: slice) -> None:
        """Drop this process's claim on ``sl`` (kept if another process has taken it over)."""
        claim = self._claim_file(sl.start)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(claim.read_text()).get("token") == self._token:
                claim.unlink()

    # -- writing --------------------------------------------------------------------------------
    def _write(self, start: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Write a batch file whole under a private name, then rename it into place (never half-read)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(start)
        tmp = path.with_name(f"{path.name}.{self._token}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def add(self, sl: slice, advs: dict[int, torch.Tensor], grad: dict[str, Any], wall_s: float) -> None:
        """Write one finished batch whole, then rename it into place, then release its claim."""
        assert self.x is not None
        clean = self.x[sl].detach().cpu()
        tensors = {"clean": clean, **{f"adv_{s}": advs[s].detach().cpu() for s in self.steps}}
        meta = {"settings": json.dumps(self.settings), "grad": json.dumps(grad), "wall_s": repr(wall_s)}
        self._write(sl.start, tensors, meta)
        self._done[sl.start] = StoredBatch(clean, {s: tensors[f"adv_{s}"] for s in self.steps}, grad, wall_s)
        self.release(sl)

    # -- the whole attack, once finished ---------------------------------------------------------
    def _ordered(self) -> list[StoredBatch]:
        missing = [sl.start for sl in self.batches() if sl.start not in self._done]
        assert not missing, f"batches {missing} are not finished"
        return [self._done[sl.start] for sl in self.batches()]

    @property
    def advs(self) -> dict[int, torch.Tensor]:
        return {s: torch.cat([b.advs[s] for b in self._ordered()]) for s in self.steps}

    @property
    def grads(self) -> list[dict[str, Any]]:
        return [b.grad for b in self._ordered()]

    @property
    def wall_s(self) -> float:
        """Attack time summed over batches (processes that ran in parallel overlap in real time)."""
        return sum(b.wall_s for b in self._done.values())
