"""Seed A and seed B on Fashion-MNIST (16x16 on a CPU, 32x32 on a GPU), several training seeds per arm, paired.

``seed-a``: 90% of the training images carry N(0, sigma^2) noise (unclamped, zero-mean); standard
vs equivariant-at (adversarial, random) with the paper's radius. A small sweep of (lambda, r_max) on
seed 0 picks the setting, then every arm runs ``--seeds`` seeds. FD/KID against the *clean* test split.

``seed-b``: pre-train standard on clean data in chunks until FD stops changing (``--plateau``) or
``--pretrain`` updates (or start from ``--init``), then fine-tune from that one checkpoint: standard
and dro-at for equal *minibatches* (dro-at spends m updates per minibatch), and standard with dro-at's
update count (``standard-equal-updates``, the control for "more updates alone"); FD/KID at NFE 5 and
10 and the exposure bias per sampling step, every arm paired against the others across seeds.
``--continue-pretrain --pretrain-report OUT.json`` extends an earlier run's pre-training curve from
its last checkpoint (same ``--work`` and ``--pretrain-chunk``) when it stopped before the plateau.

``--size 16`` (the default) reads Fashion-MNIST at 32x32 and averages it to 16x16 (``downsample``
2) for the small ``fmnist16-cpu`` preset; ``--size 32`` trains the ``fmnist`` preset on the full
32x32 images, meant for ``--device cuda`` (``bench/gpu_seeds.sh``). ``--preset`` overrides the
network (its image size set to ``--size``).

FD and KID are measured in the feature space of the project's classifier on 32x32 inputs: at 16x16
both the samples and the test images are upsampled (nearest) to 32x32 the same way; at 32x32 both
are scored as they are. Results are written after every run (``OUT.json``), so a run cut short still
reports what it finished; ``--time-limit`` ends an experiment (with its plot) before a seed that would
not finish in time.

``merge --out OUT PART.json...`` joins reports of one experiment run side by side (one process per
seed or per arm and seed, ``--first-seed K --seeds 1``; seed B's from one ``--pretrain-only``
checkpoint through ``--init``) into one report with the paired comparisons over all their runs; it
refuses parts trained or scored differently and lists the expected runs no part has.
``table OUT.json`` prints the report as the Markdown tables of docs/RESULTS.md (arm means, paired
comparisons with their plan target met or missed, seed B's exposure bias per step). ``trend --out OUT
A.json B.json...`` sets seed-a reports of different ``--updates`` side by side (table and plot).

    OMP_NUM_THREADS=1 nice -n 10 robustdiff bench images16 seed-a --out bench/results/images16_seed_a
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import machine

from models.bench_cli import BenchParser, positive_int
from models.data import downsample, load_fashion_mnist
from models.denoisers import EpsDenoiser
from models.devices import device_option
from models.evaluation.classifier import DEFAULT_CLASSIFIER, load_classifier
from models.evaluation.quality import extract_features, fd_of_features
from models.evaluation.seeds import bootstrap_ci, exposure_bias, kid_bootstrap, mean_ci, paired
from models.generate import generate
from models.noise import NoiseSource
from models.train.config import build
from models.train.trainer import Trainer
from models.unet import PRESETS

# Image size -> (preset, downsample factor of the 32x32 padded Fashion-MNIST images).
SIZES = {16: ("fmnist16-cpu", 2), 32: ("fmnist", 1)}
CLASSIFIER_SIZE = 32  # the evaluation classifier's input size


class Judge:
    """FD and KID of samples against the clean test split at the same size, in the classifier's
    features; 16x16 images (samples and test alike) are upsampled x2 (nearest) to its 32x32 input."""

    def __init__(self, n_real: int, size: int = 16, device: str = "cpu", data: str | None = None) -> None:
        self.device = torch.device(device)
        self.net, _ = load_classifier(DEFAULT_CLASSIFIER, self.device)
        self.scale = CLASSIFIER_SIZE // size
        test = downsample(load_fashion_mnist("test", data).images, SIZES[size][1])
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n_real]
        self.test = test[idx].to(self.device)
        self.real = self.features(self.test)

    def features(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device)
        if self.scale != 1:
            images = F.interpolate(images, scale_factor=self.scale, mode="nearest")
        return extract_features(self.net, images)

    def score(self, images: torch.Tensor) -> dict[str, Any]:
        fake = self.features(images)
        kid_value, kid_ci = kid_bootstrap(self.real, fake, rounds=30)
        return {
            "fd": fd_of_features(fake, self.real),
            "fd_ci95": bootstrap_ci(self.real, fake, fd_of_features, rounds=30),
            "kid": kid_value,
            "kid_ci95": kid_ci,
            "n": len(images),
        }


@torch.no_grad()
def samples(trainer: Trainer, steps: int, n: int) -> torch.Tensor:
    den = EpsDenoiser(trainer.ema, trainer.schedule)
    shape = tuple(trainer.data.images.shape[1:])
    return generate(den, NoiseSource(range(n), shape, trainer.device), sampler="ddim", steps=steps)


def data_config(args: Any, **fields: Any) -> dict[str, Any]:
    """Fashion-MNIST at ``args.size`` (from ``args.data`` when given, else the Debian package)."""
    data: dict[str, Any] = {"name": "fashion-mnist", "downsample": SIZES[args.size][1]}
    if args.data:
        data["path"] = args.data
    return data | fields


def network(args: Any) -> dict[str, Any]:
    """The preset for ``args.size`` (or ``args.preset``), its image size set to ``args.size``."""
    name = args.preset or SIZES[args.size][0]
    fields: dict[str, Any] = {"preset": name}
    if PRESETS[name].image_size != args.size:
        fields["model"] = {"image_size": args.size}
    return fields


def base_config(args: Any, out: Path, **fields: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        **network(args),
        "data": data_config(args),
        "batch_size": args.batch,
        "device": args.device,
        "num_threads": 1 if args.device == "cpu" else None,  # the GPU runs the network; torch picks
        "out_dir": str(out),
        "checkpoint_every": 10**9,
        "sample_count": 0,
        "progress": False,
        "log_every": 50,
        "export_dtype": "float32",
        "optim": {"lr": args.lr, "warmup_updates": 50},
    }
    cfg.update(fields)
    return cfg


def finish(tr: Trainer) -> None:
    """Run ``tr`` to its end; a run stopped early (SIGINT/SIGTERM, time limit) ends the experiment
    instead of being scored as if it had finished (results so far are already in OUT.json)."""
    tr.run()
    if tr.stop_reason is not None:
        log(f"training stopped ({tr.stop_reason}) at {tr.state.updates} updates: experiment ends here")
        raise SystemExit(1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def header(args: Any, experiment: str) -> dict[str, Any]:
    on_gpu = torch.device(args.device).type == "cuda"
    scoring = "16x16 upsampled x2 (nearest)" if args.size == 16 else "32x32 as is (no upsampling)"
    return {
        "experiment": experiment,
        "command": "robustdiff bench images16 " + " ".join(sys.argv[1:]),
        "machine": (
            f"{torch.cuda.get_device_name(args.device)}, {os.cpu_count()} CPU cores; torch {torch.__version__}"
            if on_gpu
            else machine()
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": list(os.getloadavg()),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "network": network(args),
        "feature_space": f"penultimate layer of models/weights/fmnist-classifier.safetensors; {scoring}",
    }


def time_left_for(args: Any, last_seed_s: float | None) -> bool:
    """Whether another seed, as long as the last one, still ends within ``args.time_limit`` seconds
    of the start (always, without a limit or before the first seed)."""
    if args.time_limit is None or last_seed_s is None:
        return True
    return time.monotonic() - STARTED + last_seed_s <= args.time_limit


STARTED = time.monotonic()


def write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report["loadavg_end"] = list(os.getloadavg())
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))


def seed_a(args: Any) -> None:
    out, work = Path(args.out), Path(args.work) / "seed_a"
    corruption = {"kind": "gaussian", "fraction": 0.9, "sigma": args.sigma, "clamp": False, "seed": 0}
    report = header(args, f"seed A, {args.size}x{args.size} Fashion-MNIST, 90% noisy (unclamped)") | {
        "runs": [],
        "sweep": [],
    }
    if args.append and out.with_suffix(".json").exists():  # more seeds or arms for a finished report
        prev = json.loads(out.with_suffix(".json").read_text())
        was = prev["args"]
        trained = (was["updates"], was["sigma"], was.get("size", 16), was.get("preset"))
        if (
            args.sweep
            or tuple(args.chosen) != (prev["chosen"]["lambda"], prev["chosen"]["r_max"])
            or (args.updates, args.sigma, args.size, args.preset) != trained
        ):
            preset = f" --preset {was['preset']}" if was.get("preset") else ""
            raise SystemExit(
                f"--append: use --sweep none --chosen {prev['chosen']['lambda']}:{prev['chosen']['r_max']}"
                f" --updates {was['updates']} --sigma {was['sigma']} --size {was.get('size', 16)}{preset}"
                f" (what {out}.json was run with)"
            )
        report |= {"runs": prev["runs"], "sweep": prev.get("sweep", [])}
        report["earlier_commands"] = [*prev.get("earlier_commands", []), prev["command"]]
    judge = Judge(args.n_real, args.size, args.device, args.data)

    def run(arm: str, seed: int, method: str, options: dict[str, Any]) -> dict[str, Any]:
        cfg = base_config(
            args,
            work / f"{arm}-s{seed}",
            method=method,
            options=options,
            seed=seed,
            updates=args.updates,
            data=data_config(args, corruption=corruption),
        )
        t0 = time.time()
        tr = Trainer(build(cfg))
        finish(tr)
        row: dict[str, Any] = {"arm": arm, "seed": seed, "options": options, "train_s": time.time() - t0}
        row |= {f"nfe{s}": judge.score(samples(tr, s, args.n)) for s in args.nfe}
        log(f"{arm} seed {seed}: " + ", ".join(f"FD@{s} {row[f'nfe{s}']['fd']:.2f}" for s in args.nfe))
        return row

    wanted = [SEED_A_ARMS[a] for a in args.arms_a]
    if args.sweep:
        report["runs"].append(run("standard", 0, "standard", {}))
        write(out, report)
        for lam, r_max in args.sweep:
            opts = {"variant": "adversarial", "lambda": lam, "r_max": r_max}
            row = run(f"sweep-l{lam}-r{r_max}", 0, "equivariant-at", opts)
            report["sweep"].append(row)
            write(out, report)
        key = f"nfe{args.nfe[-1]}"
        best = min(report["sweep"], key=lambda r: r[key]["fd"])["options"]
        report["chosen"] = {
            "lambda": best["lambda"],
            "r_max": best["r_max"],
            "by": f"lowest FD at {key} on seed 0",
        }
        sweep_row = next(r for r in report["sweep"] if r["options"] == best)
        report["runs"].append({**sweep_row, "arm": "equivariant adversarial"})
    else:
        lam, r_max = args.chosen
        best = {"variant": "adversarial", "lambda": lam, "r_max": r_max}
        report["chosen"] = {"lambda": lam, "r_max": r_max, "by": "given (--chosen), no sweep"}
    log(f"chosen lambda {best['lambda']}, r_max {best['r_max']}")
    arms = {
        name: spec
        for name, spec in {
            "standard": ("standard", {}),
            "equivariant adversarial": ("equivariant-at", dict(best)),
            "equivariant random": ("equivariant-at", {**best, "variant": "random"}),
        }.items()
        if name in wanted
    }
    done = {(r["arm"], r["seed"]) for r in report["runs"]}
    last_seed_s = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if not time_left_for(args, last_seed_s):
            stop_early(report, out, seed)
            break
        t0 = time.monotonic()
        for arm, (method, options) in arms.items():
            if (arm, seed) in done:
                continue  # standard and the chosen adversarial setting already ran on seed 0 in the sweep
            report["runs"].append(run(arm, seed, method, options))
            report["comparisons"] = seed_a_comparisons(report["runs"], args.nfe)
            write(out, report)
        last_seed_s = time.monotonic() - t0
    if args.plot:
        plot_a(report, out.with_suffix(".png"), args.nfe, args.size)
    log(f"wrote {out}.json" + (" and .png" if args.plot else ""))


def stop_early(report: dict[str, Any], out: Path, seed: int) -> None:
    """Record that ``--time-limit`` ended the seeds before ``seed``."""
    report["stopped"] = f"--time-limit: seed {seed} would not have finished in time; seeds before it ran"
    log(report["stopped"])
    write(out, report)


def seed_a_comparisons(runs: list[dict[str, Any]], nfe: list[int]) -> dict[str, Any]:
    """Every equivariant arm in ``runs`` against standard, and adversarial against random (the paper
    says the adversarial box helps more than random draws from it), paired by seed."""
    out = compare(runs, "standard", sorted({r["arm"] for r in runs} - {"standard"}), nfe)
    return out | compare(runs, "equivariant random", ["equivariant adversarial"], nfe)


SEED_A_ARMS = {
    "standard": "standard",
    "adversarial": "equivariant adversarial",
    "random": "equivariant random",
}


def compare(runs: list[dict[str, Any]], base: str, arms: list[str], nfe: list[int]) -> dict[str, Any]:
    """Each arm vs ``base`` over the seeds both finished, per NFE, for FD and KID."""
    out: dict[str, Any] = {}
    by = {(r["arm"], r["seed"]): r for r in runs}
    for arm in arms:
        seeds = sorted(s for (a, s) in by if a == arm and (base, s) in by)
        if len(seeds) < 2:
            continue
        for s in nfe:
            for metric in ("fd", "kid"):
                a = [by[(arm, x)][f"nfe{s}"][metric] for x in seeds]
                b = [by[(base, x)][f"nfe{s}"][metric] for x in seeds]
                out[f"{arm} vs {base}, {metric} @ NFE {s}"] = paired(a, b) | {"seed_ids": seeds}
    return out


def seed_b(args: Any) -> None:
    out, work = Path(args.out), Path(args.work) / "seed_b"
    judge = Judge(args.n_real, args.size, args.device, args.data)
    size = f"{args.size}x{args.size}"
    report = header(args, f"seed B, {size} Fashion-MNIST, pre-train then fine-tune from one checkpoint") | {
        "pretrain": [],
        "runs": [],
    }
    if args.append and out.with_suffix(".json").exists():  # more seeds for a finished report
        prev = json.loads(out.with_suffix(".json").read_text())
        report["runs"] = prev["runs"]
        report["earlier_commands"] = [*prev.get("earlier_commands", []), prev["command"]]
    if args.pretrain_report:  # the curve so far: of --init's checkpoint, or the one to continue
        prev = json.loads(Path(args.pretrain_report).read_text())
        report |= {
            "pretrain": prev["pretrain"],
            "plateau": prev["plateau"],
            "pretrain_command": prev["command"],
        }
    served = Path(args.init) if args.init else pretrain(args, work, judge, report, out)
    report["init"] = str(served)
    if args.pretrain_only:  # the fine-tuning arms run elsewhere, from --init this checkpoint
        write(out, report)
        log(f"pre-trained {served}; wrote {out}.json")
        return
    arms = seed_b_arms(args.arms_b, args.finetune, args.m)
    report["arms"] = {a: {"method": m, "options": o, "updates": u} for a, (m, o, u) in arms.items()}
    last_seed_s = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if not time_left_for(args, last_seed_s):
            stop_early(report, out, seed)
            break
        t0_seed = time.monotonic()
        for arm, (method, options, updates) in arms.items():
            cfg = base_config(
                args,
                work / f"{arm}-s{seed}",
                method=method,
                options=options,
                seed=seed + 1,
                updates=updates,
                optim={"lr": args.finetune_lr, "warmup_updates": 10},
                ema_decay=0.99,
            )
            t0 = time.time()
            tr = Trainer(build(cfg), init=served)
            finish(tr)
            row: dict[str, Any] = {"arm": arm, "seed": seed, "updates": updates, "minibatches": args.finetune}
            row["train_s"] = time.time() - t0
            row |= {f"nfe{s}": judge.score(samples(tr, s, args.n)) for s in args.nfe}
            den = EpsDenoiser(tr.ema, tr.schedule)
            row["exposure"] = {
                f"nfe{s}": exposure_bias(den, judge.test, steps=s, n=args.n_exposure) for s in args.nfe
            }
            log(f"{arm} seed {seed}: " + ", ".join(f"FD@{s} {row[f'nfe{s}']['fd']:.2f}" for s in args.nfe))
            report["runs"].append(row)
            report |= seed_b_comparisons(report["runs"], args.nfe)
            write(out, report)
        last_seed_s = time.monotonic() - t0_seed
    if args.plot:
        plot_b(report, out.with_suffix(".png"), args.nfe, args.size)
    log(f"wrote {out}.json" + (" and .png" if args.plot else ""))


SEED_B_ARMS = ("standard", "standard-equal-updates", "dro-at")
# (arm, baseline): dro-at against both standards; the equal-updates control against plain standard.
B_COMPARISONS = (
    ("dro-at", "standard"),
    ("dro-at", "standard-equal-updates"),
    ("standard-equal-updates", "standard"),
)


def seed_b_comparisons(runs: list[dict[str, Any]], nfe: list[int]) -> dict[str, Any]:
    """``comparisons`` (FD/KID) and ``exposure_comparison`` of each B_COMPARISONS pair in ``runs``."""
    present = {r["arm"] for r in runs}
    out: dict[str, Any] = {"comparisons": {}, "exposure_comparison": {}}
    for a, base in B_COMPARISONS:
        if a in present and base in present:
            out["comparisons"] |= compare(runs, base, [a], nfe)
            out["exposure_comparison"] |= exposure_compare(runs, nfe, a, base)
    return out


def seed_b_arms(names: list[str], minibatches: int, m: int) -> dict[str, tuple[str, dict[str, Any], int]]:
    """Fine-tuning arms: (method, options, updates). dro-at spends ``m`` updates per minibatch, so
    equal minibatches give it ``m`` times standard's updates; ``standard-equal-updates`` is standard
    with dro-at's update count, the control for "more updates alone"."""
    table = {
        "standard": ("standard", {}, minibatches),
        "standard-equal-updates": ("standard", {}, minibatches * m),
        "dro-at": ("dro-at", {"m": m}, minibatches * m),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown seed-b arm(s) {unknown}; choose from {list(table)}")
    return {n: table[n] for n in names}


def pretrain(args: Any, work: Path, judge: Judge, report: dict[str, Any], out: Path) -> Path:
    """Standard on clean data in chunks until FD at the last NFE changes by less than ``args.plateau``
    (relative) over one chunk, or ``args.pretrain`` updates, or (``args.pretrain_seconds``) before a
    chunk as long as the last one would end past that many seconds; returns the exported checkpoint."""
    pre_dir = work / "pretrain"
    served = work / "pretrain.safetensors"
    chunk = args.pretrain_chunk
    key = f"nfe{args.nfe[-1]}"
    rule = f"plateau when |FD@{args.nfe[-1]} change| over one {chunk}-update chunk < {args.plateau:.0%}"
    if args.pretrain_seconds is not None:
        rule += f", or before a chunk that would end past {args.pretrain_seconds:g} s of pre-training"
    report["plateau"] = {"rule": rule, "reached": False}
    updates = continued_updates(args, report, pre_dir) if args.continue_pretrain else 0
    t0, last_chunk_s = time.monotonic(), 0.0
    while updates < args.pretrain:
        spent = time.monotonic() - t0
        if args.pretrain_seconds is not None and updates and spent + last_chunk_s > args.pretrain_seconds:
            report["plateau"]["stopped_by_time"] = spent
            log(f"pre-training stops at {updates} updates: the next chunk would end past the time cap")
            break
        updates = min(updates + chunk, args.pretrain)
        cfg = build(
            base_config(args, pre_dir, seed=0, updates=updates, export_path=str(served))
            | {"ema_decay": 0.995}
        )
        tr = Trainer(cfg, resume=pre_dir if updates > chunk else None)
        finish(tr)
        last_chunk_s = time.monotonic() - t0 - spent
        last = args.nfe[-1]  # the plateau rule reads one NFE; scoring only it halves the cost of a check
        row = {"updates": updates, key: judge.score(samples(tr, last, args.n))}
        report["pretrain"].append(row)
        fds = [r[key]["fd"] for r in report["pretrain"]]
        change = (fds[-1] - fds[-2]) / fds[-2] if len(fds) > 1 else None
        report["plateau"] |= {"last_relative_change": change, "updates": updates}
        log(
            f"pre-train {updates} updates: FD@{last} {row[key]['fd']:.2f}"
            + (f" (change {change:+.1%})" if change is not None else "")
        )
        write(out, report)
        if change is not None and abs(change) < args.plateau:
            report["plateau"]["reached"] = True
            break
    write(out, report)
    return served


def continued_updates(args: Any, report: dict[str, Any], pre_dir: Path) -> int:
    """Where ``--continue-pretrain`` picks up: the last chunk of the ``--pretrain-report`` curve,
    whose checkpoint must still be in ``pre_dir`` and whose chunks must be ``--pretrain-chunk`` long
    (the plateau rule compares equal chunks)."""
    curve = report["pretrain"]
    updates = curve[-1]["updates"]
    step = pre_dir / "checkpoints" / f"step-{updates:08d}.json"
    if not step.exists():
        raise SystemExit(
            f"--continue-pretrain: {step} is missing (the report's last chunk, {updates} updates)"
        )
    if len(curve) > 1 and updates - curve[-2]["updates"] != args.pretrain_chunk:
        raise SystemExit(
            f"--continue-pretrain: the report's chunks are {updates - curve[-2]['updates']} updates;"
            f" use --pretrain-chunk {updates - curve[-2]['updates']}"
        )
    log(f"pre-training continues from {updates} updates ({step})")
    return updates


# What every part of a merge must share, read from each part's args (default for older reports):
# the paired comparisons are only fair between runs trained and scored the same way.
MERGE_SETTINGS: dict[str, Any] = {"size": 16, "preset": None, "data": None, "batch": None, "n": None}
MERGE_SETTINGS |= {"n_real": None, "nfe": None}
MERGE_SETTINGS_A: dict[str, Any] = {"updates": None, "sigma": None, "lr": None}
MERGE_SETTINGS_B: dict[str, Any] = {"finetune": None, "m": None, "finetune_lr": None, "n_exposure": None}
# What differs between parts by design: which seeds and arms a process ran, and where it wrote.
PART_ARGS = {"experiment", "first_seed", "seeds", "arms_a", "arms_b", "out", "work", "time_limit"}
PART_ARGS |= {"append", "pretrain_only", "parts", "plot"}


def merge_settings(report: dict[str, Any]) -> dict[str, Any]:
    """The settings a merge compares: the experiment, the MERGE_SETTINGS args, seed A's chosen
    (lambda, r_max) and seed B's ``--init`` checkpoint."""
    kind = report["experiment"][:6]  # "seed A" or "seed B"
    args = report["args"]
    fields = MERGE_SETTINGS | (MERGE_SETTINGS_A if kind == "seed A" else MERGE_SETTINGS_B)
    out = {"experiment": kind} | {k: args.get(k, default) for k, default in fields.items()}
    if kind == "seed A":
        chosen = report.get("chosen", {})  # absent only in a part cut during its sweep
        out |= {"lambda": chosen.get("lambda"), "r_max": chosen.get("r_max")}
    else:
        out["init"] = report.get("init")
    return out


def merge(args: Any) -> None:
    """One report from per-seed (or per-arm) reports of the same experiment and settings: their runs
    together, the paired comparisons recomputed over all of them, and the runs expected (``--arms-a``/
    ``--arms-b`` x ``--first-seed``.. seeds, and every arm and seed seen) but in no part listed as missing."""
    paths = [Path(p) for p in args.parts]
    parts = []
    for path in paths:
        try:
            parts.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SystemExit(f"merge: {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise SystemExit(f"merge: {path} is not a JSON report ({e})") from None
        if not isinstance(parts[-1], dict) or str(parts[-1].get("experiment"))[:6] not in (
            "seed A",
            "seed B",
        ):
            raise SystemExit(f"merge: {path} is not a seed-a or seed-b report (no experiment 'seed A/B ...')")
    first = parts[0]
    settings = merge_settings(first)
    where: dict[tuple[str, int], Path] = {}
    for path, part in zip(paths, parts, strict=True):
        for field, value in merge_settings(part).items():
            if value != settings[field]:
                raise SystemExit(
                    f"merge: {path} differs from {paths[0]} in {field}: {value!r} vs {settings[field]!r}"
                )
        for r in part.get("runs", []):
            if (r["arm"], r["seed"]) in where:
                raise SystemExit(
                    f"merge: {r['arm']} seed {r['seed']} is in both {where[(r['arm'], r['seed'])]} and {path}"
                )
            where[(r["arm"], r["seed"])] = path
    runs = sorted((r for part in parts for r in part.get("runs", [])), key=lambda r: (r["seed"], r["arm"]))
    report: dict[str, Any] = {
        "experiment": first["experiment"],
        "command": "robustdiff bench images16 " + " ".join(sys.argv[1:]),
        "machine": first["machine"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": list(os.getloadavg()),
        "args": {k: v for k, v in first["args"].items() if k not in PART_ARGS},
        "network": first["network"],
        "feature_space": first["feature_space"],
        "parts": [
            {
                "file": str(path),
                "runs": [[r["arm"], r["seed"]] for r in part.get("runs", [])],
                **{
                    k: part[k]
                    for k in ("command", "earlier_commands", "date", "machine", "stopped")
                    if k in part
                },
            }
            for path, part in zip(paths, parts, strict=True)
        ],
        "runs": runs,
    }
    nfe = settings["nfe"]
    if settings["experiment"] == "seed A":
        expected = [SEED_A_ARMS[a] for a in args.arms_a]
        report |= {
            "chosen": next((part["chosen"] for part in parts if "chosen" in part), None),
            "sweep": [row for part in parts for row in part.get("sweep", [])],
        }
        report["comparisons"] = seed_a_comparisons(runs, nfe)
    else:
        expected = list(args.arms_b)
        curve = next((part for part in parts if part.get("pretrain")), first)
        report |= {k: curve[k] for k in ("pretrain", "plateau", "pretrain_command") if k in curve}
        report.setdefault("pretrain", [])
        arms_b = {a: spec for part in parts for a, spec in part.get("arms", {}).items()}
        report |= {"init": first.get("init"), "arms": arms_b}
        report |= seed_b_comparisons(runs, nfe)
    arms = sorted(set(expected) | {arm for arm, _ in where})
    seeds = sorted(set(range(args.first_seed, args.first_seed + args.seeds)) | {s for _, s in where})
    report["missing"] = [{"arm": a, "seed": s} for s in seeds for a in arms if (a, s) not in where]
    rates: dict[str, list[float]] = {}  # the first check of a sizing: were the parts as fast as assumed?
    for r in runs:
        if r.get("train_s"):
            rates.setdefault(r["arm"], []).append(
                r.get("updates", report["args"].get("updates", 0)) / r["train_s"]
            )
    report["updates_per_s"] = {arm: [min(v), max(v)] for arm, v in rates.items()}
    log(
        "updates/s per run (train_s: building the trainer and training): "
        + "; ".join(f"{arm} {min(v):.2f}-{max(v):.2f}" for arm, v in rates.items())
    )
    out = Path(args.out)
    write(out, report)
    (plot_a if settings["experiment"] == "seed A" else plot_b)(
        report, out.with_suffix(".png"), nfe, settings["size"]
    )
    gaps = ", ".join(f"{m['arm']} seed {m['seed']}" for m in report["missing"])
    log(f"merged {len(runs)} runs from {len(parts)} parts" + (f"; missing: {gaps}" if gaps else ""))
    log(f"wrote {out}.json/.png")


# Each plan target: (arm, baseline, metric) -> (what it asks, relative change it needs or None for
# "lower"). Met when the paired interval excludes 0 on the right side (and reaches the size asked).
TARGETS: dict[tuple[str, str, str], tuple[str, float | None]] = {
    ("equivariant adversarial", "standard", "fd"): (">= 30% lower, CI excludes 0", -0.30),
    ("dro-at", "standard", "fd"): ("lower, CI excludes 0", None),
    ("dro-at", "standard-equal-updates", "fd"): ("lower, CI excludes 0", None),
}


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def tables(report: dict[str, Any]) -> str:
    """The Markdown tables docs/RESULTS.md shows of one seed-a or seed-b report: each arm's mean and
    95% t interval over seeds, each paired comparison against its plan target, and (seed B) dro-at's
    exposure-bias difference per sampling step at the largest NFE."""
    runs, nfe = report["runs"], report["args"]["nfe"]
    seed_b_report = report["experiment"].startswith("seed B")
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    head = ["arm", "updates (minibatches)" if seed_b_report else "updates", "seeds"]
    head += [f"{m.upper()} @ NFE {s}" for m in ("fd", "kid") for s in nfe]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        if seed_b_report:
            budget = f"{report['arms'][arm]['updates']} ({report['args']['finetune']})"
        else:
            budget = str(report["args"]["updates"])
        cells = [arm, budget, str(len(rows))]
        for metric, digits in (("fd", 2), ("kid", 4)):
            for s in nfe:
                c = mean_ci([r[f"nfe{s}"][metric] for r in rows])
                cells.append(f"{c['mean']:.{digits}f} [{c['ci95'][0]:.{digits}f}, {c['ci95'][1]:.{digits}f}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison (A vs B, paired by seed) | A - B | relative (95% CI) | seeds | sign-flip p | target | met? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in report.get("comparisons", {}).items():
        pair, metric = name.split(", ")[0], name.split(", ")[1].split(" @ ")[0]
        arm, base = pair.split(" vs ")
        target, size = TARGETS.get((arm, base, metric), ("-", None))
        if target == "-":
            met = "-"
        else:
            lower = c["relative_ci95"][1] < 0 and (size is None or c["relative"] <= size)
            met = "met" if lower else "**missed**"
        lo, hi = c["relative_ci95"]
        lines.append(
            f"| {name} | {_signed(c['difference'], 2 if metric == 'fd' else 4)} | {_pct(c['relative'])}"
            f" [{_pct(lo)}, {_pct(hi)}] | {c['seeds']} | {c['sign_flip_p']:.3f} | {target} | {met} |"
        )
    exposure = report.get("exposure_comparison", {})
    last, bullets = nfe[-1], [""]
    for name, steps in exposure.items():
        if not name.endswith(f"variance_ratio @ NFE {last}") or not name.startswith("dro-at"):
            continue
        cells = [
            f"t={st['t']:.2f}: {_signed(st['difference'], 4)}{'*' if st['ci_excludes_0'] else ''}"
            for st in steps
        ]
        bullets.append(f"- {name.split(',')[0]}, |variance ratio - 1| per step: " + ", ".join(cells))
    lines += bullets if len(bullets) > 1 else []
    return "\n".join(lines) + "\n"


def exposure_compare(
    runs: list[dict[str, Any]], nfe: list[int], arm: str = "dro-at", base: str = "standard"
) -> dict[str, Any]:
    """Per NFE and step: ``arm`` minus ``base`` in |variance ratio - 1| and |eps-norm gap|, paired by seed."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted(s for (a, s) in by if a == arm and (base, s) in by)
    if len(seeds) < 2:
        return {}
    out: dict[str, Any] = {}
    for s in nfe:
        for metric in ("variance_ratio", "eps_norm_gap"):
            steps = []
            for i in range(s):
                t = by[(base, seeds[0])]["exposure"][f"nfe{s}"][i]["t"]
                a = [deviation(by[(arm, x)], s, i, metric) for x in seeds]
                b = [deviation(by[(base, x)], s, i, metric) for x in seeds]
                steps.append({"t": t} | paired(a, b))
            out[f"{arm} vs {base}, {metric} @ NFE {s}"] = steps
    return out


def deviation(run: dict[str, Any], nfe: int, step: int, metric: str) -> float:
    """|variance ratio - 1| or |eps-norm gap| of one run at one sampling step (0 = no exposure bias)."""
    v = float(run["exposure"][f"nfe{nfe}"][step][metric])
    return abs(v - 1) if metric == "variance_ratio" else abs(v)


def _bars(ax: Any, comparisons: dict[str, Any], title: str) -> None:
    keys = [k for k in comparisons if ", fd @" in k]
    means = [100 * comparisons[k]["relative"] for k in keys]
    lo = [100 * (comparisons[k]["relative"] - comparisons[k]["relative_ci95"][0]) for k in keys]
    hi = [100 * (comparisons[k]["relative_ci95"][1] - comparisons[k]["relative"]) for k in keys]
    ax.errorbar(means, range(len(keys)), xerr=[lo, hi], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(keys)), [k.replace(" vs ", "\nvs ") for k in keys], fontsize=6)
    ax.set_xlabel("FD change, % (paired 95% CI over seeds)", fontsize=8)
    ax.set_title(title, fontsize=8)


def plot_a(report: dict[str, Any], path: Path, nfe: list[int], size: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    key = f"nfe{nfe[-1]}"
    for arm, colour in (
        ("standard", "grey"),
        ("equivariant adversarial", "tab:green"),
        ("equivariant random", "tab:blue"),
    ):
        rows = [r for r in report["runs"] if r["arm"] == arm]
        axes[0].scatter([r["seed"] for r in rows], [r[key]["fd"] for r in rows], label=arm, color=colour)
    axes[0].set_xlabel("training seed")
    axes[0].set_ylabel(f"FD vs clean test @ NFE {nfe[-1]}")
    axes[0].legend(fontsize=7)
    _bars(axes[1], report.get("comparisons", {}), f"seed A, 90% noisy {size}x{size} Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


TREND_SETTINGS = ("size", "preset", "sigma", "batch", "lr", "n", "n_real", "nfe")


def trend(args: Any) -> None:
    """Seed A's paired effect against training length: one seed-a report per budget (``--updates``),
    otherwise made alike; prints a Markdown table and writes OUT.png (relative FD change vs standard
    with its 95% interval, per equivariant arm and NFE, against updates)."""
    reports = []
    for name in args.parts:
        try:
            rep = json.loads(Path(name).read_text())
            if not rep["experiment"].startswith("seed A"):
                raise ValueError("not seed A")
            rep["args"]["updates"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"trend: {name} is not a seed-a report ({e!r})") from None
        reports.append((name, rep))
    first_name, first = reports[0]
    for name, rep in reports[1:]:
        for field in TREND_SETTINGS:
            default = MERGE_SETTINGS.get(field)  # reports older than a field ran at its default
            if rep["args"].get(field, default) != first["args"].get(field, default):
                raise SystemExit(f"trend: {name} differs from {first_name} in {field}")
        if [rep["chosen"][k] for k in ("lambda", "r_max")] != [
            first["chosen"][k] for k in ("lambda", "r_max")
        ]:
            raise SystemExit(f"trend: {name} differs from {first_name} in chosen (lambda, r_max)")
    reports.sort(key=lambda nr: nr[1]["args"]["updates"])
    nfe = first["args"]["nfe"]
    arms = ("equivariant adversarial", "equivariant random")
    head = ["updates", "seeds"] + [f"{a.split()[1]} vs standard, FD @ NFE {s}" for a in arms for s in nfe]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    points: dict[tuple[str, int], list[tuple[int, float, float, float]]] = {}
    for _, rep in reports:
        updates = rep["args"]["updates"]
        seeds = len({r["seed"] for r in rep["runs"] if r["arm"] == "standard"})
        cells = [str(updates), str(seeds)]
        for arm in arms:
            for s in nfe:
                c = rep.get("comparisons", {}).get(f"{arm} vs standard, fd @ NFE {s}")
                if c is None:
                    cells.append("-")
                    continue
                lo, hi = c["relative_ci95"]
                cells.append(f"{_pct(c['relative'])} [{_pct(lo)}, {_pct(hi)}] ({c['seeds']})")
                points.setdefault((arm, s), []).append((updates, c["relative"], lo, hi))
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (arm, s), pts in sorted(points.items()):
        x = [p[0] * (1.03 if "random" in arm else 0.97) for p in pts]  # side by side, not on top
        y = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        style = "-" if s == nfe[0] else "--"
        colour = "tab:green" if "adversarial" in arm else "tab:blue"
        ax.errorbar(x, y, yerr=err, fmt="o" + style, color=colour, capsize=3, label=f"{arm}, NFE {s}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-30, color="tab:red", lw=0.8, ls=":", label="target: -30%")
    ax.set_xscale("log")
    budgets = [rep["args"]["updates"] for _, rep in reports]
    ax.set_xticks(budgets, labels=[str(u) for u in budgets])
    ax.minorticks_off()
    ax.set_xlabel("training updates per model")
    ax.set_ylabel("FD change vs standard, % (paired, 95% CI)")
    ax.set_title("seed A, 90% noisy Fashion-MNIST: effect against training length", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=90)
    plt.close(fig)


def plot_b(report: dict[str, Any], path: Path, nfe: list[int], size: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    key = f"nfe{nfe[-1]}"
    axes[0].plot([r["updates"] for r in report["pretrain"]], [r[key]["fd"] for r in report["pretrain"]], "o-")
    axes[0].set_xlabel("pre-training updates")
    axes[0].set_ylabel(f"FD @ NFE {nfe[-1]}")
    axes[0].set_title("pre-training (standard, clean)", fontsize=8)
    _bars(axes[1], report.get("comparisons", {}), f"seed B fine-tune from one checkpoint, {size}x{size}")
    for arm, colour in (("standard", "grey"), ("standard-equal-updates", "tab:blue"), ("dro-at", "tab:red")):
        rows = [r for r in report["runs"] if r["arm"] == arm]
        for j, r in enumerate(rows):
            e = r["exposure"][key]
            axes[2].plot(
                [x["t"] for x in e],
                [x["variance_ratio"] for x in e],
                color=colour,
                alpha=0.6,
                label=arm if j == 0 else None,
            )
    axes[2].axhline(1, color="black", lw=0.6)
    axes[2].invert_xaxis()
    axes[2].set_xlabel("t (sampling runs right)")
    axes[2].set_ylabel("||x_t||^2 sampled / forward")
    axes[2].set_title(f"exposure bias per DDIM step, NFE {nfe[-1]}", fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pairs(text: str) -> list[tuple[float, float]]:
    if text == "none":
        return []
    return [(float(a), float(b)) for a, b in (p.split(":") for p in text.split(","))]


def main() -> None:
    p = BenchParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=("seed-a", "seed-b", "merge", "table", "trend"))
    p.add_argument(
        "parts",
        nargs="*",
        help="merge: OUT.json reports of one experiment and setting (e.g. one per seed) to merge;"
        " table: the one report to print as Markdown tables; trend: seed-a reports of different --updates",
    )
    p.add_argument(
        "--size",
        type=int,
        choices=sorted(SIZES),
        default=16,
        help="image size: 16 (downsample 2, fmnist16-cpu) or 32 (full size, fmnist)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="network (default: the size's preset)")
    p.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data", help="Fashion-MNIST IDX folder (default: the Debian package)")
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds: start no seed that, as long as the last one, would end past this",
    )
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="training seeds run from here (to add seeds to a finished run)",
    )
    p.add_argument("--updates", type=positive_int, default=300, help="seed-a: updates per model")
    p.add_argument("--sigma", type=float, default=0.2, help="seed-a: noise std on the [0, 1] scale")
    p.add_argument(
        "--sweep", type=pairs, default=pairs("0.3:0.5,1:0.5,3:0.5,1:1.5"), help="seed-a: lambda:r_max,..."
    )
    p.add_argument(
        "--arms-a",
        type=lambda t: t.split(","),
        default=["standard", "adversarial", "random"],
        help="seed-a: arms among standard,adversarial,random",
    )
    p.add_argument(
        "--chosen",
        type=lambda t: pairs(t)[0],
        default=(1.0, 0.5),
        help="seed-a: lambda:r_max used when --sweep none",
    )
    p.add_argument("--pretrain", type=positive_int, default=4000, help="seed-b: most pre-training updates")
    p.add_argument(
        "--pretrain-chunk", type=positive_int, default=400, help="seed-b: updates between FD checks"
    )
    p.add_argument(
        "--plateau",
        type=float,
        default=0.03,
        help="seed-b: stop pre-training when FD changes less (relative)",
    )
    p.add_argument(
        "--pretrain-seconds",
        type=float,
        help="seed-b: start no pre-training chunk that, as long as the last one, would end past this",
    )
    p.add_argument("--init", help="seed-b: fine-tune from this checkpoint instead of pre-training")
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="seed-b: pre-train, write OUT.json (its 'init' is the checkpoint) and stop",
    )
    p.add_argument(
        "--pretrain-report",
        help="seed-b with --init or --continue-pretrain: OUT.json of the run that pre-trained it",
    )
    p.add_argument(
        "--continue-pretrain",
        action="store_true",
        help="seed-b: extend --pretrain-report's curve from its last checkpoint in WORK/seed_b/pretrain",
    )
    p.add_argument(
        "--append", action="store_true", help="keep OUT.json's runs and add these seeds (seed-a: or arms)"
    )
    p.add_argument(
        "--arms-b",
        type=lambda t: t.split(","),
        default=list(SEED_B_ARMS),
        help="seed-b: arms among " + ",".join(SEED_B_ARMS),
    )
    p.add_argument("--m", type=positive_int, default=3, help="seed-b: dro-at updates per minibatch")
    p.add_argument(
        "--finetune", type=positive_int, default=100, help="seed-b: fine-tuning minibatches per arm"
    )
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n", type=positive_int, default=500, help="samples per FD/KID")
    p.add_argument(
        "--n-exposure", type=positive_int, default=200, help="seed-b: samples per exposure-bias curve"
    )
    p.add_argument("--n-real", type=positive_int, default=2000, help="clean test images in the reference")
    p.add_argument("--nfe", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10])
    p.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="write no OUT.png (a part that a merge will plot)",
    )
    p.add_argument("--work", default="runs/images16", help="training run folders")
    p.add_argument("--out", help="writes OUT.json and OUT.png (every experiment but table)")
    args = p.parse_intermixed_args()
    if args.experiment == "table":
        if len(args.parts) != 1:
            p.error("table: name exactly one OUT.json report")
        try:
            print(tables(json.loads(Path(args.parts[0]).read_text())), end="")
        except (OSError, ValueError, KeyError) as e:
            p.error(f"table: {args.parts[0]} is not a seed-a or seed-b report ({e!r})")
        return
    if not args.out:
        p.error("the following arguments are required: --out")
    if args.experiment in ("merge", "trend") and not args.parts:
        p.error(f"{args.experiment}: name the OUT.json reports")
    if args.experiment not in ("merge", "trend") and args.parts:
        p.error(f"unrecognized arguments: {' '.join(args.parts)} (only merge, table and trend take reports)")
    if args.pretrain_only and (args.experiment != "seed-b" or args.init):
        p.error("--pretrain-only is for seed-b without --init")
    if args.continue_pretrain and (args.experiment != "seed-b" or args.init or not args.pretrain_report):
        p.error("--continue-pretrain is for seed-b with --pretrain-report and without --init")
    try:
        seed_b_arms(args.arms_b, args.finetune, args.m)
    except ValueError as e:
        p.error(str(e))
    if unknown := set(args.arms_a) - set(SEED_A_ARMS):
        p.error(f"unknown seed-a arm(s) {sorted(unknown)}; choose from {list(SEED_A_ARMS)}")
    if args.data and not Path(args.data).is_dir():
        p.error(f"--data: {args.data} is not a folder")
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)
    {"seed-a": seed_a, "seed-b": seed_b, "merge": merge, "trend": trend}[args.experiment](args)


if __name__ == "__main__":
    main()
