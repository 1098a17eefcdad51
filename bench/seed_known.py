"""Seed A and B on known distributions, >= 5 training seeds per arm, paired across seeds with 95% CIs.

``subspace`` (seed A's "linearized" data): x = U z, U in R^{D x K} orthonormal (D = 256, K = 16),
z ~ N(0, diag(s_i^2)). Training sets: clean; 90% of points + N(0, sigma^2 I) for each ``--sigmas``;
10% outliers N(0, 0.25^2 I_D). Small MLP eps-model; samples (DDIM, no clipping) are scored by the
off-subspace residual mean ||(I - U U^T) x|| / sqrt(D) (truth 0), the in-subspace covariance error
||U^T C U - diag(s^2)||_F / ||diag(s^2)||_F and the largest principal angle between span(U) and the
samples' top-K principal subspace. Arms: standard, equivariant random / adversarial (the paper's
radius), the invariance ablation and the earlier pixel-floor radius; ``--strong LAMBDA:R_MAX`` adds
an adversarial and a random arm with that weight and box (e.g. 10:3, to check the linear-Gaussian
bound of ``subspace-theory``), ``--arms`` picks which arms train on the corrupted sets.

``plane``: the 3-D plane toy of bench/seed_a_plane.py (6-Gaussian mixture on a plane, 10% uniform
outliers) with the same arms; off-support fraction and mean distance to the plane.

``mixture``: seed B's fine-tune regime on the Gaussian mixtures of bench/seed_b_mixture.py: one
standard pre-training per dimension, then standard and dro-at fine-tuned from it for equal
minibatches (dro-at: m updates each) per seed; sliced W2 to the true mixture at few DDIM steps and
the exposure bias per sampling step (variance ratio, eps-norm gap).

    OMP_NUM_THREADS=1 nice -n 10 robustdiff bench seed_known subspace --out bench/results/seed_known/subspace
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import VectorTrainer, machine, sliced_wasserstein
from seed_a_plane import distance_to_plane, plane_basis, training_set
from seed_b_mixture import Mixture

from models.bench_cli import BenchParser, positive_int
from models.denoisers import EpsDenoiser
from models.evaluation.seeds import exposure_bias, mean_ci, paired
from models.generate import sampler_grid
from models.schedules import Schedule
from models.train.methods import B_MIN

ARMS_A: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "equivariant random": ("equivariant-at", {"variant": "random"}),
    "equivariant adversarial": ("equivariant-at", {"variant": "adversarial"}),
    "invariance ablation": ("equivariant-at", {"variant": "adversarial", "target": "invariance"}),
    "old radius rule": (
        "equivariant-at",
        {"variant": "adversarial", "radius": "pixel-floor", "attack": "residual"},
    ),
}


def strong_setting(text: str) -> tuple[float, float]:
    """argparse type for ``--strong``: ``LAMBDA:R_MAX``, both numbers >= 0 (e.g. ``10:3``)."""
    error = argparse.ArgumentTypeError(f"expected LAMBDA:R_MAX with two finite numbers >= 0, got {text!r}")
    parts = text.split(":")
    if len(parts) != 2:
        raise error
    try:
        lam, r_max = float(parts[0]), float(parts[1])
    except ValueError:
        raise error from None
    if not all(math.isfinite(v) and v >= 0 for v in (lam, r_max)):
        raise error
    return lam, r_max


def arm_table(strong: list[tuple[float, float]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """ARMS_A plus, for each (lambda, r_max) in ``strong``, the adversarial and random equivariant arms
    with the paper's radius family at that weight and box."""
    arms = dict(ARMS_A)
    for lam, r_max in strong:
        for variant in ("adversarial", "random"):
            name = f"equivariant {variant} (lambda {lam:g}, r_max {r_max:g})"
            arms[name] = ("equivariant-at", {"variant": variant, "lambda": lam, "r_max": r_max})
    return arms


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def header(args: Any, experiment: str) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "command": "robustdiff bench seed_known " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": list(os.getloadavg()),
        "args": vars(args),
    }


def write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report["loadavg_end"] = list(os.getloadavg())
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))


def summarise(per_seed: dict[str, dict[str, list[float]]], base: str = "standard") -> dict[str, Any]:
    """Per arm and metric: mean with 95% CI over seeds, and the paired difference to ``base``."""
    out: dict[str, Any] = {}
    for arm, metrics in per_seed.items():
        out[arm] = {}
        for m, values in metrics.items():
            row: dict[str, Any] = mean_ci(values)
            b = per_seed.get(base, {}).get(m)
            if arm != base and b is not None and len(b) == len(values) and len(values) >= 2:
                row["vs_" + base] = paired(values, b)
            out[arm][m] = row
    return out


# Linearized subspace ---------------------------------------------------------------------------


class Subspace:
    def __init__(self, dim: int, k: int, seed: int = 11) -> None:
        g = torch.Generator().manual_seed(seed)
        self.u, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
        self.scales = 0.4 * 0.85 ** torch.arange(k, dtype=torch.float64)  # s_i: 0.4 .. 0.036
        self.dim, self.k = dim, k

    def clean(self, n: int, g: torch.Generator) -> torch.Tensor:
        return ((torch.randn(n, self.k, generator=g, dtype=torch.float64) * self.scales) @ self.u.T).float()

    def training(self, condition: str, n: int, seed: int) -> torch.Tensor:
        """``clean``, ``outliers`` (10% of points replaced by N(0, 0.25^2 I_D)), ``noisy sigma S``
        (90% of points + N(0, S^2 I_D)) or ``noisy sigma S + outliers`` (10% outliers, and 90% of the
        rest noisy)."""
        g = torch.Generator().manual_seed(seed)
        x = self.clean(n, g)
        bad = torch.zeros(n, dtype=torch.bool)
        if condition == "outliers" or condition.endswith(" + outliers"):
            bad = torch.rand(n, generator=g) < 0.1
            x[bad] = 0.25 * torch.randn(int(bad.sum()), self.dim, generator=g)
        if condition.startswith("noisy sigma "):
            sigma = float(condition.removeprefix("noisy sigma ").removesuffix(" + outliers"))
            hit = (torch.rand(n, generator=g) < 0.9) & ~bad
            x[hit] += sigma * torch.randn(int(hit.sum()), self.dim, generator=g)
        elif condition not in ("clean", "outliers"):
            raise ValueError(f"unknown condition {condition!r}")
        return x

    def metrics(self, x: torch.Tensor) -> dict[str, float]:
        x = x.double()
        proj = x @ self.u
        off = (x - proj @ self.u.T).norm(dim=1) / math.sqrt(self.dim)
        cov = torch.cov(proj.T)
        truth = torch.diag(self.scales**2)
        pcs = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[: self.k].T
        cosines = torch.linalg.svdvals(self.u.T @ pcs).clamp(max=1.0)
        return {
            "off_subspace": float(off.mean()),
            "cov_error": float((cov - truth).norm() / truth.norm()),
            "in_subspace_variance_ratio": float(torch.diagonal(cov).sum() / truth.trace()),
            "max_principal_angle_deg": float(torch.rad2deg(torch.arccos(cosines.min()))),
        }


def subspace_arms(args: Any) -> tuple[dict[str, tuple[str, dict[str, Any]]], list[str], list[str]]:
    """The arm table and the arms trained on the corrupted sets and on the clean set (none: no clean
    set); ``standard`` must be among each (every comparison is paired against it)."""
    table = arm_table(args.strong)
    corrupted = list(table) if args.arms is None else args.arms
    for option, chosen in (("--arms", corrupted), ("--clean-arms", args.clean_arms)):
        unknown = [a for a in chosen if a not in table]
        if unknown:
            raise SystemExit(f"seed_known: {option}: unknown arm {unknown[0]!r}; known: {', '.join(table)}")
        if chosen and "standard" not in chosen:
            raise SystemExit(f"seed_known: {option} must include 'standard' (the paired baseline)")
    return table, corrupted, list(args.clean_arms)


def subspace(args: Any) -> None:
    out = Path(args.out)
    table, corrupted, clean_arms = subspace_arms(args)
    space = Subspace(args.dim, args.k)
    extra = " + outliers" if args.outliers_with_noise else ""
    # The noisy sets first: they carry the paper's claim; the clean set only measures the cost.
    conditions = [f"noisy sigma {s:g}{extra}" for s in args.sigmas]
    conditions += ([] if args.outliers_with_noise else ["outliers"]) + (["clean"] if clean_arms else [])
    report = header(args, "seed A: linearized subspace data, D x K") | {"results": {}}
    for cond in conditions:
        train_metrics = space.metrics(space.training(cond, args.n_train, 0))
        per_seed: dict[str, dict[str, list[float]]] = {}
        arms = clean_arms if cond == "clean" else corrupted
        for arm in arms:
            method, options = table[arm]
            per_seed[arm] = {}
            for seed in range(args.seeds):
                data = space.training(cond, args.n_train, seed)
                sigma_data = float(data.pow(2).mean().sqrt()) if args.skip == "sigma-data" else None
                tr = VectorTrainer(
                    args.dim,
                    method,
                    options,
                    args.updates,
                    seed,
                    lr=args.lr,
                    hidden=args.hidden,
                    sigma_data=sigma_data,
                )
                start = time.perf_counter()
                tr.fit(data, args.batch)
                m = space.metrics(tr.sample(args.n_samples, args.steps, seed=10_000 * (seed + 1)))
                for key, v in m.items():
                    per_seed[arm].setdefault(key, []).append(v)
                log(
                    f"  {cond} {arm} seed {seed}: off-subspace {m['off_subspace']:.4f}, in-subspace "
                    f"variance ratio {m['in_subspace_variance_ratio']:.3f} ({time.perf_counter() - start:.0f} s)"
                )
            log(f"{cond:16s} {arm:24s} off-subspace {mean_ci(per_seed[arm]['off_subspace'])['mean']:.4f}")
            report["results"][cond] = {
                "training_set": train_metrics,
                "per_seed": per_seed,
                "summary": summarise(per_seed),
            }
            write(out, report)
    plot_subspace(report, out.with_suffix(".png"))
    log(f"wrote {out}.json/.png")


def penalty_scale(
    s: torch.Tensor, variant: str, lam: float, r_max: float, radius: str = "paper", rho: float = 2.0
) -> torch.Tensor:
    """c(t) = lambda E[w^2] per coordinate, for a linear eps-model (k x).

    Boxes (EquivariantOptions' defaults): ``paper`` r = r_max s^rho + b, b ~ U[b_min, b_max];
    ``pixel-floor`` r = max(r_floor / s, r_scale). random: w ~ U[-r, r], E w^2 = E r^2 / 3.
    adversarial: for a linear model either attack objective's gradient in w has the sign of w, so the
    one signed step of r from a random start always lands on the face: E w^2 = E r^2.
    """
    if radius == "paper":
        b_min, b_max = B_MIN, 2 * B_MIN
        m = r_max * s.pow(rho)
        er2 = m * m + m * (b_min + b_max) + (b_max**3 - b_min**3) / (3 * (b_max - b_min))
    else:
        er2 = torch.maximum(2 * 8 / 255 / s, torch.full_like(s, 0.1)).pow(2)
    return lam * er2 / (3.0 if variant == "random" else 1.0)


def linear_gaussian_ddim_variance(
    v: torch.Tensor, variant: str, lam: float, r_max: float, steps: int = 50, radius: str = "paper"
) -> torch.Tensor:
    """Variance of deterministic DDIM samples (``steps`` on the bench's grid, from N(0, 1)) for
    N(0, v) data in each direction (``v`` a tensor of variances) and the loss-optimal linear eps-model.

    The loss E(k x_t - eps)^2 + lambda E[w^2] (k s_t - 1)^2 (the equivariance residual of a linear
    model k(t) x is (k s_t - 1) w) is least at k = s (1 + c) / (a^2 v + s^2 (1 + c)), c =
    ``penalty_scale``: the exact denoiser of variance v / (1 + c); lambda = 0 is the standard model.
    """
    sch = Schedule()
    ts = sampler_grid(sch, "ddim", steps=steps)
    var = torch.ones_like(v, dtype=torch.float64)
    for t, t_next in itertools.pairwise(ts):
        ab, ab_next = sch.alphabar(t), sch.alphabar(t_next)
        st = (1 - ab).sqrt()
        c = penalty_scale(st, variant, lam, r_max, radius)
        k = st * (1 + c) / (ab * v + st**2 * (1 + c))
        var = var * ((ab_next / ab).sqrt() * (1 - st * k) + (1 - ab_next).sqrt() * k) ** 2
    return var


def linear_gaussian_std_ratio(
    v: float, variant: str, lam: float, r_max: float, steps: int = 50, radius: str = "paper"
) -> float:
    """The exact answer for N(0, v) data in one direction and a linear eps-model k(t) x: the std of
    DDIM samples with the AT optimum over the std with the standard one (lambda = 0); how much the
    regulariser can shrink the noise the training set holds in that direction."""
    vt = torch.tensor(v, dtype=torch.float64)
    at = linear_gaussian_ddim_variance(vt, variant, lam, r_max, steps, radius)
    return float((at / linear_gaussian_ddim_variance(vt, variant, 0.0, r_max, steps, radius)).sqrt())


def in_subspace_variance_ratio_bound(
    v: torch.Tensor, variant: str, lam: float, r_max: float, steps: int = 50, radius: str = "paper"
) -> float:
    """tr(U^T C U) of AT samples over the standard model's, exact for the linear-Gaussian model with
    per-direction data variances ``v``: the cost the regulariser's optimum has inside the subspace."""
    at = linear_gaussian_ddim_variance(v, variant, lam, r_max, steps, radius)
    return float(at.sum() / linear_gaussian_ddim_variance(v, variant, 0.0, r_max, steps, radius).sum())


def skip_only_off_subspace(sigma_data: float, dim: int, k: int, steps: int = 50) -> float:
    """Off-subspace residual ||(I - U U^T) x|| / sqrt(D) (RMS) of DDIM samples from the preconditioned
    MLP with F = 0, the Gaussian eps of N(0, sigma_data^2 I): where a model ends that learns nothing
    off the subspace beyond its skip path."""
    var = linear_gaussian_ddim_variance(
        torch.tensor(sigma_data**2, dtype=torch.float64), "random", 0.0, 0.0, steps
    )
    return math.sqrt(float(var) * (dim - k) / dim)


def subspace_theory(args: Any) -> None:
    """The linear-Gaussian bound over a grid of (lambda, r_max), per training set: the off-subspace
    std of AT samples / standard's, and the in-subspace variance ratio (the cost); what the
    regulariser can do at best on this data, before any training noise."""
    out = Path(args.out)
    space = Subspace(args.dim, args.k)
    report = header(args, "seed A: linear-Gaussian bound for the subspace data's off-subspace noise") | {
        "rows": [],
        "skip_only_off_subspace": {},
    }
    extra = " + outliers" if args.outliers_with_noise else ""
    # (set, sigma, per-direction variance off the subspace, in it): with outliers the noisy sets hold
    # 81% noisy points, 10% outliers N(0, 0.25^2 I) and 9% clean ones; the clean set only has s_i^2.
    keep = 0.9 if args.outliers_with_noise else 1.0
    sets = []
    for sigma in args.sigmas:
        off = 0.9 * 0.9 * sigma**2 + 0.1 * 0.25**2 if args.outliers_with_noise else 0.9 * sigma**2
        sets.append((f"noisy sigma {sigma:g}{extra}", sigma, off, keep * space.scales**2 + off))
    sets.append(("clean", 0.0, None, space.scales**2))
    settings = [
        ("paper", variant, lam, r_max)
        for variant in ("random", "adversarial")
        for lam in args.lambdas
        for r_max in args.r_maxes
    ]
    # The old rule's box is huge near t = 0 (6.3 noise units at t = 1/T): its bound for comparison.
    settings.append(("pixel-floor", "adversarial", 0.3, 0.0))
    for data, sigma, off, inside in sets:
        sigma_data = float(
            space.training(data, args.n_train, 0).pow(2).mean().sqrt()
        )  # --skip sigma-data, seed 0
        residual = skip_only_off_subspace(sigma_data, args.dim, args.k, args.steps)
        report["skip_only_off_subspace"][data] = {"sigma_data": sigma_data, "residual": residual}
        log(
            f"{data}: the skip path alone (F = 0, sigma_data {sigma_data:.4f}) ends {residual:.4f} off the subspace"
        )
        for radius, variant, lam, r_max in settings:
            row: dict[str, Any] = {"data": data, "sigma": sigma, "variant": variant, "lambda": lam}
            row |= {"r_max": r_max} if radius == "paper" else {"radius": radius}
            if off is not None:
                row["std_ratio"] = linear_gaussian_std_ratio(off, variant, lam, r_max, args.steps, radius)
            row["in_subspace_variance_ratio"] = in_subspace_variance_ratio_bound(
                inside, variant, lam, r_max, args.steps, radius
            )
            report["rows"].append(row)
            log(
                f"{data} {variant:11s} {radius} lambda {lam:g} r_max {r_max:g}: off-subspace std AT / "
                f"standard {row.get('std_ratio', float('nan')):.4f}, in-subspace variance "
                f"{row['in_subspace_variance_ratio']:.4f}"
            )
    write(out, report)


def plot_subspace(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(report["results"])
    arms = list(dict.fromkeys(a for c in conds for a in report["results"][c]["summary"]))
    metrics = ["off_subspace", "cov_error", "max_principal_angle_deg"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8))
    width = 0.8 / len(arms)
    for ax, metric in zip(axes, metrics, strict=True):
        for j, arm in enumerate(arms):
            means, lo, hi = [], [], []
            for c in conds:
                row = report["results"][c]["summary"].get(arm, {}).get(metric)
                means.append(row["mean"] if row else float("nan"))
                lo.append(row["mean"] - row["ci95"][0] if row else 0)
                hi.append(row["ci95"][1] - row["mean"] if row else 0)
            xs = [i + (j - len(arms) / 2 + 0.5) * width for i in range(len(conds))]
            ax.bar(xs, means, width, yerr=[lo, hi], capsize=2, label=arm)
        ax.set_xticks(range(len(conds)), conds, fontsize=7)
        ax.set_title(f"{metric} (mean, 95% CI over seeds)", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# Plane -----------------------------------------------------------------------------------------


def plane(args: Any) -> None:
    out = Path(args.out)
    basis = plane_basis()
    report = header(args, "seed A: 6-Gaussian mixture on a 2-D plane in 3-D, 10% uniform outliers") | {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for arm, (method, options) in ARMS_A.items():
        per_seed[arm] = {"off_support": [], "mean_distance": []}
        for seed in range(args.seeds):
            data = training_set(args.n_train, args.outliers, seed, basis)
            sigma_data = float(data.pow(2).mean().sqrt()) if args.skip == "sigma-data" else None
            tr = VectorTrainer(3, method, options, args.updates, seed, lr=args.lr, sigma_data=sigma_data)
            tr.fit(data, args.batch)
            d = distance_to_plane(tr.sample(args.n_samples, args.steps, seed=10_000 * (seed + 1)), basis)
            per_seed[arm]["off_support"].append(float((d > args.tau).float().mean()))
            per_seed[arm]["mean_distance"].append(float(d.mean()))
        log(f"plane {arm:24s} off-support {mean_ci(per_seed[arm]['off_support'])['mean']:.4f}")
        report["per_seed"], report["summary"] = per_seed, summarise(per_seed)
        write(out, report)
    train_d = distance_to_plane(training_set(args.n_train, args.outliers, 0, basis), basis)
    report["training_set_off_support"] = float((train_d > args.tau).float().mean())
    write(out, report)
    plot_simple(report["summary"], ["off_support", "mean_distance"], out.with_suffix(".png"), "plane toy")
    log(f"wrote {out}.json/.png")


def plot_simple(summary: dict[str, Any], metrics: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    arms = list(summary)
    for ax, metric in zip(axes, metrics, strict=True):
        means = [summary[a][metric]["mean"] for a in arms]
        lo = [summary[a][metric]["mean"] - summary[a][metric]["ci95"][0] for a in arms]
        hi = [summary[a][metric]["ci95"][1] - summary[a][metric]["mean"] for a in arms]
        ax.bar(range(len(arms)), means, yerr=[lo, hi], capsize=3)
        ax.set_xticks(range(len(arms)), [a.replace(" ", "\n", 1) for a in arms], fontsize=6)
        ax.set_title(f"{title}: {metric} (95% CI over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# Mixture, seed B fine-tune regime ----------------------------------------------------------------


def mixture(args: Any) -> None:
    out = Path(args.out)
    report = header(args, "seed B: Gaussian mixtures, pre-train then fine-tune standard vs dro-at") | {
        "results": {}
    }
    m = 3
    for dim in args.dims:
        mix = Mixture(dim)
        pre = VectorTrainer(dim, "standard", {}, args.pretrain, 0, lr=args.lr)
        pre.fit(mix.sample(args.n_train, 1000), args.batch)
        start = pre.net.state_dict()
        per_seed: dict[str, dict[str, list[float]]] = {}
        exposure: dict[str, list[list[dict[str, float]]]] = {}
        arms = {
            "standard": ("standard", {}, args.finetune),
            "dro-at": ("dro-at", {"m": m}, args.finetune * m),
        }
        for arm, (method, options, updates) in arms.items():
            per_seed[arm], exposure[arm] = {}, []
            for seed in range(args.seeds):
                tr = VectorTrainer(
                    dim, method, options, updates, seed + 1, lr=args.finetune_lr, init=start, warmup=10
                )
                tr.fit(mix.sample(args.n_train, 1000), args.batch)
                ref = mix.sample(args.n_samples, 2000 + seed)
                for n in args.nfe:
                    x = tr.sample(args.n_samples, n, seed=10_000 * (seed + 1), clip=True)
                    per_seed[arm].setdefault(f"sw_nfe{n}", []).append(sliced_wasserstein(x, ref, seed=seed))
                rows = exposure_bias(
                    EpsDenoiser(tr.ema, tr.schedule), ref, steps=args.nfe[1], n=args.n_samples
                )
                exposure[arm].append(rows)
                per_seed[arm].setdefault("mean_abs_log_variance_ratio", []).append(
                    sum(abs(math.log(r["variance_ratio"])) for r in rows) / len(rows)
                )
                per_seed[arm].setdefault("mean_abs_eps_norm_gap", []).append(
                    sum(abs(r["eps_norm_gap"]) for r in rows) / len(rows)
                )
            log(
                f"d={dim} {arm}: "
                + ", ".join(f"{k} {mean_ci(v)['mean']:.4f}" for k, v in per_seed[arm].items())
            )
        report["results"][str(dim)] = {
            "per_seed": per_seed,
            "summary": summarise(per_seed),
            "exposure_per_step": {arm: rows for arm, rows in exposure.items()},
            "exposure_nfe": args.nfe[1],
        }
        write(out, report)
    plot_mixture(report, out.with_suffix(".png"))
    log(f"wrote {out}.json/.png")


def plot_mixture(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(report["results"])
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 3.6), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        res = report["results"][dim]
        for arm, colour in (("standard", "grey"), ("dro-at", "tab:red")):
            for j, rows in enumerate(res["exposure_per_step"][arm]):
                ax.plot(
                    [r["t"] for r in rows],
                    [r["variance_ratio"] for r in rows],
                    color=colour,
                    alpha=0.5,
                    label=arm if j == 0 else None,
                )
        ax.axhline(1, color="black", lw=0.6)
        ax.invert_xaxis()
        ax.set_xlabel("t (sampling runs right)")
        ax.set_ylabel("||x_t||^2 sampled / forward")
        ax.set_title(
            f"d = {dim}: exposure bias per DDIM step (NFE {res['exposure_nfe']}), one line per seed",
            fontsize=8,
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_parser() -> BenchParser:
    p = BenchParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=("subspace", "subspace-theory", "plane", "mixture"))
    p.add_argument("--seeds", type=positive_int, default=5)
    p.add_argument("--updates", type=positive_int, default=1500, help="subspace/plane: updates per model")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--n-train", type=positive_int, default=4000)
    p.add_argument("--n-samples", type=positive_int, default=2000)
    p.add_argument("--steps", type=positive_int, default=50, help="subspace/plane: DDIM steps")
    p.add_argument("--dim", type=positive_int, default=256, help="subspace: D")
    p.add_argument("--k", type=positive_int, default=16, help="subspace: K")
    p.add_argument("--hidden", type=positive_int, default=256, help="subspace: MLP width")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2], help="subspace: noise levels")
    p.add_argument(
        "--outliers-with-noise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subspace: 10%% outliers inside each noisy set (default), or a separate outliers-only set",
    )
    p.add_argument(
        "--strong",
        type=strong_setting,
        nargs="+",
        default=[],
        metavar="LAMBDA:R_MAX",
        help="subspace: add 'equivariant adversarial (lambda L, r_max R)' and its random twin per setting",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="subspace: arms trained on the corrupted sets (default: all, the --strong ones included; "
        "standard must be among them)",
    )
    p.add_argument(
        "--clean-arms",
        nargs="*",
        default=["standard", "equivariant adversarial"],
        help="subspace: arms trained on the clean set (the cost of AT; standard must be among them); "
        "none: skip the clean set",
    )
    p.add_argument(
        "--skip",
        choices=("sigma-data", "none"),
        default="sigma-data",
        help="subspace/plane: EDM preconditioning of the MLP with sigma_data = the training set's RMS (see _toy.MLP), "
        "or none (the plane's runs before 2026-12-03 13:00)",
    )
    p.add_argument(
        "--lambdas", type=float, nargs="+", default=[0.3, 1, 3, 10], help="subspace-theory: lambdas"
    )
    p.add_argument(
        "--r-maxes", type=float, nargs="+", default=[0.5, 1.5, 3], help="subspace-theory: r_max values"
    )
    p.add_argument("--outliers", type=float, default=0.1, help="plane: outlier share")
    p.add_argument("--tau", type=float, default=0.05, help="plane: off-support distance")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64], help="mixture: dimensions")
    p.add_argument("--pretrain", type=positive_int, default=3000, help="mixture: pre-training updates")
    p.add_argument("--finetune", type=positive_int, default=500, help="mixture: fine-tune minibatches")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5, 10], help="mixture: DDIM NFEs")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    return p


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    experiments = {
        "subspace": subspace,
        "subspace-theory": subspace_theory,
        "plane": plane,
        "mixture": mixture,
    }
    experiments[args.experiment](args)


if __name__ == "__main__":
    main()
