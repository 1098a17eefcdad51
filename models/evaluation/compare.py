"""``eval compare``: two ``eval robust`` reports, paired image by image, setting by setting.

Two purifiers attacked on the same test images are strongly correlated: most images are right (or
wrong) for both. Two separate Wilson intervals ignore that and overlap long after the models differ;
the paired view counts only the images on which they disagree. Per setting it reports McNemar's
exact test and Newcombe's (1998, method 10) interval for the difference in majority-vote accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.evaluation.cli import check
from models.evaluation.common import now_utc, save_plot, wilson_interval
from models.paths import output_dir

KEY_FIELDS = ("defense", "attack", "eps", "eot", "attack_steps")
_BITS = re.compile("[01]+")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs=2, metavar="REPORT", help="two robust.json files (or their folders): A B")
    p.add_argument("--out", default="eval-compare", help="output folder (compare.json and compare.png)")


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant images split as a fair coin would split them."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**m)  # exact integers, no underflow at large m


def paired_difference_interval(both: int, a_only: int, b_only: int, neither: int) -> tuple[float, float]:
    """95% interval for p_A - p_B from paired outcomes: Newcombe's hybrid score method 10.

    The two Wilson intervals are combined with the (continuity-corrected) correlation of the pairs,
    so the interval narrows as the models agree more; it stays inside [-1, 1].
    """
    n = both + a_only + b_only + neither
    if n <= 0:
        raise ValueError("no images")
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n)
    l2, u2 = wilson_interval(both + b_only, n)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    cross = both * neither - a_only * b_only
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The setting a row measured; reports from before ``--restarts`` and ``--loss`` attacked
    once, on the cross-entropy."""
    if row["attack"] == "none":
        return (*(row.get(k) for k in KEY_FIELDS), None, None)
    return (*(row.get(k) for k in KEY_FIELDS), row.get("restarts", 1), row.get("loss", "ce"))


def _label(row: dict[str, Any]) -> str:
    defense = "undefended" if row["defense"] == "none" else row["defense"]
    if row["attack"] == "none":
        return f"{defense}, clean"
    restarts = row.get("restarts", 1)
    label = f"{defense}, {row['attack']} eps {row['eps']:g} EOT {row['eot']}, {row['attack_steps']} steps"
    loss = row.get("loss", "ce")
    return (
        label
        + (f", {restarts} restarts" if restarts > 1 else "")
        + (f", {loss} loss" if loss != "ce" else "")
    )


def compare_rows(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> list[dict[str, Any]]:
    """Pair the settings both reports measured, on the test images both contain (the first n)."""
    for report, name in zip((a, b), names, strict=True):
        check(
            all(isinstance(r, dict) and "attack" in r and "defense" in r for r in report["results"]),
            "reports",
            f"{name} is not an eval robust report (a result without defense and attack)",
        )
        missing = [r for r in report["results"] if "majority_per_image" not in r]
        check(
            not missing,
            "reports",
            f"{name} has no per-image outcomes (written before they were stored); rerun its command, "
            "which reuses the stored attack and only evaluates",
        )
        malformed = [
            r["majority_per_image"]
            for r in report["results"]
            if not isinstance(r["majority_per_image"], str) or not _BITS.fullmatch(r["majority_per_image"])
        ]
        check(
            not malformed,
            "reports",
            f"{name}: majority_per_image must be a non-empty string of 0s and 1s, got {str(malformed[:1])[:60]}",
        )
    b_rows = {_key(r): r for r in b["results"]}
    rows = []
    for ra in a["results"]:
        rb = b_rows.get(_key(ra))
        if rb is None:
            continue
        bits_a, bits_b = ra["majority_per_image"], rb["majority_per_image"]
        n = min(len(bits_a), len(bits_b))
        pairs = list(zip(bits_a[:n], bits_b[:n], strict=True))
        both, a_only = pairs.count(("1", "1")), pairs.count(("1", "0"))
        b_only, neither = pairs.count(("0", "1")), pairs.count(("0", "0"))
        lo, hi = paired_difference_interval(both, a_only, b_only, neither)
        rows.append(
            {
                **{k: ra.get(k) for k in KEY_FIELDS},
                "setting": _label(ra),
                "n": n,
                "majority_a": (both + a_only) / n,
                "majority_b": (both + b_only) / n,
                "majority_a_ci95": list(wilson_interval(both + a_only, n)),
                "majority_b_ci95": list(wilson_interval(both + b_only, n)),
                "difference": (a_only - b_only) / n,
                "difference_ci95": [lo, hi],
                "a_only": a_only,
                "b_only": b_only,
                "both": both,
                "neither": neither,
                "mcnemar_p": mcnemar_exact_p(a_only, b_only),
            }
        )
    check(bool(rows), "reports", "the two reports share no setting (defense, attack, eps, EOT, PGD steps)")
    return rows


def _read(path_text: str) -> tuple[Path, dict[str, Any]]:
    path = Path(path_text)
    if path.is_dir():
        path = path / "robust.json"
    check(path.is_file(), "reports", f"{path} does not exist")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError("reports", f"{path} is not JSON ({err})") from err
    check(
        isinstance(report, dict) and isinstance(report.get("results"), list),
        "reports",
        f"{path} is not an eval robust report (no results list)",
    )
    return path, report


def _describe(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": str(path),
        "model": report.get("model"),
        "purifier": report.get("purifier"),
        "classifier_hash": (report.get("classifier") or {}).get("hash"),
        "n": report.get("n"),
        "command": report.get("command"),
    }


def _name(path: Path, report: dict[str, Any], *, with_classifier: bool) -> str:
    """The model's name; with the classifier's file name when the two reports' classifiers differ,
    so that comparing two classifiers behind one purifier does not print the same name twice."""
    name = str((report.get("model") or {}).get("name", path))
    classifier = (report.get("classifier") or {}).get("path")
    return f"{name} + {Path(classifier).stem}" if with_classifier and classifier else name


def run(args: argparse.Namespace) -> int:
    output_dir(args.out, "out")
    (path_a, a), (path_b, b) = (_read(p) for p in args.reports)
    rows = compare_rows(a, b, (str(path_a), str(path_b)))
    desc_a, desc_b = _describe(path_a, a), _describe(path_b, b)
    same_classifier = (
        desc_a["classifier_hash"] is not None and desc_a["classifier_hash"] == desc_b["classifier_hash"]
    )
    name_a, name_b = (_name(p, r, with_classifier=not same_classifier) for p, r in ((path_a, a), (path_b, b)))
    warnings = []
    undefended = next((r for r in rows if r["defense"] == "none" and r["attack"] == "none"), None)
    if same_classifier and undefended is not None and undefended["a_only"] + undefended["b_only"] > 0:
        warnings.append(
            f"the same classifier disagrees with itself on {undefended['a_only'] + undefended['b_only']} "
            "clean images: the reports may not hold the same test images (or ran on different hardware)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": args.command_line,
        "date": now_utc(),
        "a": desc_a,
        "b": desc_b,
        "same_classifier": same_classifier,
        "warnings": warnings,
        "metric": "majority-vote accuracy; difference = A - B; 95% Newcombe paired interval; exact McNemar p",
        "results": rows,
    }
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    _plot(rows, name_a, name_b, out / "compare.png")
    print(f"A = {name_a} ({path_a}), B = {name_b} ({path_b})")
    print(
        f"{'setting':58} {'n':>4} {'A':>6} {'B':>6} {'A-B':>6} {'95% CI':>14} {'A only':>6} {'B only':>6} {'p':>7}"
    )
    for r in rows:
        lo, hi = r["difference_ci95"]
        print(
            f"{r['setting']:58} {r['n']:>4} {100 * r['majority_a']:6.1f} {100 * r['majority_b']:6.1f} "
            f"{100 * r['difference']:+6.1f} [{100 * lo:+5.1f}, {100 * hi:+5.1f}] {r['a_only']:>6} "
            f"{r['b_only']:>6} {r['mcnemar_p']:7.3g}"
        )
    return 0


def _plot(rows: list[dict[str, Any]], name_a: str, name_b: str, path: Path) -> None:
    def draw(ax: Any) -> None:
        ys = list(range(len(rows)))[::-1]
        d = [100 * r["difference"] for r in rows]
        lo = [100 * (r["difference"] - r["difference_ci95"][0]) for r in rows]
        hi = [100 * (r["difference_ci95"][1] - r["difference"]) for r in rows]
        ax.errorbar(d, ys, xerr=[lo, hi], fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_yticks(ys, [f"{r['setting']} (n={r['n']})" for r in rows], fontsize=6)
        ax.set_xlabel("majority-vote accuracy, A - B (points, 95% paired CI)", fontsize=8)
        ax.set_title(f"A = {name_a}, B = {name_b} (same images)", fontsize=8)

    save_plot(path, draw)
