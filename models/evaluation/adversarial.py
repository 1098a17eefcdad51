"""Adversarial examples on disk: one safetensors file per attack setting, rewritten after every batch.

A full-protocol attack (>= 100 PGD steps, EOT 8, n >= 500) through a multi-step purifier runs for
hours on a CPU and for longer than one call on a lent GPU. Batches are deterministic given their
first image index (random start and EOT noise are seeded by it), so an attack that stops part way
continues from its last finished batch when the same command runs again, and ends with the images an
uninterrupted run would have found, bit for bit. The files are also the attack's output: the clean
images and their adversarial versions at every recorded step count, for inspection or reuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import UserError


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    new = new.detach().cpu()
    return new if old is None else torch.cat([old, new])


class AdversarialStore:
    """The finished batches of one attack setting; a file is reused only if ``settings`` match."""

    def __init__(self, path: Path, settings: dict[str, Any], batch: int) -> None:
        self.path, self.settings, self.batch = path, settings, batch
        self.steps: list[int] = list(settings["attack_steps"])
        self.clean: torch.Tensor | None = None
        self.advs: dict[int, torch.Tensor] = {}
        self.grads: list[dict[str, Any]] = []
        self.wall_s = 0.0
        if path.is_file():
            self._load()

    @property
    def done(self) -> int:
        """Images whose adversarial examples are stored (after ``resume``: the ones reused)."""
        return 0 if self.clean is None else self.clean.shape[0]

    def _load(self) -> None:
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = json.loads(meta.get("settings", "{}"))
            changed = sorted(k for k in {*stored, *self.settings} if stored.get(k) != self.settings.get(k))
            if changed:
                raise UserError(
                    "out",
                    f"{self.path} holds an attack with other settings ({', '.join(changed)}); "
                    "delete it or choose another --out",
                )
            self.clean = f.get_tensor("clean")
            self.advs = {s: f.get_tensor(f"adv_{s}") for s in self.steps}
        self.grads = json.loads(meta["grads"])
        self.wall_s = float(meta["wall_s"])

    def resume(self, x: torch.Tensor) -> int:
        """Keep the stored batches that ``x`` starts with; returns how many leading images they cover.

        Whole batches only (a short last batch of a smaller n is attacked again), unless all of x is done.
        """
        if self.clean is None:
            return 0
        n = min(self.clean.shape[0], x.shape[0])
        if not torch.equal(self.clean[:n], x[:n].detach().cpu()):
            raise UserError(
                "data", f"{self.path} was attacked on other images; delete it or use another --out"
            )
        n = n if n == x.shape[0] else n - n % self.batch
        self.clean = self.clean[:n]
        self.advs = {s: a[:n] for s, a in self.advs.items()}
        self.grads = self.grads[: -(-n // self.batch)]
        return n

    def add(
        self, x: torch.Tensor, advs: dict[int, torch.Tensor], grad: dict[str, Any], wall_s: float
    ) -> None:
        """Append one finished batch and rewrite the file atomically (a kill leaves the old one whole)."""
        self.clean = _append(self.clean, x)
        self.advs = {s: _append(self.advs.get(s), advs[s]) for s in self.steps}
        self.grads.append(grad)
        self.wall_s += wall_s
        tensors = {"clean": self.clean, **{f"adv_{s}": a for s, a in self.advs.items()}}
        meta = {
            "settings": json.dumps(self.settings),
            "grads": json.dumps(self.grads),
            "wall_s": repr(self.wall_s),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.path)
