"""``robustdiff eval train-classifier``: train and save the Fashion-MNIST classifier."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.data import load_fashion_mnist
from models.devices import device_option
from models.errors import UserError
from models.evaluation.classifier import (
    DEFAULT_CLASSIFIER,
    ClassifierConfig,
    ClassifierHeader,
    accuracy,
    save_classifier,
    train_classifier,
)
from models.evaluation.common import now_utc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(DEFAULT_CLASSIFIER), help="safetensors file to write")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--widths", default="32,64,128", help="channels per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        type=device_option,
        help="torch device to train on (cpu, cuda, cuda:N, auto)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, no GPU"


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("epochs/batch-size/lr", "must be positive")
    widths = tuple(int(w) for w in args.widths.split(","))
    config = ClassifierConfig(widths=widths)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train", args.data), load_fashion_mnist("test", args.data)
    bar = tqdm(total=args.epochs * (len(train) // args.batch_size), desc="train-classifier", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    start = time.perf_counter()
    net = train_classifier(
        config,
        (train.images, train.labels),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    wall = time.perf_counter() - start
    bar.close()
    acc = accuracy(net, test.images, test.labels)
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
    )
    header = save_classifier(args.out, net, header)
    print(json.dumps({"out": args.out, "test_accuracy": acc, "wall_time_s": round(wall, 1)}))
    return 0
