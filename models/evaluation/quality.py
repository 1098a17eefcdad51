"""``eval quality``: Frechet distance, unbiased KID, k-NN precision/recall and density/coverage of samples vs a test split.

FD and KID come with 95% bootstrap intervals over the generated samples (the real set fixed): the
sampling noise of one model; ``eval compare-quality`` adds the spread between training seeds.

Features come from the project's own classifier (penultimate layer); every reported number names it,
because a Frechet distance is only comparable within one feature space.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import read_header
from models.devices import device_option
from models.evaluation.classifier import DEFAULT_CLASSIFIER, feature_network_name, load_classifier
from models.evaluation.cli import check, check_classifier_fits, parse_list
from models.evaluation.common import report_header, save_plot
from models.evaluation.seeds import bootstrap_ci, kid_bootstrap
from models.paths import output_dir
from models.sampling_spec import check_sampler


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError("features must be [N, D] with N >= 2")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
    C1^(1/2) C2 C1^(1/2): an eigen-decomposition is stable where sqrtm of the non-symmetric C1 C2
    can return complex round-off or fail on singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError("the two feature sets have different dimensions")
    s1 = _sqrt_psd(np.asarray(cov1, np.float64))
    middle = s1 @ np.asarray(cov2, np.float64) @ s1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt, 0.0))


def fd_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise L2 distances computed directly: the matmul shortcut rounds d(i, j) and d(j, i) apart, which
    flips membership of the k-th neighbour, the point that sits exactly on a ball's boundary."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


class KNNManifold:
    """A feature set with the radius of its k-th nearest neighbour around each point (the manifold estimate)."""

    def __init__(
        self,
        features: np.ndarray | torch.Tensor,
        k: int,
        chunk: int = 1024,
        radii: torch.Tensor | None = None,
    ) -> None:
        """``radii`` given: balls measured on another (larger) set, as ``subset`` keeps them."""
        self.features = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        self.k, self.chunk = k, chunk
        if radii is not None:
            self.radii = radii
            return
        if self.features.shape[0] <= k:
            raise ValueError(f"a k-NN manifold with k={k} needs more than {k} samples")
        found = []
        for i in range(0, self.features.shape[0], chunk):
            d = _distances(self.features[i : i + chunk], self.features)
            found.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
        self.radii = torch.cat(found)

    def inside(self, queries: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How many balls each query falls in, and whether each ball holds at least one query (one pass)."""
        q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
        counts, hit = [], torch.zeros(self.features.shape[0], dtype=torch.bool)
        for i in range(0, q.shape[0], self.chunk):
            within = _distances(q[i : i + self.chunk], self.features) <= self.radii[None, :]
            counts.append(within.sum(dim=1))
            hit |= within.any(dim=0)
        return torch.cat(counts), hit

    def covers(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Whether each query falls inside at least one ball."""
        return self.inside(queries)[0] > 0

    def subset(self, keep: torch.Tensor) -> KNNManifold:
        """The manifold with only the kept balls, radii unchanged (to ask which balls carry a metric)."""
        return KNNManifold(self.features[keep], self.k, self.chunk, radii=self.radii[keep])


def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    real_manifold: KNNManifold | None = None,
) -> tuple[float, float]:
    """Kynkaanniemi et al. (2019): precision = share of fakes in the real k-NN manifold; recall vice versa."""
    real_m = real_manifold or KNNManifold(real, k)
    fake_m = KNNManifold(fake, k)
    return float(real_m.covers(fake).double().mean()), float(fake_m.covers(real_m.features).double().mean())


def density_coverage(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    real_manifold: KNNManifold | None = None,
) -> tuple[float, float]:
    """Naeem et al. (2020): density = real balls per fake / k; coverage = share of real balls holding a fake.

    Both use only the real manifold (none is built on the possibly collapsed fakes). An outlying real
    point whose huge k-NN ball swallows many fakes counts 1 for each of them in precision, 1/k in
    density and 1/n in coverage, which is why coverage is the stable one. Density is (k+1)/k for
    fakes equal to the reals and is not capped at 1.
    """
    real_m = real_manifold or KNNManifold(real, k)
    counts, hit = real_m.inside(fake)
    return float(counts.double().mean() / real_m.k), float(hit.double().mean())


def knn_real_subset(num_real: int, n: int) -> torch.Tensor:
    """Indices of the fixed random n real images the k-NN metrics use (equal-size sets, as in the papers)."""
    return torch.randperm(num_real, generator=torch.Generator().manual_seed(1))[: min(n, num_real)]


@torch.no_grad()
def extract_features(net: Any, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    return (
        torch.cat([net.features(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
        .double()
        .cpu()
        .numpy()
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusion or consistency checkpoint (.safetensors)")
    p.add_argument("--sampler", default="ddim", help="sampler, or a comma-separated list (ddim,dpm-solver++)")
    p.add_argument("--steps", default="5,10,20", help="comma-separated step counts (NFE)")
    p.add_argument("--n", type=int, default=2000, help="generated samples per (sampler, steps)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument(
        "--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall and density/coverage"
    )
    p.add_argument(
        "--kid-real",
        type=int,
        default=2000,
        help="KID's real set: a fixed random subset of this many test images (kernels are n x n)",
    )
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap rounds for the FD and KID intervals")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="feature network (safetensors)")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--seed", type=int, default=0, help="first image seed")
    p.add_argument("--out", default="eval-quality", help="output folder (JSON, PNG plot, sample grids)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda, cuda:N or auto")


def _validate(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Every check that needs only the headers: nothing is generated before these pass."""
    output_dir(args.out, "out")
    samplers = parse_list(args.sampler, str, "sampler")
    steps = parse_list(args.steps, int, "steps")
    check(all(s >= 1 for s in steps), "steps", "every step count must be >= 1")
    check(args.n >= 2, "n", "needs at least 2 samples for a covariance")
    check(args.n > args.k, "n", f"must exceed k={args.k}")
    check(args.kid_real >= 2, "kid-real", "needs at least 2 real images")
    check(args.bootstrap >= 1, "bootstrap", "needs at least 1 round")
    check(
        args.k >= 1 and args.batch_size >= 1 and args.seed >= 0,
        "k/batch-size/seed",
        "k, batch size >= 1; seed >= 0",
    )
    header = read_header(args.model)
    for s in samplers:
        check_sampler(s, header.kind, header.name)
    check_classifier_fits(args.classifier, header.image_shape)
    return samplers, steps


def run(args: argparse.Namespace) -> int:
    from models.data import load_fashion_mnist
    from models.grid import save_grid
    from models.pipeline import Pipeline

    samplers, steps_list = _validate(args)
    classifier, cls_header = load_classifier(args.classifier, "cpu")
    features = feature_network_name(args.classifier, cls_header)
    test = load_fashion_mnist("test", args.data)
    real = extract_features(classifier, test.images)
    real_stats = feature_stats(real)
    kid_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(2))[: args.kid_real]
    real_kid = real[kid_idx.numpy()]

    def fd_vs_real(_: np.ndarray, fake: np.ndarray) -> float:
        return frechet_distance(*real_stats, *feature_stats(fake))

    train = load_fashion_mnist("train", args.data)
    ref_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.n]
    ref_feats = extract_features(classifier, train.images[ref_idx])
    ref_fd = fd_of_features(ref_feats, real)
    # The k-NN metrics compare equal-size sets (as in the papers): a fixed random n of the test split.
    # They depend on n (the ball radii shrink as n grows), so compare them only at equal n.
    pr_idx = knn_real_subset(len(test), args.n)
    real_manifold = KNNManifold(real[pr_idx.numpy()], args.k)
    ref_p, ref_r = precision_recall(real_manifold.features, ref_feats, args.k, real_manifold)
    ref_d, ref_c = density_coverage(real_manifold.features, ref_feats, args.k, real_manifold)
    # Batch-invariant row-by-row evaluation buys bitwise reproducibility that FD does not need.
    pipe = Pipeline.from_checkpoint(args.model, args.device, batch_invariant=False)
    classes = pipe.info.num_classes
    out = Path(args.out)  # created only once every input has loaded: a bad path leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    total = len(samplers) * len(steps_list) * args.n
    with tqdm(total=total, desc="eval quality", unit="img") as bar:
        for sampler in samplers:
            for steps in steps_list:
                imgs, start = [], time.perf_counter()
                for i in range(0, args.n, args.batch_size):
                    seeds = list(range(args.seed + i, args.seed + min(i + args.batch_size, args.n)))
                    labels = [s % classes for s in seeds] if classes else None
                    imgs.append(pipe.sample(seeds, sampler=sampler, steps=steps, labels=labels))
                    bar.update(len(seeds))
                wall = time.perf_counter() - start
                images = torch.cat(imgs)
                feats = extract_features(classifier, images)
                precision, recall = precision_recall(real_manifold.features, feats, args.k, real_manifold)
                density, coverage = density_coverage(real_manifold.features, feats, args.k, real_manifold)
                kid_value, kid_ci = kid_bootstrap(real_kid, feats, rounds=args.bootstrap)
                grid = save_grid(images[:64], out / f"samples_{sampler}_{steps}.png", nrow=8)
                results.append(
                    {
                        "sampler": sampler,
                        "steps": steps,
                        "nfe": steps,
                        "n": args.n,
                        "feature_network": features,
                        "fd": fd_vs_real(real, feats),
                        "fd_ci95": bootstrap_ci(real, feats, fd_vs_real, rounds=args.bootstrap),
                        "kid": kid_value,
                        "kid_ci95": kid_ci,
                        "precision": precision,
                        "recall": recall,
                        "density": density,
                        "coverage": coverage,
                        "sampling_wall_s": round(wall, 2),
                        "sampling_s_per_image": wall / args.n,
                        "grid": str(grid),
                    }
                )
                bar.set_postfix(sampler=sampler, steps=steps, fd=f"{results[-1]['fd']:.2f}")
    report = {
        **report_header(args.command_line, args.device, args.model, pipe.info),
        "feature_network": features,
        "classifier": {
            "path": args.classifier,
            "test_accuracy": cls_header.test_accuracy,
            "hash": cls_header.content_hash,
        },
        "reference": {
            "what": f"FD of {args.n} real training images vs the test split: the floor at this n",
            "fd": ref_fd,
            "precision": ref_p,
            "recall": ref_r,
            "density": ref_d,
            "coverage": ref_c,
        },
        "real_set": f"{test.name} test split: all {len(test)} images for FD, a fixed random {len(pr_idx)} for the k-NN metrics",
        "kid": f"unbiased, cubic kernel, against a fixed random {len(kid_idx)} test images",
        "intervals": f"FD and KID: 95% percentile bootstrap over the generated samples, {args.bootstrap} rounds",
        "k": args.k,
        "results": results,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "fd_vs_nfe.png")
    print(f"FD in the feature space of {features}")
    print(json.dumps({r["sampler"] + "@" + str(r["steps"]): round(r["fd"], 3) for r in results}))
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    def draw(ax: Any) -> None:
        for sampler in dict.fromkeys(r["sampler"] for r in report["results"]):
            rows = [r for r in report["results"] if r["sampler"] == sampler]
            ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], "o-", label=sampler)
        ax.axhline(report["reference"]["fd"], color="gray", ls="--", label="real train vs test (same n)")
        ax.set_xlabel("NFE")
        ax.set_ylabel("Frechet distance")
        ax.set_title(
            f"{report['model']['name']}: FD in the feature space of\n{report['feature_network']}", fontsize=8
        )
        ax.legend()

    save_plot(path, draw)
