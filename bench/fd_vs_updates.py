"""Learning curves: Frechet distance of every training checkpoint of one or more runs, and a plot.

usage: python bench/fd_vs_updates.py cd=runs/cd cd-at=runs/cd-at --steps 1,2 --n 2000 --out DIR

Each run folder's ``checkpoints/step-*.json`` is exported (its EMA weights, as ``robustdiff export``
would) to ``DIR/<label>/step-<updates>.safetensors`` and measured with ``robustdiff eval quality``
(same seeds, same feature network, same real subset for every checkpoint), so the curves compare
runs at equal parameter updates. Evaluations whose ``quality.json`` already exists are reused, so
an interrupted sweep continues where it stopped. Writes ``DIR/fd_vs_updates.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from models.bench_cli import BenchParser, positive_int
from models.errors import UserError
from models.evaluation.classifier import DEFAULT_CLASSIFIER
from models.evaluation.cli import parse_list
from models.evaluation.common import machine_description, now_utc, save_plot
from models.paths import output_dir
from models.train.export import export_checkpoint

STEP = re.compile(r"step-(\d+)\.json$")
QUALITY_K = 3
"""``eval quality``'s default k of the k-NN metrics: it needs more samples than that."""
METRICS = ("sampler", "steps", "n", "fd", "precision", "recall", "coverage")


def _runs(specs: list[str]) -> list[tuple[str, Path]]:
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            sys.exit(f"run {spec!r}: expected LABEL=RUN_FOLDER")
        if not (Path(path) / "checkpoints").is_dir():
            sys.exit(f"run {spec!r}: {path}/checkpoints does not exist")
        runs.append((label, Path(path)))
    return runs


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run.glob("checkpoints/step-*.json") if (m := STEP.search(p.name))]
    return sorted(found)


def _evaluate(ckpt: Path, served: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    report = out / "quality.json"
    if not report.is_file():
        served.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(ckpt, served)
        cmd = ["eval", "quality", "--model", str(served), "--sampler", args.sampler]
        cmd += ["--steps", args.steps, "--n", str(args.n), "--classifier", args.classifier, "--out", str(out)]
        print("+ robustdiff", shlex.join(cmd), flush=True)
        done = subprocess.run([sys.executable, "-m", "service.cli", *cmd], check=False)  # the venv's
        if done.returncode:
            sys.exit(f"eval quality of {served} failed (exit {done.returncode}); its message is above")
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def main() -> None:
    p = BenchParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_FOLDER")
    p.add_argument("--sampler", default="consistency")
    p.add_argument("--steps", default="1,2", help="comma-separated step counts")
    p.add_argument(
        "--n", type=positive_int, default=2000, help="generated samples per checkpoint and step count (>= 4)"
    )
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="feature network (safetensors)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.n <= QUALITY_K:
        p.error(f"--n: eval quality's k-NN metrics need more than k={QUALITY_K} samples, got {args.n}")
    try:
        out = output_dir(args.out, "out")
        parse_list(args.steps, int, "steps")
    except UserError as err:
        p.error(str(err))
    rows: list[dict[str, Any]] = []
    for label, run in _runs(args.runs):
        for updates, ckpt in _checkpoints(run):
            name = f"step-{updates:08d}"
            report = _evaluate(ckpt, out / label / f"{name}.safetensors", out / label / name, args)
            where = {"run": label, "folder": str(run), "updates": updates, "hash": report["model"]["hash"]}
            rows += [where | {k: r[k] for k in METRICS} for r in report["results"]]
    summary = {
        "command": shlex.join(["python", *sys.argv]),
        "date": now_utc(),
        "machine": machine_description(),
        "feature_network": args.classifier,
        "results": rows,
    }
    (out / "fd_vs_updates.json").write_text(json.dumps(summary, indent=2))

    def draw(ax: Any) -> None:
        for label in dict.fromkeys(r["run"] for r in rows):
            for steps in sorted({r["steps"] for r in rows}):
                pts = [r for r in rows if r["run"] == label and r["steps"] == steps]
                ax.plot(
                    [r["updates"] for r in pts],
                    [r["fd"] for r in pts],
                    marker="o",
                    label=f"{label}, {steps} step(s)",
                )
        ax.set_xlabel("parameter updates")
        ax.set_ylabel(f"Frechet distance (classifier features, n={args.n})")
        ax.set_title("sample quality vs training updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    save_plot(out / "fd_vs_updates.png", draw)
    print("| run | updates | steps | FD | precision | recall | coverage |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['run']} | {r['updates']} | {r['steps']} | {r['fd']:.2f} | {r['precision']:.3f} "
            f"| {r['recall']:.3f} | {r['coverage']:.3f} |"
        )


if __name__ == "__main__":
    main()
