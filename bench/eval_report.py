"""Print the docs/RESULTS.md tables from the JSON that ``bench/eval_served.sh`` wrote.

usage: python bench/eval_report.py [ROOT]   (default: bench/results/eval)
Numbers are copied from the JSON files, never typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.bench_cli import BenchParser


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_ci95"]
    return f"{100 * row[key]:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _opt(row: dict[str, Any], key: str) -> str:
    """A metric that reports written before it existed lack (density/coverage came in later)."""
    return f"{row[key]:.3f}" if key in row else "-"


def quality(root: Path) -> None:
    print("| model | sampler | NFE | n | FD | precision | recall | coverage | s/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        for sub in ("quality-ddim", "quality-dpmpp"):
            rep = _load(model / sub / "quality.json")
            if rep is None:
                continue
            for r in rep["results"]:
                print(
                    f"| {model.name} | {r['sampler']} | {r['nfe']} | {r['n']} | {r['fd']:.2f} | {r['precision']:.3f} "
                    f"| {r['recall']:.3f} | {_opt(r, 'coverage')} | {r['sampling_s_per_image']:.3f} |"
                )
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        rep = _load(model / "quality-ddim" / "quality.json")
        if rep is not None:
            ref = rep["reference"]
            print(
                f"\n{model.name}: {ref['what']}: FD {ref['fd']:.2f}, precision {ref['precision']:.3f}, recall {ref['recall']:.3f}"
            )
            print(f"command: `{rep['command']}`; {rep['machine']}; {rep['date']}")


def robust(root: Path) -> None:
    print(
        "| model | defence | attack | eps | PGD steps | EOT | mean % [95% CI] | worst-of-R % | majority % [95% CI] | attack s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        rep = _load(model / "robust-linf" / "robust.json")
        if rep is None:
            continue
        top = max(r.get("attack_steps", 0) for r in rep["results"])
        for r in rep["results"]:
            if r.get("attack_steps", top) != top:
                continue
            print(
                f"| {model.name} | {r['defense']} | {r['attack']} | {r['eps']} | {r.get('attack_steps', '-')} | {r.get('eot', '-')} "
                f"| {_ci(r, 'mean')} | {100 * r['worst']:.1f} | {_ci(r, 'majority')} | {r.get('attack_wall_s', '-')} |"
            )
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        rep = _load(model / "robust-linf" / "robust.json")
        if rep is None:
            continue
        s = rep["sanity"]
        steps = all(x["non_increasing"] for x in s["non_increasing_in_steps"])
        eot = (
            all(x["non_increasing"] for x in s["non_increasing_in_eot"])
            if s["non_increasing_in_eot"]
            else None
        )
        big = s.get("large_eps", {})
        print(
            f"\n{model.name}: n={rep['n']}, R={rep['draws']}, purifier {rep['purifier']}, step {rep['step_size']}; "
            f"gradients finite {s['gradients_finite']}, non-zero {s['gradients_nonzero']}; non-increasing in steps {steps}, "
            f"in EOT {eot} (tolerance {s['tolerance']}); eps={big.get('eps')} ({big.get('attack')}, n={big.get('n')}): "
            f"mean {big.get('mean')}, majority {big.get('majority')}; purification latency "
            f"{rep['results'][1]['latency_s_per_purification']:.4f} s/image"
        )
        print(f"command: `{rep['command']}`; {rep['machine']}; {rep['date']}")


def corruption(root: Path) -> None:
    notes: list[str] = []
    print("| model | images | t* | PSNR dB | SSIM | accuracy % [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        rep = _load(model / "corruption" / "corruption.json")
        if rep is None:
            continue
        for r in rep["results"]:
            print(
                f"| {model.name} | {r['images']} | {r['t_star']} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {_ci(r, 'accuracy')} |"
            )
        notes.append(f"{model.name}: `{rep['command']}`; {rep['machine']}; {rep['date']}")
    print("\n" + "\n\n".join(notes))


def combined_plots(root: Path) -> None:
    """One FD-vs-NFE and one robust-accuracy-vs-eps plot across the served models."""
    from models.evaluation.common import save_plot

    models = sorted(p for p in root.iterdir() if p.is_dir())

    def fd(ax: Any) -> None:
        for model in models:
            for sub, style in (("quality-ddim", "o-"), ("quality-dpmpp", "s--")):
                rep = _load(model / sub / "quality.json")
                if rep is not None:
                    rows = rep["results"]
                    label = f"{model.name}, {rows[0]['sampler']}"
                    ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], style, label=label)
        ax.set_xlabel("NFE")
        ax.set_ylabel("Frechet distance (n=200)")
        ax.set_title("FD in the feature space of fmnist-classifier (penultimate layer)", fontsize=9)
        ax.legend(fontsize=7)

    def rob(ax: Any) -> None:
        for model in models:
            rep = _load(model / "robust-linf" / "robust.json")
            if rep is None:
                continue
            rows = rep["results"]
            top = max(r.get("attack_steps", 0) for r in rows)
            eot = max(r.get("eot") or 0 for r in rows)
            clean = next(r for r in rows if r["defense"] == "purifier" and r["attack"] == "none")
            for attack, style in (("pgd-eot", "o-"), ("classifier-only", "x:")):
                pts = [
                    r
                    for r in rows
                    if r["defense"] == "purifier"
                    and r["attack"] == attack
                    and r.get("attack_steps") == top
                    and r.get("eot") == (1 if attack == "classifier-only" else eot)
                ]
                xs = [0.0] + [r["eps"] for r in pts]
                ys = [clean["majority"]] + [r["majority"] for r in pts]
                ax.plot(xs, ys, style, label=f"{model.name}, {attack}")
        ax.set_xlabel("eps (L-inf, [0, 1] scale)")
        ax.set_ylabel("majority-vote accuracy behind the purifier")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Purification robustness (reduced CPU budget, see RESULTS.md)", fontsize=9)
        ax.legend(fontsize=7)

    save_plot(root / "fd_vs_nfe.png", fd)
    save_plot(root / "robust_vs_eps.png", rob)


def main() -> None:
    p = BenchParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "root",
        nargs="?",
        default="bench/results/eval",
        help="folder eval_served.sh wrote (default: %(default)s)",
    )
    root = Path(p.parse_args().root)
    if not root.is_dir():
        p.error(f"root: {root} is not a folder")
    for title, fn in (
        ("Sample quality", quality),
        ("Purification robustness", robust),
        ("Corruption removal", corruption),
    ):
        print(f"\n### {title}\n")
        fn(root)
    combined_plots(root)


if __name__ == "__main__":
    main()
