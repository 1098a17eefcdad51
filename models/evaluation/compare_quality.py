"""``eval compare-quality``: two arms of ``eval quality`` reports, one report per training seed, paired.

One model's FD has two sources of noise: which samples were drawn (the bootstrap interval inside
each report) and which training run produced it (seed, data order). Two training methods are told
apart only by the second: per setting (sampler, steps) this pairs arm A's report for seed i with
arm B's report for seed i and reports, for FD and the unbiased KID, each arm's mean over seeds with a
95% t interval (each seed's own bootstrap interval kept beside it), the paired relative difference
(A - B) / mean(B) with its t interval and the exact sign-flip p over the seeds
(``models.evaluation.seeds.paired``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.evaluation.cli import check
from models.evaluation.common import now_utc
from models.evaluation.seeds import paired
from models.paths import output_dir

METRICS = ("fd", "kid")
SAME_FIELDS = ("feature_network", "real_set", "kid")  # what makes two reports' numbers comparable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--a",
        nargs="+",
        required=True,
        metavar="REPORT",
        help="arm A: quality.json files (or folders), seed order",
    )
    p.add_argument(
        "--b", nargs="+", required=True, metavar="REPORT", help="arm B: the same seeds in the same order"
    )
    p.add_argument("--names", nargs=2, default=["A", "B"], metavar=("A", "B"), help="the arms' names")
    p.add_argument("--out", default="eval-compare-quality", help="output folder (compare_quality.json/.png)")


def _read(path_text: str) -> tuple[Path, dict[str, Any]]:
    path = Path(path_text)
    if path.is_dir():
        path = path / "quality.json"
    check(path.is_file(), "reports", f"{path} does not exist")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError("reports", f"{path} is not JSON ({err})") from err
    rows = report.get("results") if isinstance(report, dict) else None
    check(
        isinstance(rows, list)
        and bool(rows)
        and all(isinstance(r, dict) and "sampler" in r and "fd" in r for r in rows),
        "reports",
        f"{path} is not an eval quality report (no results with sampler and fd)",
    )
    check(
        all("kid" in r and "fd_ci95" in r and "kid_ci95" in r for r in rows or []),
        "reports",
        f"{path} has no KID or bootstrap intervals (written before they were stored); rerun its eval quality command",
    )
    return path, report


def _settings(report: dict[str, Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(r["sampler"], int(r["steps"]), int(r["n"])): r for r in report["results"]}


def compare_arms(
    a: list[tuple[Path, dict[str, Any]]], b: list[tuple[Path, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Per (sampler, steps, n): each arm over seeds and the paired A - B; refuses what cannot be paired."""
    check(
        len(a) == len(b),
        "reports",
        f"arm A has {len(a)} reports and arm B {len(b)}: give one report per training seed, the same seeds in both",
    )
    check(len(a) >= 2, "reports", "a paired test across training seeds needs at least 2 seeds per arm")
    paths = [str(p) for p, _ in [*a, *b]]
    check(
        len(set(paths)) == len(paths), "reports", "a report is listed twice: each seed's report once per arm"
    )
    first_path, first = a[0]
    for path, report in [*a, *b]:
        for field in SAME_FIELDS:
            check(
                report.get(field) == first.get(field),
                "reports",
                f"{path} and {first_path} differ in {field} ({report.get(field)!r} vs {first.get(field)!r}): "
                "their numbers are not comparable",
            )
    settings = _settings(first)
    for path, report in [*a, *b]:
        check(
            set(_settings(report)) == set(settings),
            "reports",
            f"{path} measured other settings than {first_path} "
            f"({sorted(_settings(report))} vs {sorted(settings)}); rerun with the same --sampler, --steps and --n",
        )
    rows = []
    for key in settings:
        sampler, steps, n = key
        row: dict[str, Any] = {"sampler": sampler, "steps": steps, "n": n, "seeds": len(a)}
        for metric in METRICS:
            va = [_settings(r)[key][metric] for _, r in a]
            vb = [_settings(r)[key][metric] for _, r in b]
            row[metric] = paired(va, vb) | {
                "a_per_seed": [
                    [v, _settings(r)[key][metric + "_ci95"]] for v, (_, r) in zip(va, a, strict=True)
                ],
                "b_per_seed": [
                    [v, _settings(r)[key][metric + "_ci95"]] for v, (_, r) in zip(vb, b, strict=True)
                ],
            }
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    output_dir(args.out, "out")
    a = [_read(p) for p in args.a]
    b = [_read(p) for p in args.b]
    rows = compare_arms(a, b)
    name_a, name_b = args.names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": args.command_line,
        "date": now_utc(),
        "a": {"name": name_a, "reports": [str(p) for p, _ in a]},
        "b": {"name": name_b, "reports": [str(p) for p, _ in b]},
        "feature_network": a[0][1].get("feature_network"),
        "metric": "per arm: mean over training seeds, 95% t interval; difference A - B paired by seed "
        "(t interval, exact sign-flip p); each seed's value with its own bootstrap interval",
        "results": rows,
    }
    (out / "compare_quality.json").write_text(json.dumps(report, indent=2))
    _plot(rows, name_a, name_b, out / "compare_quality.png")
    print(
        f"A = {name_a} ({len(a)} seeds), B = {name_b}; FD/KID in the feature space of {report['feature_network']}"
    )
    print(
        f"{'setting':22} {'metric':6} {'A mean [95% CI]':>26} {'B mean [95% CI]':>26} {'(A-B)/B [95% CI]':>26} {'p':>6}"
    )
    for r in rows:
        for metric in METRICS:
            m = r[metric]
            fmt = (lambda v: f"{v:.4f}") if metric == "kid" else (lambda v: f"{v:.3f}")
            arm = [f"{fmt(x['mean'])} [{fmt(x['ci95'][0])}, {fmt(x['ci95'][1])}]" for x in (m["a"], m["b"])]
            lo, hi = m["relative_ci95"]
            rel = f"{100 * m['relative']:+.1f}% [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
            print(
                f"{r['sampler'] + ' ' + str(r['steps']) + ' steps':22} {metric:6} {arm[0]:>26} {arm[1]:>26} "
                f"{rel:>26} {m['sign_flip_p']:6.3f}"
            )
    return 0


def _plot(rows: list[dict[str, Any]], name_a: str, name_b: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 0.5 * len(rows) + 2), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes[0], METRICS, strict=True):
        rel = [100 * r[metric]["relative"] for r in rows]
        lo = [100 * (r[metric]["relative"] - r[metric]["relative_ci95"][0]) for r in rows]
        hi = [100 * (r[metric]["relative_ci95"][1] - r[metric]["relative"]) for r in rows]
        ax.errorbar(rel, ys, xerr=[lo, hi], fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=0.8)
        labels = [f"{r['sampler']} {r['steps']} (p={r[metric]['sign_flip_p']:.3f})" for r in rows]
        ax.set_yticks(ys, labels, fontsize=7)
        ax.set_xlabel(f"{metric.upper()}: ({name_a} - {name_b}) / {name_b}, % (95% paired t CI)", fontsize=8)
        ax.set_title(f"{rows[0]['seeds']} training seeds per arm, paired", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
