"""Robust accuracy vs a purifier setting: one point per ``eval robust`` report, placed at its purifier's
NFE (cost) or its t* (depth).

usage: python bench/robust_vs_purifier.py REPORT_DIR [REPORT_DIR ...] --out DIR [--x nfe|t_star]
       [--attack pgd-eot] [--eps E]

Each REPORT_DIR holds the ``robust.json`` of one purifier (model, sampler, steps, t*); ``--eps``
picks one radius from reports that swept several. The reports must share n, draws, threat, eps and
attack budget, so the points differ only in the purifier; the attacked point is the report's
largest PGD step count. A line joins the points of one model and kind (``--x nfe``) or of one
model, sampler and step count (``--x t_star``). Writes ``DIR/robust_vs_<x>.json`` and ``.png``
(majority vote with its 95% CI, mean over draws dashed, clean accuracy dotted) and prints a
Markdown table. Numbers are copied from the reports, never typed by hand.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from models.bench_cli import BenchParser
from models.errors import UserError
from models.evaluation.common import machine_description, now_utc, save_plot
from models.paths import output_dir

SHARED = ("threat", "n", "draws")


def _load(folder: Path) -> dict[str, Any]:
    path = folder / "robust.json"
    if not path.is_file():
        sys.exit(f"{folder}: no robust.json (run `robustdiff eval robust --out {folder}` first)")
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def _point(folder: Path, attack: str, eps: float | None) -> dict[str, Any]:
    """Clean and attacked accuracy of one report's purifier, at the report's longest attack."""
    rep = _load(folder)
    rows = [r for r in rep["results"] if r["defense"] == "purifier"]
    clean = next((r for r in rows if r["attack"] == "none"), None)
    attacked = [r for r in rows if r["attack"] == attack and (eps is None or abs(r["eps"] - eps) < 1e-9)]
    if clean is None or not attacked:
        sys.exit(
            f"{folder}: the report needs the attacks 'none' and {attack!r}"
            + (f" at eps {eps}" if eps else "")
        )
    radii = {r["eps"] for r in attacked}
    if len(radii) != 1:
        sys.exit(f"{folder}: {attack} ran at several eps {sorted(radii)}; pick one with --eps")
    longest = max(attacked, key=lambda r: (r.get("attack_steps", 0), r.get("eot", 0)))
    pur = rep["purifier"]
    return {
        "report": str(folder),
        "model": rep["model"]["name"],
        "sampler": pur["sampler"],
        "steps": pur["steps"],
        "nfe": pur["nfe"],
        "t_star": pur["t_star"],
        "threat": rep["threat"],
        "eps": longest["eps"],
        "n": rep["n"],
        "draws": rep["draws"],
        "attack": attack,
        "attack_steps": longest.get("attack_steps"),
        "eot": longest.get("eot"),
        "attack_wall_s": longest.get("attack_wall_s"),
        "clean_majority": clean["majority"],
        "majority": longest["majority"],
        "majority_ci95": longest["majority_ci95"],
        "mean": longest["mean"],
        "worst": longest["worst"],
        "latency_s_per_purification": clean.get("latency_s_per_purification"),
        "date": rep["date"],
        "machine": rep["machine"],
    }


AXES = {
    "nfe": ("purifier network evaluations (NFE)", lambda pt: (pt["model"], pt["sampler"] == "consistency")),
    "t_star": ("purification depth t*", lambda pt: (pt["model"], pt["sampler"], pt["steps"])),
}


def _label(series: tuple[Any, ...], axis: str) -> str:
    if axis == "nfe":
        model, cm = series
        return f"{model} ({'consistency' if cm else 'diffusion'})"
    model, sampler, steps = series
    return f"{model}, {sampler} {steps}"


def _dodge(x: float, i: int, count: int, axis: str) -> float:
    """Where series i of count is drawn at x: side by side, so points of equal x do not hide each other.

    Only the drawing moves (by 1% of an octave of NFE, or 0.004 of t*); the JSON keeps x.
    """
    offset = i - (count - 1) / 2
    return x * 2 ** (0.01 * offset) if axis == "nfe" else x + 0.004 * offset


def main() -> None:
    p = BenchParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="REPORT_DIR")
    p.add_argument("--x", choices=tuple(AXES), default="nfe", help="what the points are placed at")
    p.add_argument("--attack", default="pgd-eot", help="attack whose accuracy is plotted")
    p.add_argument("--eps", type=float, help="the radius to read from reports that swept several")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    try:
        out = output_dir(args.out, "out")
    except UserError as err:
        p.error(str(err))
    axis = args.x
    xlabel, series_of = AXES[axis]
    points = sorted(
        (_point(Path(f), args.attack, args.eps) for f in args.reports),
        key=lambda r: (r["sampler"], r["steps"], r["nfe"], r["t_star"]),
    )
    for key in (*SHARED, "eps", "attack_steps", "eot"):
        if len({pt[key] for pt in points}) > 1:
            sys.exit(f"the reports differ in {key}: {sorted({str(pt[key]) for pt in points})}")
    first = points[0]
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": shlex.join(["python", *sys.argv]),
        "date": now_utc(),
        "machine": machine_description(),
    }
    (out / f"robust_vs_{axis}.json").write_text(json.dumps(summary | {"points": points}, indent=2))

    def draw(ax: Any) -> None:
        all_series = list(dict.fromkeys(series_of(pt) for pt in points))
        for i, series in enumerate(all_series):
            pts = sorted((pt for pt in points if series_of(pt) == series), key=lambda pt: pt[axis])
            color = f"C{i}"
            xs = [_dodge(pt[axis], i, len(all_series), axis) for pt in pts]
            err = [
                [100 * (pt["majority"] - pt["majority_ci95"][0]) for pt in pts],
                [100 * (pt["majority_ci95"][1] - pt["majority"]) for pt in pts],
            ]
            maj = [100 * pt["majority"] for pt in pts]
            ax.errorbar(xs, maj, yerr=err, marker="o", capsize=3, color=color, label=_label(series, axis))
            ax.plot(xs, [100 * pt["mean"] for pt in pts], ls="--", marker=".", color=color)
            clean = [100 * pt["clean_majority"] for pt in pts]
            ax.plot(xs, clean, ls=":", marker="s", mfc="none", color=color)
        for style, marker, text in (
            ("-", "o", "majority [95% CI]"),
            ("--", ".", "mean over draws"),
            (":", "s", "clean (majority)"),
        ):
            ax.plot([], [], ls=style, marker=marker, mfc="none", color="0.3", label=text)
        if axis == "nfe":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy % (R={first['draws']})")
        ax.set_title(
            f"{first['threat']} eps {first['eps']}: {args.attack} {first['attack_steps']} steps, "
            f"EOT {first['eot']}, n={first['n']}",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)

    save_plot(out / f"robust_vs_{axis}.png", draw)
    print(
        "| purifier | t* | NFE | clean (majority) | attacked: majority [95% CI] | mean | worst-of-R "
        "| s per purification | attack s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for pt in points:
        lo, hi = pt["majority_ci95"]
        latency = pt["latency_s_per_purification"]
        print(
            f"| {pt['model']}, {pt['sampler']} {pt['steps']} | {pt['t_star']} | {pt['nfe']} "
            f"| {100 * pt['clean_majority']:.1f} "
            f"| {100 * pt['majority']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * pt['mean']:.1f} "
            f"| {100 * pt['worst']:.1f} | {'-' if latency is None else f'{latency:.4f}'} | {pt['attack_wall_s']} |"
        )


if __name__ == "__main__":
    main()
