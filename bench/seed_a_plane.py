"""Seed A, known distribution: does equivariant AT keep samples on the data's support despite outliers?

Data: a mixture of 6 Gaussians on a 2-D plane through the origin in 3-D (a fixed random rotation),
plus a share of uniform outliers in [-1, 1]^3 in the training set only. A small MLP eps-model is
trained with each method (the trainer's own method classes); samples (DDIM) are scored by their
distance to the plane: the mean distance and the fraction farther than ``--tau``.

    .venv/bin/python bench/seed_a_plane.py --out docs/img/seed_a_plane
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import VectorTrainer, machine, mean_sem

from models.bench_cli import BenchParser, positive_int

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "equivariant-at random": ("equivariant-at", {"variant": "random"}),
    "equivariant-at adversarial": ("equivariant-at", {"variant": "adversarial"}),
    "invariance ablation": ("equivariant-at", {"variant": "adversarial", "target": "invariance"}),
}


def plane_basis(seed: int = 123) -> torch.Tensor:
    """A fixed random orthonormal basis [3, 3]; columns 0, 1 span the plane, column 2 is its normal."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q.float()


def clean_samples(n: int, g: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    """Mixture of 6 isotropic Gaussians (std 0.08) on a circle of radius 0.55, in the plane."""
    k = torch.randint(0, 6, (n,), generator=g)
    angle = k.float() * (2 * math.pi / 6)
    centres = 0.55 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    uv = centres + 0.08 * torch.randn(n, 2, generator=g)
    return uv @ basis[:, :2].T


def training_set(n: int, outliers: float, seed: int, basis: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = clean_samples(n, g, basis)
    bad = torch.rand(n, generator=g) < outliers
    x[bad] = torch.rand(int(bad.sum()), 3, generator=g) * 2 - 1
    return x


def distance_to_plane(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return (x @ basis[:, 2]).abs()


def main() -> None:
    p = BenchParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=positive_int, default=5)
    p.add_argument("--updates", type=positive_int, default=4000, help="parameter updates per model")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--n-train", type=positive_int, default=4000)
    p.add_argument("--outliers", type=float, default=0.1)
    p.add_argument("--n-samples", type=positive_int, default=2000)
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps for sampling")
    p.add_argument(
        "--tau", type=float, default=0.05, help="'off the support' = farther than tau from the plane"
    )
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--r-floor", type=float, default=2 * 8 / 255)
    p.add_argument("--r-scale", type=float, default=0.1)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", default="docs/img/seed_a_plane", help="writes OUT.json and OUT.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    basis = plane_basis()
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, torch.Tensor] = {}
    start = time.time()
    for label, (method, options) in METHODS.items():
        if method == "equivariant-at":
            options = {**options, "lambda": args.lam, "r_floor": args.r_floor, "r_scale": args.r_scale}
        off, dist, secs = [], [], []
        for seed in range(args.seeds):
            data = training_set(args.n_train, args.outliers, seed, basis)
            t0 = time.time()
            tr = VectorTrainer(3, method, options, args.updates, seed, lr=args.lr)
            tr.fit(data, args.batch)
            secs.append(time.time() - t0)
            x = tr.sample(args.n_samples, args.steps, seed=10_000 * (seed + 1))
            d = distance_to_plane(x, basis)
            off.append(float((d > args.tau).float().mean()))
            dist.append(float(d.mean()))
            if seed == 0:
                samples[label] = x
        results[label] = {
            "method": method,
            "options": options,
            "off_support": mean_sem(off),
            "mean_distance": mean_sem(dist),
            "per_seed_off_support": off,
            "per_seed_mean_distance": dist,
            "train_seconds_per_model": sum(secs) / len(secs),
        }
        m, e = results[label]["off_support"]
        md, me = results[label]["mean_distance"]
        print(f"{label:28s} off-support {m:.4f} ± {e:.4f}   mean distance {md:.4f} ± {me:.4f}", flush=True)
    g = torch.Generator().manual_seed(999)
    ref = distance_to_plane(clean_samples(args.n_samples, g, basis), basis)
    train_d = distance_to_plane(training_set(args.n_train, args.outliers, 0, basis), basis)
    summary = {
        "experiment": "seed A: 6-Gaussian mixture on a 2-D plane in 3-D, uniform outliers in training",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.time() - start,
        "args": vars(args),
        "training_set_off_support": float((train_d > args.tau).float().mean()),
        "clean_data_off_support": float((ref > args.tau).float().mean()),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    plot(results, samples, basis, out.with_suffix(".png"), args.tau)
    print(f"training set off-support {summary['training_set_off_support']:.4f}; wrote {out}.json/.png")


def plot(
    results: dict[str, dict[str, Any]],
    samples: dict[str, torch.Tensor],
    basis: torch.Tensor,
    path: Path,
    tau: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(1, 2 + len(labels), figsize=(4 * (2 + len(labels)), 3.6))
    for ax, key, title in [
        (axes[0], "off_support", f"fraction > {tau} off the plane"),
        (axes[1], "mean_distance", "mean distance to plane"),
    ]:
        means = [results[k][key][0] for k in labels]
        errs = [results[k][key][1] for k in labels]
        ax.bar(
            range(len(labels)),
            means,
            yerr=errs,
            capsize=4,
            color=["grey", "tab:blue", "tab:green", "tab:red"][: len(labels)],
        )
        ax.set_xticks(range(len(labels)), [k.replace(" ", "\n", 1) for k in labels], fontsize=7)
        ax.set_title(title + " (5 seeds, ±SEM)", fontsize=9)
    for ax, k in zip(axes[2:], labels, strict=True):
        x = samples[k] @ basis
        ax.scatter(x[:, 0], x[:, 2], s=2, alpha=0.4)
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_title(f"{k}: in-plane u vs normal", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
