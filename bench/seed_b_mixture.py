"""Seed B, exposure bias: does DRO adversarial training help DDIM at few steps on a known mixture?

Data: a Gaussian mixture in d = 2 (8 components on a circle) and d = 64 (8 components at random
means). Small MLP eps-models are trained with standard, dro-at (both step-size conventions) and
input-perturbation (ADM-IP) at an equal number of parameter updates (dro-at's m replays each count),
then sampled with DDIM at several NFEs (x0_hat clipped to [-1, 1], as for images) and scored by the sliced Wasserstein-2 distance to fresh
samples of the true mixture (the distance between two independent true samples is the floor).

    .venv/bin/python bench/seed_b_mixture.py --out docs/img/seed_b_mixture
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import VectorTrainer, machine, mean_sem, sliced_wasserstein

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "dro-at": ("dro-at", {}),
    "dro-at sqrt_d": ("dro-at", {"alpha_scale": "sqrt_d"}),
    "input-perturbation": ("input-perturbation", {"gamma": 0.1}),
}


class Mixture:
    """8 isotropic Gaussians: on a circle of radius 0.7 (std 0.05) in d = 2, else at N(0, 0.25^2 I) means (std 0.08)."""

    def __init__(self, dim: int, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        if dim == 2:
            angle = torch.arange(8) * (2 * math.pi / 8)
            self.means = 0.7 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
            self.std = 0.05
        else:
            self.means = 0.25 * torch.randn(8, dim, generator=g)
            self.std = 0.08
        self.dim = dim

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(0, len(self.means), (n,), generator=g)
        return self.means[k] + self.std * torch.randn(n, self.dim, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--updates", type=int, default=3000, help="parameter updates per model (equal for every method)"
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5, 10, 20, 100])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/img/seed_b_mixture", help="writes OUT.json and OUT.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    results: dict[str, Any] = {}
    for dim in args.dims:
        mix = Mixture(dim)
        floor = [
            sliced_wasserstein(mix.sample(args.n_samples, 50 + s), mix.sample(args.n_samples, 60 + s))
            for s in range(args.seeds)
        ]
        per_dim: dict[str, Any] = {"floor": mean_sem(floor)}
        for label, (method, options) in METHODS.items():
            sw: dict[int, list[float]] = {n: [] for n in args.nfe}
            for seed in range(args.seeds):
                tr = VectorTrainer(dim, method, options, args.updates, seed, lr=args.lr)
                tr.fit(mix.sample(args.n_train, 1000 + seed), args.batch)
                ref = mix.sample(args.n_samples, 2000 + seed)
                for n in args.nfe:
                    x = tr.sample(args.n_samples, n, seed=10_000 * (seed + 1), clip=True)
                    sw[n].append(sliced_wasserstein(x, ref, seed=seed))
            per_dim[label] = {
                "method": method,
                "options": tr.method.options.model_dump(by_alias=True),
                "sw": {n: mean_sem(v) for n, v in sw.items()},
                "per_seed": sw,
            }
            row = "  ".join(
                f"NFE {n}: {per_dim[label]['sw'][n][0]:.4f}±{per_dim[label]['sw'][n][1]:.4f}"
                for n in args.nfe
            )
            print(f"d={dim:3d} {label:20s} {row}", flush=True)
        print(f"d={dim:3d} floor (two true samples) {per_dim['floor'][0]:.4f}", flush=True)
        results[str(dim)] = per_dim
    summary = {
        "experiment": "seed B: Gaussian mixtures, DDIM at few steps, sliced Wasserstein-2 to the true mixture",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.time() - start,
        "args": vars(args),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    plot(results, args.nfe, out.with_suffix(".png"))
    print(f"wrote {out}.json/.png")


def plot(results: dict[str, Any], nfes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    axes = [axes] if len(results) == 1 else list(axes)
    for ax, (dim, per_dim) in zip(axes, results.items(), strict=True):
        for label in METHODS:
            means = [per_dim[label]["sw"][n][0] for n in nfes]
            errs = [per_dim[label]["sw"][n][1] for n in nfes]
            ax.errorbar(nfes, means, yerr=errs, marker="o", capsize=3, label=label)
        ax.axhline(per_dim["floor"][0], color="k", ls="--", lw=0.8, label="floor (true vs true)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_xlabel("DDIM NFE")
        ax.set_ylabel("sliced W2 to the true mixture")
        ax.set_title(f"d = {dim} (mean ± SEM over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
