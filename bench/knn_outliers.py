"""Why k-NN precision moves with n: how much of it is carried by the few real points with huge k-NN balls.

usage: python bench/knn_outliers.py --model M.safetensors [--sampler consistency --steps 1] [--n 500,2000]

For each n it builds the real manifold from the same fixed random n test images as ``eval quality`` and
prints precision, density, coverage and the share of generated images that fall *only* in balls whose
radius is in the top 1% (outlying real images). Samples are seeds 0..max(n)-1, as in ``eval quality``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.data import load_fashion_mnist
from models.evaluation.classifier import DEFAULT_CLASSIFIER, load_classifier
from models.evaluation.quality import KNNManifold, density_coverage, extract_features, knn_real_subset
from models.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sampler", default="consistency")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--n", default="500,2000", help="comma-separated set sizes")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args()
    try:
        sizes = [int(x) for x in args.n.split(",")]
    except ValueError:
        p.error(f"--n: {args.n!r} is not a comma-separated list of integers")
    if not Path(args.model).is_file():
        p.error(f"--model: {args.model} does not exist")
    if min(sizes) <= args.k or args.k < 1:
        p.error(f"--n: every size must exceed --k={args.k} (>= 1)")
    classifier, _ = load_classifier(str(DEFAULT_CLASSIFIER), "cpu")
    test = load_fashion_mnist("test", args.data)
    real = extract_features(classifier, test.images)
    pipe = Pipeline.from_checkpoint(args.model, "cpu", batch_invariant=False)
    total = max(sizes)
    images = torch.cat(
        [
            pipe.sample(
                list(range(i, min(i + args.batch_size, total))), sampler=args.sampler, steps=args.steps
            )
            for i in range(0, total, args.batch_size)
        ]
    )
    fake_all = extract_features(classifier, images)
    for n in sizes:
        idx = knn_real_subset(len(test), n).numpy()
        manifold = KNNManifold(real[idx], args.k)
        counts_per_fake, _ = manifold.inside(fake_all[:n])
        big = manifold.radii >= manifold.radii.quantile(0.99)
        covered = counts_per_fake > 0
        covered_without_big = manifold.subset(~big).covers(fake_all[:n])
        density, coverage = density_coverage(manifold.features, fake_all[:n], args.k, manifold)
        row = {
            "n": n,
            "precision": float(covered.double().mean()),
            "precision_without_top1pct_balls": float(covered_without_big.double().mean()),
            "share_covered_only_by_top1pct_balls": float((covered & ~covered_without_big).double().mean()),
            "density": density,
            "coverage": coverage,
            "median_radius": float(manifold.radii.median()),
        }
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
