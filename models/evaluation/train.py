"""``robustdiff eval train-classifier``: train and save the Fashion-MNIST classifier."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.checkpoint import read_header
from models.data import load_fashion_mnist
from models.devices import device_option
from models.evaluation.attacks import THREATS, PurifiedClassifier, predict_draws
from models.evaluation.classifier import (
    DEFAULT_CLASSIFIER,
    AdversarialTraining,
    ClassifierConfig,
    ClassifierHeader,
    Purify,
    accuracy,
    load_classifier,
    read_classifier_header,
    save_classifier,
    train_classifier,
)
from models.evaluation.cli import check, check_classifier_fits_config, check_purifier, parse_list
from models.evaluation.common import now_utc
from models.paths import output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help=f"safetensors file to write (required: never the committed {DEFAULT_CLASSIFIER.name} by accident)",
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--widths", default=None, help="channels per stage (default 32,64,128; not with --init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        type=device_option,
        help="torch device to train on (cpu, cuda, cuda:N, auto)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; else >= 1)"
    )
    p.add_argument(
        "--train-n",
        type=int,
        default=0,
        help="train on a random subset of this many training images (0 = all 60,000)",
    )
    p.add_argument(
        "--init", default=None, help="classifier (safetensors) to fine-tune instead of a fresh one"
    )
    p.add_argument(
        "--purifier",
        default=None,
        help="diffusion/consistency checkpoint: train on its purified images (purifier-aware classifier)",
    )
    p.add_argument("--purify-t-star", type=float, default=0.4, help="purification depth t* of --purifier")
    p.add_argument(
        "--purify-sampler", default=None, help="sampler of --purifier (default: ddim, consistency for CMs)"
    )
    p.add_argument("--purify-steps", type=int, default=5, help="sampler steps (NFE) of --purifier")
    p.add_argument(
        "--purify-fraction", type=float, default=0.5, help="share of each batch that is purified (0, 1]"
    )
    p.add_argument(
        "--purified-eval-n",
        type=int,
        default=1000,
        help="with --purifier: test images whose purified versions are also scored (0 = skip)",
    )
    p.add_argument(
        "--adversarial-eps",
        type=float,
        default=0.0,
        help="PGD adversarial training at this radius ([0, 1] pixel scale; 0 = off)",
    )
    p.add_argument("--adversarial-steps", type=int, default=5, help="PGD steps per training batch")
    p.add_argument("--adversarial-step-size", type=float, default=None, help="[0, 1] scale; default eps/4")
    p.add_argument("--adversarial-threat", default="linf", help=f"one of {', '.join(THREATS)}")


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, no GPU"


def _validate(
    args: argparse.Namespace,
) -> tuple[ClassifierConfig, ClassifierHeader | None, AdversarialTraining | None]:
    """Every check that needs only the arguments and headers: fail before any data is read."""
    check(
        args.epochs >= 1 and args.batch_size >= 1 and args.lr > 0, "epochs/batch-size/lr", "must be positive"
    )
    check(args.train_n >= 0, "train-n", "must be >= 0")
    check(args.threads >= 0, "threads", f"must be >= 1 (or 0 for torch's default), got {args.threads}")
    output_file(args.out, "out", suffixes=[".safetensors"])
    check(
        0.0 < args.purify_fraction <= 1.0, "purify-fraction", f"must be in (0, 1], got {args.purify_fraction}"
    )
    check(args.purified_eval_n >= 0, "purified-eval-n", "must be >= 0")
    check(args.adversarial_eps >= 0, "adversarial-eps", f"must be >= 0, got {args.adversarial_eps}")
    adversarial = (
        AdversarialTraining(
            args.adversarial_eps, args.adversarial_steps, args.adversarial_step_size, args.adversarial_threat
        )
        if args.adversarial_eps > 0
        else None
    )
    init = read_classifier_header(args.init) if args.init else None
    check(init is None or args.widths is None, "widths", "the architecture comes from --init; drop --widths")
    if init is not None:
        config = init.model
    else:
        widths = tuple(parse_list(args.widths or "32,64,128", int, "widths"))
        check(all(w >= 1 for w in widths), "widths", "must be >= 1")
        config = ClassifierConfig(widths=widths)
    if args.purifier:
        args.purify_sampler = check_purifier(
            args.purifier, args.purify_sampler, args.purify_steps, [args.purify_t_star]
        )
        check_classifier_fits_config(config, read_header(args.purifier).image_shape)
    return config, init, adversarial


def _purifier(args: argparse.Namespace) -> tuple[PurifiedClassifier, dict[str, Any]]:
    """The same purifier `eval robust` attacks (sampler, steps, t*), without gradients."""
    from models.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(args.purifier, args.device, batch_invariant=False)
    pipe.net.requires_grad_(False)
    purifier = PurifiedClassifier(
        torch.nn.Identity(),
        pipe.denoiser(),
        t_star=args.purify_t_star,
        sampler=args.purify_sampler,
        steps=args.purify_steps,
        checkpoint=False,
    )
    described = {
        "model": Path(args.purifier).name,
        "model_hash": pipe.info.hash,
        "t_star": args.purify_t_star,
        "sampler": args.purify_sampler,
        "steps": args.purify_steps,
        "fraction": args.purify_fraction,
    }
    return purifier, described


def _fresh_noise(purifier: PurifiedClassifier) -> Purify:
    """Training draws new purifier noise for every batch, seeded from the trainer's generator."""

    def purify(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**62, (x.shape[0],), generator=gen)
        with torch.no_grad():
            return purifier.purify(x, seeds)

    return purify


@torch.no_grad()
def _purified_accuracy(
    net: torch.nn.Module,
    purifier: PurifiedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
) -> float:
    """Accuracy on purified test images under `eval robust`'s first evaluation draw."""
    defense = dataclasses.replace(purifier, classifier=net.eval())
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x, y = images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        predicted = predict_draws(defense, x, torch.arange(i, i + x.shape[0]), draws=1)[0]
        correct += int((predicted == y).sum())
    return correct / images.shape[0]


def run(args: argparse.Namespace) -> int:
    config, init_header, adversarial = _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train", args.data), load_fashion_mnist("test", args.data)
    images, labels = train.images, train.labels
    if args.train_n:
        check(args.train_n <= images.shape[0], "train-n", f"at most {images.shape[0]} training images")
        subset = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[
            : args.train_n
        ]
        images, labels = images[subset], labels[subset]
    check(
        images.shape[0] >= args.batch_size, "batch-size", f"larger than the {images.shape[0]} training images"
    )
    init = load_classifier(args.init)[0] if args.init else None
    purifier, described = _purifier(args) if args.purifier else (None, None)
    bar = tqdm(total=args.epochs * (images.shape[0] // args.batch_size), desc="train-classifier", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    start = time.perf_counter()
    net = train_classifier(
        config,
        (images, labels),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress=progress,
        init=init,
        purify=_fresh_noise(purifier) if purifier is not None else None,
        purify_fraction=args.purify_fraction,
        adversarial=adversarial,
    )
    wall = time.perf_counter() - start
    bar.close()
    acc = accuracy(net, test.images, test.labels)
    purified_acc = None
    if purifier is not None and args.purified_eval_n:
        n = min(args.purified_eval_n, len(test))
        purified_acc = _purified_accuracy(net, purifier, test.images[:n], test.labels[:n], args.batch_size)
    header = ClassifierHeader(
        name=Path(args.out).stem,
        model=config,
        dataset="fashion-mnist",
        class_names=train.class_names,
        test_accuracy=acc,
        command=args.command_line,
        hardware=_hardware(args.device),
        date=now_utc(),
        wall_time_s=round(wall, 1),
        epochs=args.epochs,
        fine_tuned_from=init_header.content_hash if init_header else None,
        purifier=described,
        purified_test_accuracy=purified_acc,
        adversarial=dataclasses.asdict(adversarial) if adversarial else None,
    )
    header = save_classifier(args.out, net, header)
    result = {"out": args.out, "test_accuracy": acc, "wall_time_s": round(wall, 1)}
    if purified_acc is not None:
        result["purified_test_accuracy"] = purified_acc
    print(json.dumps(result))
    return 0
