"""``eval robust``: accuracy of a classifier behind the purifier, clean and under adaptive attacks."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.checkpoint import read_header
from models.devices import device_option
from models.evaluation.adversarial import STALE_S, AdversarialStore, batch_slices
from models.evaluation.attacks import (
    ATTACKS,
    LOSSES,
    MAX_DRAWS,
    THREATS,
    PGDResult,
    PurifiedClassifier,
    attacker_view,
    make_oracle,
    pgd,
    pick_restarts,
    predict_draws,
)
from models.evaluation.classifier import DEFAULT_CLASSIFIER, load_classifier
from models.evaluation.cli import check, check_classifier_fits, check_purifier, parse_list
from models.evaluation.common import report_header, save_plot
from models.evaluation.metrics import vote_metrics
from models.paths import output_dir

GRADIENT_ATTACKS = ("classifier-only", "bpda-eot", "pgd-eot")
DEFAULT_SANITY_EPS = {"linf": 0.5, "l2": 8.0}
RESTART_SEED_STRIDE = 10_000_019  # random-start seeds of restart r: seed + r * stride + first image


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint whose purifier is attacked")
    p.add_argument(
        "--classifier", default=str(DEFAULT_CLASSIFIER), help="downstream classifier (safetensors)"
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--threat", default="linf", help="linf or l2")
    p.add_argument("--eps", default="0.1", help="comma-separated radii on the [0, 1] pixel scale")
    p.add_argument(
        "--attacks", default="none,classifier-only,bpda-eot,pgd-eot", help=f"subset of {','.join(ATTACKS)}"
    )
    p.add_argument(
        "--attack-steps",
        default="10,20",
        help="PGD step counts to report (one trajectory, recorded along it); a single value is also "
        "checked against half as many steps on the --sanity-n images",
    )
    p.add_argument("--step-size", type=float, default=None, help="[0, 1] scale; default eps/4")
    p.add_argument(
        "--loss",
        default="ce",
        help="what PGD ascends: ce (cross-entropy) or margin (Carlini-Wagner, max other logit - true "
        "logit; does not saturate, a check for gradient masking)",
    )
    p.add_argument(
        "--eot",
        default="4",
        help="EOT draws per gradient; a list (1,4) checks that accuracy does not rise with EOT on all "
        "--n images, a single value checks it against EOT 1 on the --sanity-n images",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="PGD runs per image from other random starts with fresh EOT noise; the attacker keeps "
        "the one that fools its own estimate most (costs restarts x the attack and its evaluation)",
    )
    p.add_argument("--draws", type=int, default=4, help="R: evaluation draws of the purifier's noise")
    p.add_argument("--n", type=int, default=64, help="test images (the first n of the test split)")
    p.add_argument(
        "--t-star",
        type=float,
        default=0.1,
        help="purification depth: noise to time t* in (0, 1], then denoise",
    )
    p.add_argument(
        "--sampler", default=None, help="purifier sampler (default: ddim; consistency for CM checkpoints)"
    )
    p.add_argument("--steps", type=int, default=5, help="purifier sampler steps (NFE)")
    p.add_argument("--batch-size", type=int, default=64, help="images attacked at once (memory)")
    p.add_argument(
        "--grad-checkpoint",
        choices=("auto", "on", "off"),
        default="auto",
        help="recompute the purifier's network calls in the backward pass: memory of one call instead "
        "of all, for one extra forward each; auto = on for multi-step purifiers, off for one step",
    )
    p.add_argument(
        "--sanity-eps",
        type=float,
        default=None,
        help="large radius that must drive accuracy to ~0 (0 = skip)",
    )
    p.add_argument(
        "--sanity-n",
        type=int,
        default=32,
        help="images in the sanity checks' own attacks (the first of the --n; at most --n are used)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed of the attack (random start and EOT noise)",
    )
    p.add_argument("--out", default="eval-robust", help="output folder (JSON and PNG plots)")
    p.add_argument(
        "--attack-only",
        action="store_true",
        help="help another process running the same command and --out: attack the batches nobody "
        "holds, then exit (no evaluation, no report)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="with --attack-only: exit once no batch is left to claim, instead of waiting for the "
        "batches others hold (frees a shared GPU; a batch whose process dies is then left to the rest)",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=STALE_S,
        help="seconds: a batch claimed from another host and not advanced by one PGD step for this "
        "long is taken over (raise it above the slowest process's time per PGD step)",
    )
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda, cuda:N or auto")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs only the headers and the arguments: fail before any work starts."""
    output_dir(args.out, "out")
    check(args.threat in THREATS, "threat", f"unknown threat {args.threat!r}; known: {', '.join(THREATS)}")
    check(args.loss in LOSSES, "loss", f"unknown loss {args.loss!r}; known: {', '.join(LOSSES)}")
    eps = parse_list(args.eps, float, "eps")
    check(all(math.isfinite(e) and e >= 0 for e in eps), "eps", f"must be finite and >= 0, got {args.eps}")
    attacks = parse_list(args.attacks, str, "attacks")
    for a in attacks:
        check(a in ATTACKS, "attacks", f"unknown attack {a!r}; known: {', '.join(ATTACKS)}")
    attack_steps = sorted(set(parse_list(args.attack_steps, int, "attack-steps")))
    check(all(s >= 1 for s in attack_steps), "attack-steps", "must be >= 1")
    eot = sorted(set(parse_list(args.eot, int, "eot")))
    check(all(e >= 1 for e in eot), "eot", "must be >= 1")
    check(args.draws >= 1, "draws", "R must be >= 1")
    check(args.restarts >= 1, "restarts", "must be >= 1")
    check(
        args.restarts * max(attack_steps) * max(eot) <= MAX_DRAWS,
        "restarts",
        f"restarts x attack steps x EOT must be at most {MAX_DRAWS:,} noise draws",
    )
    check(args.n >= 1 and args.batch_size >= 1, "n/batch-size", "must be >= 1")
    check(args.step_size is None or args.step_size > 0, "step-size", "must be > 0")
    check(
        not args.no_wait or args.attack_only,
        "no-wait",
        "only for --attack-only helpers: the reporting process needs every batch",
    )
    check(args.claim_timeout > 0, "claim-timeout", "must be > 0 seconds")
    sanity = DEFAULT_SANITY_EPS[args.threat] if args.sanity_eps is None else args.sanity_eps
    check(sanity >= 0, "sanity-eps", "must be >= 0")
    check(args.sanity_n >= 1, "sanity-n", f"must be >= 1, got {args.sanity_n}")
    args.sampler = check_purifier(args.model, args.sampler, args.steps, [args.t_star])
    check_classifier_fits(args.classifier, read_header(args.model).image_shape)
    return {
        "eps": eps,
        "attacks": attacks,
        "attack_steps": attack_steps,
        "eot": eot,
        "sanity_eps": sanity,
        "sanity_n": min(args.sanity_n, args.n),  # a subset of the attacked images
    }


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _attack(
    defense: PurifiedClassifier,
    attack: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    threat: str,
    steps: list[int],
    eot: int,
    step_size: float | None,
    seed: int,
    bar: tqdm,
    store: AdversarialStore,
    wait: bool = True,
    restart: int = 0,
    loss: str = "ce",
) -> int:
    """Attack the batches of x that are neither in ``store`` nor held by another process.

    Returns how many images were finished before this call (by an earlier run or another process).
    A failing or interrupted batch releases its claim, so a rerun or another process takes it up.
    Restart r starts elsewhere in the ball and draws EOT noise no other restart uses.
    """
    oracle = make_oracle(defense, attack, eot, first_draw=restart * max(steps) * eot, loss=loss)
    resumed = shown = store.done
    bar.update(resumed)
    while (sl := store.claim(wait)) is not None:
        bar.update(store.done - shown)
        shown = store.done
        idx = torch.arange(sl.start, sl.stop)

        def progress(done: int, total: int, sl: slice = sl) -> None:
            store.heartbeat(sl)
            bar.set_postfix(attack=attack, eps=eps, images=f"{sl.start}+", pgd_step=f"{done}/{total}")

        start = time.perf_counter()
        try:
            res: PGDResult = pgd(
                oracle,
                x[sl],
                y[sl],
                idx,
                eps=eps,
                threat=threat,
                steps=max(steps),
                step_size=step_size,
                record=steps,
                seed=seed + restart * RESTART_SEED_STRIDE + sl.start,
                callback=progress,
            )
        except BaseException:
            store.release(sl)
            raise
        store.add(sl, res.at_steps, vars(res.grad), time.perf_counter() - start)
    bar.update(store.done - shown)
    return resumed


def _store(
    args: argparse.Namespace,
    fingerprint: dict[str, Any],
    attack: str,
    eps: float,
    eot: int,
    steps: list[int],
    prefix: str = "",
    restart: int = 0,
) -> AdversarialStore:
    """The adversarial-example folder of one attack setting (and restart) under ``--out``.

    Restart 0 keeps the name and settings of a run without restarts, so adding restarts to a
    finished attack reuses it; the margin loss gets folders of its own.
    """
    settings = {**fingerprint, "attack": attack, "eps": eps, "eot": eot, "attack_steps": steps}
    name = f"{prefix}{attack}-{args.threat}-eps{eps:g}-eot{eot}"
    if args.loss != "ce":
        settings["loss"] = args.loss
        name += f"-{args.loss}"
    if restart:
        settings["restart"] = restart
        name += f"-restart{restart}"
    return AdversarialStore(
        Path(args.out) / "adversarial" / name, settings, args.batch_size, stale_s=args.claim_timeout
    )


def _predict(defense: PurifiedClassifier, x: torch.Tensor, draws: int, batch: int) -> torch.Tensor:
    """Predicted labels [R, N] under the R evaluation draws."""
    return torch.cat(
        [
            predict_draws(defense, x[sl], torch.arange(sl.start, sl.stop), draws)
            for sl in batch_slices(x.shape[0], batch)
        ],
        dim=1,
    )


def _evaluate(
    defense: PurifiedClassifier, x: torch.Tensor, y: torch.Tensor, draws: int, batch: int, classes: int
) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    preds = _predict(defense, x, draws, batch)
    wall = time.perf_counter() - start
    out = vote_metrics(preds, y, classes)
    out["latency_s_per_purification"] = wall / (x.shape[0] * draws)
    return out, wall


def _restart_choices(
    target: PurifiedClassifier,
    advs: list[torch.Tensor],
    y: torch.Tensor,
    draws: int,
    batch: int,
    loss: str,
) -> list[torch.Tensor]:
    """For k = 1..K, the restart (of the first k) the attacker keeps for each image ([N] each)."""
    if len(advs) == 1:
        return [torch.zeros(y.shape[0], dtype=torch.long, device=y.device)]
    views = [
        torch.cat(
            [
                torch.stack(attacker_view(target, a[sl], y[sl], torch.arange(sl.start, sl.stop), draws, loss))
                for sl in batch_slices(a.shape[0], batch)
            ],
            dim=1,
        )
        for a in advs
    ]
    wrong, value = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    return [pick_restarts(wrong[:k], value[:k]) for k in range(1, len(advs) + 1)]


def _evaluate_restarts(
    defense: PurifiedClassifier,
    advs: list[torch.Tensor],
    choices: list[torch.Tensor],
    y: torch.Tensor,
    draws: int,
    batch: int,
    classes: int,
) -> dict[str, Any]:
    """Accuracy on the images the attacker keeps; with restarts also majority after each restart.

    Every restart's images are evaluated once; an image's prediction under a draw depends only on
    that image and its seeds, so the kept images' predictions are gathered, not recomputed.
    """
    start = time.perf_counter()
    preds = torch.stack([_predict(defense, a, draws, batch) for a in advs])  # [K, R, N]
    wall = time.perf_counter() - start
    columns = torch.arange(y.shape[0], device=preds.device)
    kept = [preds[c.to(preds.device), :, columns].T for c in choices]
    out = vote_metrics(kept[-1], y, classes)
    out["latency_s_per_purification"] = wall / (y.shape[0] * draws * len(advs))
    if len(advs) > 1:
        out["majority_by_restarts"] = [vote_metrics(p, y, classes)["majority"] for p in kept]
    return out


def run(args: argparse.Namespace) -> int:
    from models.data import load_fashion_mnist
    from models.pipeline import Pipeline

    cfg = validate(args)
    classifier, cls_header = load_classifier(args.classifier, args.device)
    classes = cls_header.model.num_classes
    test = load_fashion_mnist("test", args.data)
    x, y = test.images[: args.n].to(args.device), test.labels[: args.n].to(args.device)
    pipe = Pipeline.from_checkpoint(args.model, args.device, batch_invariant=False)
    out = Path(args.out)  # created only once every input has loaded: a bad path leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    pipe.net.requires_grad_(False)
    checkpoint = args.grad_checkpoint == "on" or (args.grad_checkpoint == "auto" and args.steps > 1)
    defense = PurifiedClassifier(
        classifier,
        pipe.denoiser(),
        t_star=args.t_star,
        sampler=args.sampler,
        steps=args.steps,
        checkpoint=checkpoint,
    )
    undefended = PurifiedClassifier(classifier, None)
    threat, steps, records = args.threat, cfg["attack_steps"], []
    # What decides the adversarial images; a stored attack is continued only if all of it matches.
    fingerprint = {
        "model_hash": pipe.info.hash,
        "classifier_hash": cls_header.content_hash,
        "threat": threat,
        "step_size": args.step_size,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "t_star": args.t_star,
        "sampler": args.sampler,
        "steps": args.steps,
    }
    # Every attack setting and its stored adversarial examples, checked before any work starts.
    plan = [
        (
            attack,
            eps,
            eot,
            [_store(args, fingerprint, attack, eps, eot, steps, restart=r) for r in range(args.restarts)],
        )
        for attack in cfg["attacks"]
        if attack in GRADIENT_ATTACKS
        for eps in cfg["eps"]
        for eot in ([1] if attack == "classifier-only" else cfg["eot"])
    ]
    extras = _sanity_attacks(args, cfg, fingerprint, {(a, e, k): stores[0] for a, e, k, stores in plan})
    for *_, stores in plan:
        for store in stores:
            store.open(x)
    for extra in extras:
        extra.store.open(x[: cfg["sanity_n"]])

    def attack_one(attack: str, eps: float, eot: int, stores: list[AdversarialStore], bar: tqdm) -> int:
        return sum(
            _attack(
                defense if attack != "classifier-only" else undefended,
                attack,
                x,
                y,
                eps=eps,
                threat=threat,
                steps=steps,
                eot=eot,
                step_size=args.step_size,
                seed=args.seed,
                bar=bar,
                store=store,
                wait=not args.no_wait,
                restart=r,
                loss=args.loss,
            )
            for r, store in enumerate(stores)
        )

    total = args.n * len(plan) * args.restarts
    if args.attack_only:
        with tqdm(total=total, desc="attack only", unit="img") as bar:
            for attack, eps, eot, stores in plan:
                attack_one(attack, eps, eot, stores, bar)
        finished = all(s.done == args.n for *_, stores in plan for s in stores)
        left = "every batch is finished" if finished else "no batch left to claim"
        print(f"{left}: {out / 'adversarial'}; the process without --attack-only reports")
        return 0
    bar = tqdm(total=2 * args.n + total, desc="eval robust", unit="img")

    def record(**fields: Any) -> dict[str, Any]:
        records.append(fields)
        bar.set_postfix(attack=fields["attack"], eps=fields.get("eps"), mean=f"{fields['mean']:.3f}")
        return fields

    clean_undef, _ = _evaluate(undefended, x, y, 1, args.batch_size, classes)
    record(defense="none", attack="none", eps=0.0, **clean_undef)
    clean_def, clean_wall = _evaluate(defense, x, y, args.draws, args.batch_size, classes)
    record(defense="purifier", attack="none", eps=0.0, purifier_wall_s=round(clean_wall, 2), **clean_def)
    bar.update(2 * args.n)
    for attack, eps, eot, stores in plan:
        resumed = attack_one(attack, eps, eot, stores, bar)
        pitfall = attack == "classifier-only"
        target, view_draws = (undefended, 1) if pitfall else (defense, eot)  # what the attack rates with
        for s in steps:
            advs = [store.advs[s].to(x.device) for store in stores]
            choices = _restart_choices(target, advs, y, view_draws, args.batch_size, args.loss)
            m = _evaluate_restarts(defense, advs, choices, y, args.draws, args.batch_size, classes)
            nfe = 0 if pitfall else s * eot * defense.nfe * args.restarts
            record(
                defense="purifier",
                attack=attack,
                eps=eps,
                eot=eot,
                attack_steps=s,
                restarts=args.restarts,
                loss=args.loss,
                attack_wall_s=round(sum(store.wall_s for store in stores), 2),
                attack_network_evals_per_image=nfe,
                resumed_images=resumed,
                gradients=[g for store in stores for g in store.grads],
                **m,
            )
            if pitfall:
                m_undef = _evaluate_restarts(undefended, advs, choices, y, 1, args.batch_size, classes)
                record(
                    defense="none",
                    attack=attack,
                    eps=eps,
                    eot=1,
                    attack_steps=s,
                    restarts=args.restarts,
                    loss=args.loss,
                    **m_undef,
                )
    bar.close()
    sanity = _sanity(args, cfg, defense, undefended, x, y, classes, records, extras)
    report = {
        **report_header(args.command_line, args.device, args.model, pipe.info),
        "classifier": {
            "path": args.classifier,
            "test_accuracy": cls_header.test_accuracy,
            "hash": cls_header.content_hash,
        },
        "purifier": {
            "t_star": args.t_star,
            "sampler": args.sampler,
            "steps": args.steps,
            "nfe": defense.nfe,
            "eta": 0.0,
            "clip_x0": True,
            "grad_checkpoint": checkpoint,
        },
        "threat": threat,
        "eps_scale": "[0, 1] pixel scale (2*eps in the model's [-1, 1] units)",
        "n": args.n,
        "draws": args.draws,
        "restarts": args.restarts,
        "loss": args.loss,
        "step_size": args.step_size if args.step_size is not None else "eps/4",
        "results": records,
        "sanity": sanity,
    }
    (out / "robust.json").write_text(json.dumps(report, indent=2))
    _plots(report, cfg, out)
    headline = [r for r in records if r["attack"] == "none" or r.get("attack_steps") == max(steps)]
    print(
        json.dumps(
            [
                {k: r.get(k) for k in ("defense", "attack", "eps", "eot", "mean", "worst", "majority")}
                for r in headline
            ]
        )
    )
    for failure in sanity["failed"]:  # a finding, not an error: the report stands, with this next to it
        print(f"WARNING: sanity check failed: {failure}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class SanityAttack:
    """An attack on the first --sanity-n images that a sanity check needs beside the reported ones.

    For the "eot" and "steps" checks, ``reported`` is restart 0 of the reported attack it is compared
    with and ``reported_value`` that attack's EOT or step count; "large_eps" compares with nothing.
    """

    check: str
    attack: str
    eps: float
    eot: int
    steps: int
    step_size: float | None
    store: AdversarialStore
    reported: AdversarialStore | None = None
    reported_value: int = 0


def _sanity_attacks(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    fingerprint: dict[str, Any],
    reported: dict[tuple[str, float, int], AdversarialStore],
) -> list[SanityAttack]:
    """The sanity checks' own attacks, planned with the reported ones so their stores are checked first.

    With several --eot (--attack-steps) values the report's rows show the trend on all n images.
    With one, the strongest attack is run again on the --sanity-n images at EOT 1 (at half the
    steps), or at 2 where that one value is 1, with the same seeds, and compared with the reported
    attack on the same images: the check always runs, at a fraction of the attack's cost.
    """
    extras: list[SanityAttack] = []
    top_steps = max(cfg["attack_steps"])
    strongest = next((a for a in reversed(GRADIENT_ATTACKS) if a in cfg["attacks"]), None)
    if strongest is None:
        return extras
    with_eot = strongest != "classifier-only"

    def add(check: str, eps: float, eot: int, steps: int, **more: Any) -> None:
        prefix = "sanity-" if check == "large_eps" else f"sanity-{check}-"
        store = _store(args, fingerprint, strongest, eps, eot, [steps], prefix=prefix)
        extras.append(SanityAttack(check, strongest, eps, eot, steps, store=store, **more))

    if len(cfg["eot"]) == 1 and with_eot:
        eot = cfg["eot"][0]
        for eps in cfg["eps"]:
            main = reported[(strongest, eps, eot)]
            weaker = 1 if eot > 1 else 2
            add("eot", eps, weaker, top_steps, step_size=args.step_size, reported=main, reported_value=eot)
    if len(cfg["attack_steps"]) == 1:
        eot = max(cfg["eot"]) if with_eot else 1
        other = top_steps // 2 if top_steps > 1 else 2
        for eps in cfg["eps"]:
            main = reported[(strongest, eps, eot)]
            add("steps", eps, eot, other, step_size=args.step_size, reported=main, reported_value=top_steps)
    if cfg["sanity_eps"] > 0:
        add(
            "large_eps",
            cfg["sanity_eps"],
            min(cfg["eot"]) if with_eot else 1,
            min(top_steps, 20),
            step_size=None,
        )
    return extras


def _trend(
    by: str, metrics: list[dict[str, Any]], tol: float, compared: str, **setting: Any
) -> dict[str, Any]:
    """Whether accuracy, the mean over draws and the majority vote both, stays within ``tol`` of its
    previous value as the attack gets stronger (``metrics`` ordered from the weakest attack)."""
    means, majorities = [m["mean"] for m in metrics], [m["majority"] for m in metrics]
    ok = all(b <= a + tol for series in (means, majorities) for a, b in itertools.pairwise(series))
    return {
        **setting,
        f"mean_by_{by}": means,
        f"majority_by_{by}": majorities,
        "n": metrics[0]["n"],
        "tolerance": tol,
        "compared": compared,
        "non_increasing": ok,
    }


def _row_trends(
    records: list[dict[str, Any]], cfg: dict[str, Any], n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Accuracy against steps and against EOT from the report's own rows (where they hold several)."""
    top_steps, tol, compared = max(cfg["attack_steps"]), 2.0 / n, f"report rows, all {n} images"
    attacked = [r for r in records if r["defense"] == "purifier" and r["attack"] != "none"]
    by_steps, by_eot = [], []
    for r in (r for r in attacked if r["attack_steps"] == top_steps):
        same = [q for q in attacked if q["attack"] == r["attack"] and q["eps"] == r["eps"]]
        series = [q for q in same if q["eot"] == r["eot"]]
        setting = {"attack": r["attack"], "eps": r["eps"]}
        if len(series) > 1:
            steps = [q["attack_steps"] for q in series]
            by_steps.append(
                _trend("steps", series, tol, compared, **setting, eot=r["eot"], attack_steps=steps)
            )
        series = [q for q in same if q["attack_steps"] == top_steps]
        if len(series) > 1 and r["eot"] == max(cfg["eot"]):
            eots = [q["eot"] for q in series]
            by_eot.append(_trend("eot", series, tol, compared, **setting, attack_steps=top_steps, eot=eots))
    return by_steps, by_eot


def _sanity(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    defense: PurifiedClassifier,
    undefended: PurifiedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    records: list[dict[str, Any]],
    extras: list[SanityAttack],
) -> dict[str, Any]:
    """The checks an honest robustness number needs next to it, and the list of those that failed."""
    out: dict[str, Any] = {}
    grads = [g for r in records for g in r.get("gradients", [])]
    out["gradients_finite"] = all(g["finite"] for g in grads) if grads else None
    out["gradients_nonzero"] = all(g["nonzero_fraction"] > 0 for g in grads) if grads else None
    by_steps, by_eot = _row_trends(records, cfg, args.n)
    k = cfg["sanity_n"]
    xk, yk = x[:k], y[:k]

    def evaluate(advs: torch.Tensor) -> dict[str, Any]:
        return _evaluate(defense, advs.to(x.device), yk, args.draws, args.batch_size, classes)[0]

    for e in extras:
        with tqdm(total=k, desc=f"sanity {e.check} eps={e.eps:g}", unit="img") as bar:
            _attack(
                undefended if e.attack == "classifier-only" else defense,
                e.attack,
                xk,
                yk,
                eps=e.eps,
                threat=args.threat,
                steps=[e.steps],
                eot=e.eot,
                step_size=e.step_size,
                seed=args.seed,
                bar=bar,
                store=e.store,
                loss=args.loss,
            )
        m = evaluate(e.store.advs[e.steps])
        wall_s = round(e.store.wall_s, 1)  # of this check's own attack
        if e.reported is None:
            out["large_eps"] = {
                "attack": e.attack,
                "eps": e.eps,
                "attack_steps": e.steps,
                "eot": e.eot,
                "n": k,
                "mean": m["mean"],
                "majority": m["majority"],
                "reaches_zero": m["mean"] <= 0.1,
                "wall_s": wall_s,
            }
            continue
        own, theirs = (e.eot if e.check == "eot" else e.steps), e.reported_value
        base = evaluate(e.reported.advs[e.steps if e.check == "eot" else theirs][:k])
        (weak, m_weak), (strong, m_strong) = sorted([(own, m), (theirs, base)], key=lambda p: p[0])
        label = "EOT" if e.check == "eot" else "steps"
        compared = (
            f"the first {k} images: the reported attack (restart 0) at {label} {theirs} and the same "
            f"attack and seeds at {label} {own}, run for this check"
        )
        if e.check == "eot":
            setting = {"attack_steps": e.steps, "eot": [weak, strong]}
        else:
            setting = {"eot": e.eot, "attack_steps": [weak, strong]}
        entry = _trend(e.check, [m_weak, m_strong], 2.0 / k, compared, attack=e.attack, eps=e.eps, **setting)
        (by_eot if e.check == "eot" else by_steps).append(entry | {"wall_s": wall_s})
    out["non_increasing_in_steps"] = by_steps
    out["non_increasing_in_eot"] = by_eot
    out["tolerance"] = "2 images of those compared (each check records its own)"
    out["failed"] = sanity_failures(out)
    out["passed"] = not out["failed"]
    return out


def sanity_failures(sanity: dict[str, Any]) -> list[str]:
    """One line per failed check: printed as a warning and kept in the report, which stays valid."""
    failed = []
    if sanity["gradients_finite"] is False:
        failed.append("gradients_finite: a first attack gradient has NaN or infinite entries")
    if sanity["gradients_nonzero"] is False:
        failed.append("gradients_nonzero: a first attack gradient is all zeros (masked gradients?)")
    for key, by, values in (
        ("non_increasing_in_steps", "steps", "attack_steps"),
        ("non_increasing_in_eot", "eot", "eot"),
    ):
        for c in (c for c in sanity[key] if not c["non_increasing"]):
            failed.append(
                f"{key}: {c['attack']} eps {c['eps']:g}, {by} {_fmt(c[values], 'd')}: accuracy rose with "
                f"the stronger attack (mean {_fmt(c[f'mean_by_{by}'])}, majority "
                f"{_fmt(c[f'majority_by_{by}'])}; tolerance {c['tolerance']:.3f}, n {c['n']}): "
                "the attack is not converged or its estimate is too noisy"
            )
    big = sanity.get("large_eps")
    if big is not None and not big["reaches_zero"]:
        failed.append(
            f"large_eps: {big['attack']} at eps {big['eps']:g} leaves mean accuracy {big['mean']:.3f} "
            f"> 0.1 on {big['n']} images (too few steps, or masked gradients)"
        )
    return failed


def _fmt(values: list[Any], spec: str = ".3f") -> str:
    return " -> ".join(format(v, spec) for v in values)


def _plots(report: dict[str, Any], cfg: dict[str, Any], out: Path) -> None:
    rows = report["results"]
    top_steps, top_eot = max(cfg["attack_steps"]), max(cfg["eot"])
    clean = next(r for r in rows if r["defense"] == "purifier" and r["attack"] == "none")
    pur = report["purifier"]

    def vs_eps(ax: Any) -> None:
        for defense, attack in [("none", "classifier-only"), *[("purifier", a) for a in GRADIENT_ATTACKS]]:
            pts = [
                r
                for r in rows
                if r["defense"] == defense
                and r["attack"] == attack
                and r.get("attack_steps") == top_steps
                and r.get("eot") in (1 if attack == "classifier-only" else top_eot,)
            ]
            if pts:
                label = (
                    "undefended classifier"
                    if defense == "none"
                    else f"purifier, {attack}" + (" (pitfall)" if attack == "classifier-only" else "")
                )
                ax.plot(
                    [0.0] + [p["eps"] for p in pts],
                    [clean["majority"] if defense == "purifier" else rows[0]["mean"]]
                    + [p["majority"] for p in pts],
                    "o-",
                    label=label,
                )
        ax.set_xlabel(f"eps ({report['threat']}, [0, 1] scale)")
        ax.set_ylabel(f"majority-vote accuracy (R={report['draws']})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(
            f"{report['model']['name']}: n={report['n']}, {top_steps} PGD steps, EOT {top_eot}", fontsize=9
        )
        _legend(ax)

    def vs_steps(ax: Any) -> None:
        for attack in GRADIENT_ATTACKS:
            for eps in cfg["eps"]:
                pts = [
                    r
                    for r in rows
                    if r["defense"] == "purifier"
                    and r["attack"] == attack
                    and r["eps"] == eps
                    and r.get("eot") == (1 if attack == "classifier-only" else top_eot)
                ]
                if pts:
                    ax.plot(
                        [p["attack_steps"] for p in pts],
                        [p["majority"] for p in pts],
                        "o-",
                        label=f"{attack}, eps={eps}",
                    )
        ax.set_xlabel("PGD steps")
        ax.set_ylabel(f"majority-vote accuracy (R={report['draws']})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(
            f"{report['model']['name']}: purifier t*={pur['t_star']}, {pur['sampler']} {pur['steps']} steps",
            fontsize=9,
        )
        _legend(ax)

    save_plot(out / "robust_vs_eps.png", vs_eps)
    save_plot(out / "robust_vs_steps.png", vs_steps)


def _legend(ax: Any) -> None:
    """A legend only where something is drawn: --attacks none leaves the axes empty."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
