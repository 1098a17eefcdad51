"""Print Markdown tables and draw the docs/img plots from the GPU results under ``bench/results/gpu``.

usage: python bench/gpu_report.py [bench/results/gpu]
       (--img-dir DIR writes the PNGs somewhere other than docs/img)
Numbers are copied from the JSON files, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SEED_B = ("fmnist-standard", "fmnist-dro-at", "fmnist-input-perturbation")
SEED_A = ("fmnist-noisy-standard", "fmnist-noisy-equivariant-random", "fmnist-noisy-equivariant-adversarial")
SEED_A_CLEAN = "fmnist-standard"
CM = ("fmnist-cd", "fmnist-cd-at")
SAMPLERS = (("ddim", "DDIM"), ("dpm-solver++", "DPM-Solver++"))

Row = dict[str, Any]
Draw = Callable[[Any], None]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """Print one Markdown table."""
    head = list(header)
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def quality_reports(root: Path) -> dict[str, dict[str, Any]]:
    """quality.json of every model under ``root/quality``, by model name."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "quality").glob("*/quality.json")):
        rep = json.loads(path.read_text())
        out[rep["model"]["name"]] = rep
    return out


def robust_reports(root: Path) -> dict[str, dict[str, Any]]:
    """robust.json of every run under ``root/robust``, by run directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((root / "robust").glob("*/robust.json"))}


def train_runs(root: Path) -> dict[str, list[Row]]:
    """The metrics.jsonl records of every training run, by run name."""
    return {
        p.name.removesuffix(".metrics.jsonl"): _jsonl(p)
        for p in sorted((root / "train").glob("*.metrics.jsonl"))
    }


def _fd_rows(rep: dict[str, Any], sampler: str) -> list[Row]:
    return sorted((r for r in rep["results"] if r["sampler"] == sampler), key=lambda r: r["nfe"])


def _feature_net(quality: dict[str, dict[str, Any]]) -> str:
    """The feature network's name as the reports give it ("fmnist-classifier (penultimate layer)")."""
    nets = {rep.get("feature_network", "?").split(" (")[0] for rep in quality.values()}
    return "/".join(sorted(nets))


# ---------------------------------------------------------------- tables


def print_quality(quality: dict[str, dict[str, Any]]) -> None:
    rows = []
    for name, rep in sorted(quality.items()):
        for r in rep["results"]:
            rows.append(
                (
                    name,
                    r["sampler"],
                    r["nfe"],
                    r["n"],
                    f"{r['fd']:.2f}",
                    f"{r['precision']:.3f}",
                    f"{r['recall']:.3f}",
                    f"{r['coverage']:.3f}" if "coverage" in r else "-",
                    f"{r['sampling_s_per_image']:.4f}",
                )
            )
    _table(("model", "sampler", "NFE", "n", "FD", "precision", "recall", "coverage", "s/image"), rows)
    refs = {json.dumps(rep["reference"], sort_keys=True): rep for rep in quality.values()}
    for rep in refs.values():
        ref = rep["reference"]
        print(
            f"\nreference ({ref['what']}): FD {ref['fd']:.3f}, precision {ref['precision']:.3f}, "
            f"recall {ref['recall']:.3f}; features: {rep.get('feature_network')}; real set: {rep.get('real_set')}"
        )
    machines = sorted({rep["machine"] for rep in quality.values()})
    dates = sorted(rep["date"] for rep in quality.values())
    if dates:
        print(f"{'; '.join(machines)}; {dates[0]} to {dates[-1]}")


def print_robust(robust: dict[str, dict[str, Any]]) -> None:
    rows = []
    for run, rep in sorted(robust.items()):
        for r in rep["results"]:
            ci = r.get("majority_ci95")
            rows.append(
                (
                    run,
                    r["defense"],
                    r["attack"],
                    r["eps"],
                    r.get("attack_steps", "-"),
                    r.get("eot", "-"),
                    r["n"],
                    r["draws"],
                    _pct(r["mean"]),
                    _pct(r["worst"]),
                    _pct(r["majority"]),
                    f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "-",
                )
            )
    _table(
        (
            "run",
            "defence",
            "attack",
            "eps",
            "PGD steps",
            "EOT",
            "n",
            "R",
            "mean %",
            "worst-of-R %",
            "majority %",
            "majority 95% CI",
        ),
        rows,
    )
    for run, rep in sorted(robust.items()):
        s = rep["sanity"]
        steps = all(x["non_increasing"] for x in s["non_increasing_in_steps"])
        big = s.get("large_eps", {})
        pur = rep["purifier"]
        print(
            f"\n{run}: model {rep['model']['name']}, purifier t*={pur['t_star']} {pur['sampler']} "
            f"{pur['steps']} steps, step size {rep['step_size']}; gradients finite {s['gradients_finite']}, "
            f"non-zero {s['gradients_nonzero']}; non-increasing in steps {steps} (tolerance {s['tolerance']}); "
            f"eps={big.get('eps')} ({big.get('attack')}, n={big.get('n')}): mean {big.get('mean')}, "
            f"majority {big.get('majority')}"
        )
        print(f"command: `{rep['command']}`; {rep['machine']}; {rep['date']}")


def print_consistency(rep: dict[str, Any] | None) -> None:
    if rep is None:
        print("(no bench_consistency_gpu.json)")
        return
    _table(
        ("model", "task", "sampler", "steps", "batch", "repeats", "images/s", "ms/call"),
        (
            (
                r["model"],
                r["task"],
                r["sampler"],
                r["steps"],
                r["batch"],
                r["repeats"],
                f"{r['images_per_s']:.1f}",
                f"{r['ms_per_call']:.2f}",
            )
            for r in rep["rows"]
        ),
    )
    summary = rep.get("summary", {})
    targets = summary.get("targets", {})
    print(
        "\nsummary: "
        + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if not isinstance(v, dict))
        + (f"; targets: {targets}" if targets else "")
    )
    print(f"command: `{rep['command']}`; {rep['device']}, {rep['machine']}; {rep['date']}")


def print_train(runs: dict[str, list[Row]], budgets: dict[str, Any] | None) -> None:
    rows = []
    for run, recs in sorted(runs.items()):
        end = next((r for r in reversed(recs) if r.get("event") == "end"), None)
        budget = (budgets or {}).get(run, {})
        if end is None:
            last = recs[-1]
            rows.append((run, last["update"], "-", f"{last['wall_s']:.0f}", "-", "-", "-", "(no end record)"))
            continue
        rows.append(
            (
                run,
                end["update"],
                budget.get("updates", "-"),
                f"{end['wall_s']:.0f}",
                f"{end['final_loss']:.4f}",
                f"{end['update'] / end['wall_s']:.2f}",
                budget.get("probe_updates_per_s", "-"),
                end.get("stopped") or "-",
            )
        )
    _table(
        (
            "run",
            "updates",
            "planned",
            "wall s",
            "final loss",
            "updates/s",
            "probe updates/s",
            "stopped",
        ),
        rows,
    )
    print(
        "\nupdates/s = updates / wall s of the end record (start-up included); final loss = the end record's "
        "final_loss; planned and probe updates/s from gpu_train_budgets.json"
    )


# ---------------------------------------------------------------- plots


def _save(path: Path, panels: list[Draw], title: str, size: tuple[float, float]) -> Path:
    """Render one figure of ``len(panels)`` side-by-side axes with the headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _n_label(reps: Iterable[dict[str, Any]]) -> str:
    ns = sorted({r["n"] for rep in reps for r in rep["results"]})
    return "n=" + "/".join(str(n) for n in ns)


def plot_seed_b(quality: dict[str, dict[str, Any]], out: Path) -> Path | None:
    reps = {m: quality[m] for m in SEED_B if m in quality}
    if not reps:
        return None
    floor = next(iter(reps.values()))["reference"]["fd"]

    def panel(sampler: str, label: str) -> Draw:
        def draw(ax: Any) -> None:
            for model, rep in reps.items():
                rows = _fd_rows(rep, sampler)
                ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], "o-", label=model)
            ax.axhline(floor, color="grey", ls=":", label=f"real vs real ({floor:.2f})")
            ax.set_xscale("log")
            nfes = sorted({r["nfe"] for rep in reps.values() for r in _fd_rows(rep, sampler)})
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.minorticks_off()
            ax.set_xlabel("NFE (log scale)")
            ax.set_ylabel("FD")
            ax.set_ylim(bottom=0)
            ax.set_title(label)
            ax.legend(fontsize=8)

        return draw

    return _save(
        out / "gpu_seed_b_fd_vs_nfe.png",
        [panel(s, label) for s, label in SAMPLERS],
        f"Seed B: FD in {_feature_net(reps)} features vs NFE ({_n_label(reps.values())} samples, lower is better)",
        (10, 4.2),
    )


def plot_seed_a(quality: dict[str, dict[str, Any]], out: Path) -> Path | None:
    models = [m for m in (*SEED_A, SEED_A_CLEAN) if m in quality]
    if not any(m in quality for m in SEED_A):
        return None
    nfes = (10, 20)
    width = 0.8 / len(models)

    def draw(ax: Any) -> None:
        for i, model in enumerate(models):
            by_nfe = {r["nfe"]: r["fd"] for r in _fd_rows(quality[model], "ddim")}
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(nfes))]
            ys = [by_nfe.get(n, float("nan")) for n in nfes]
            clean = model == SEED_A_CLEAN
            label = f"{model} (clean data, reference)" if clean else model
            bars = ax.bar(xs, ys, width, label=label, hatch="//" if clean else None, alpha=0.85)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(nfes)), [f"DDIM {n} steps" for n in nfes])
        ax.set_ylabel("FD against the clean test set")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    reps = [quality[m] for m in models]
    return _save(
        out / "gpu_seed_a_fd.png",
        [draw],
        f"Seed A: FD in {_feature_net(dict(zip(models, reps, strict=True)))} features, {_n_label(reps)}\n"
        "noisy-* trained on data with 90% of images carrying Gaussian noise sigma 0.2",
        (9.5, 4.2),
    )


def plot_cm(quality: dict[str, dict[str, Any]], out: Path) -> Path | None:
    reps = {m: quality[m] for m in CM if m in quality}
    if not reps:
        return None

    def draw(ax: Any) -> None:
        steps: set[int] = set()
        for model, rep in reps.items():
            rows = _fd_rows(rep, "consistency")
            steps |= {r["nfe"] for r in rows}
            ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], "o-", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(steps), [str(s) for s in sorted(steps)])
        ax.minorticks_off()
        ax.set_xlabel("consistency sampling steps (= NFE)")
        ax.set_ylabel("FD")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)

    return _save(
        out / "gpu_cm_fd_vs_steps.png",
        [draw],
        f"Consistency models: FD in {_feature_net(reps)} features\nvs sampling steps ({_n_label(reps.values())})",
        (6, 4.2),
    )


def plot_robust(robust: dict[str, dict[str, Any]], out: Path, attack: str = "pgd-eot") -> Path | None:
    runs = {run: rep for run, rep in robust.items() if run.endswith("-8of255")}
    if not runs:
        return None
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors

    def panel(key: str, label: str) -> Draw:
        def draw(ax: Any) -> None:
            for i, (_, rep) in enumerate(sorted(runs.items())):
                rows = sorted(
                    (r for r in rep["results"] if r["defense"] == "purifier" and r["attack"] == attack),
                    key=lambda r: r["attack_steps"],
                )
                color = colors[i % len(colors)]
                pur = rep["purifier"]
                name = f"{rep['model']['name']} ({pur['sampler']} {pur['steps']}, n={rep['n']})"
                ax.plot(
                    [r["attack_steps"] for r in rows],
                    [r[key] for r in rows],
                    "-",
                    marker="osD^v<>"[i % 7],
                    color=color,
                    label=name,
                )
                clean = next(
                    (r for r in rep["results"] if r["defense"] == "purifier" and r["attack"] == "none"), None
                )
                if clean is not None:
                    ax.axhline(clean[key], color=color, ls="--", lw=1)
            steps = sorted(
                {r["attack_steps"] for rep in runs.values() for r in rep["results"] if "attack_steps" in r}
            )
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.set_xlabel("PGD attack steps")
            ax.set_ylabel(f"{label} accuracy")
            ax.set_ylim(0, 1)
            ax.set_title(f"{label} (dashed: purifier, no attack)", fontsize=9)

        return draw

    legend_panel = panel("mean", "mean over R draws")

    def mean_with_legend(ax: Any) -> None:
        legend_panel(ax)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    first = next(iter(runs.values()))
    eps = sorted({r["eps"] for rep in runs.values() for r in rep["results"] if r["attack"] == attack})
    eot = sorted({r["eot"] for rep in runs.values() for r in rep["results"] if r["attack"] == attack})
    return _save(
        out / "gpu_robust_vs_steps.png",
        [panel("majority", "majority vote"), mean_with_legend],
        f"Purifier + {Path(first['classifier']['path']).stem} under {attack}, L-inf eps {'/'.join(map(str, eps))} (8/255), "
        f"EOT {'/'.join(map(str, eot))}, R={first['draws']} draws",
        (13.5, 4.5),
    )


def plot_train(runs: dict[str, list[Row]], out: Path) -> Path | None:
    if not runs:
        return None
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors

    def draw(ax: Any) -> None:
        for i, (run, recs) in enumerate(sorted(runs.items())):
            pts = [r for r in recs if "loss_avg" in r]
            ls = "--" if "-cd" in run else "-"
            ax.plot(
                [r["update"] for r in pts],
                [r["loss_avg"] for r in pts],
                ls,
                marker=".",
                color=colors[i % len(colors)],
                label=run,
            )
        ax.set_yscale("log")
        ax.set_xlabel("update")
        ax.set_ylabel("training loss (mean over each logging window, log scale)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return _save(
        out / "gpu_train_loss.png",
        [draw],
        "Training loss on one H100 (dashed: consistency distillation, a different loss)",
        (9.5, 4.5),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="bench/results/gpu", type=Path)
    ap.add_argument("--img-dir", default="docs/img", type=Path)
    args = ap.parse_args(argv)
    root: Path = args.root
    quality, robust, runs = quality_reports(root), robust_reports(root), train_runs(root)
    print("\n### Sample quality\n")
    print_quality(quality)
    print("\n### Purification robustness\n")
    print_robust(robust)
    print("\n### Consistency benchmark\n")
    print_consistency(_load(root / "bench_consistency_gpu.json"))
    print("\n### Training\n")
    print_train(runs, _load(root / "train" / "gpu_train_budgets.json"))
    written = [
        plot_seed_b(quality, args.img_dir),
        plot_seed_a(quality, args.img_dir),
        plot_cm(quality, args.img_dir),
        plot_robust(robust, args.img_dir),
        plot_train(runs, args.img_dir),
    ]
    print("\nplots: " + ", ".join(str(p) for p in written if p is not None))


if __name__ == "__main__":
    main()
