"""``eval corruption``: how well purification removes Gaussian noise and salt-and-pepper.

PSNR and SSIM are measured against the clean images on the [0, 1] scale (data range 1); SSIM is
Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, valid region.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import read_header
from models.devices import device_option
from models.evaluation.attacks import EVAL_PURPOSE, PurifiedClassifier, draw_seeds
from models.evaluation.classifier import DEFAULT_CLASSIFIER, load_classifier
from models.evaluation.cli import check, check_classifier_fits, check_purifier, parse_list
from models.evaluation.common import report_header, save_plot, wilson_interval
from models.paths import output_dir


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], on the [0, 1] scale; identical images give ``max_db``."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).clamp(max=max_db)


def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised 1-D SSIM window, in float64 on ``device`` (that of the images it filters)."""
    t = torch.arange(size, dtype=torch.float64, device=device)
    g = torch.exp(-((t - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image mean SSIM of images in [-1, 1] (computed on the [0, 1] scale, channels averaged)."""
    a, b = _unit(x).double(), _unit(y).double()
    c = a.shape[1]
    g = gaussian_window(size, sigma, a.device)
    wh = g.reshape(1, 1, 1, size).repeat(c, 1, 1, 1)
    wv = g.reshape(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, wh, groups=c), wv, groups=c)

    c1, c2 = k1**2, k2**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusion or consistency checkpoint used as purifier")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="classifier scored before/after")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the Debian dataset)")
    p.add_argument("--t-star", default="0.05,0.1,0.2", help="comma-separated purification depths")
    p.add_argument(
        "--sampler", default=None, help="purifier sampler (default: ddim; consistency for CM checkpoints)"
    )
    p.add_argument("--steps", type=int, default=5, help="purifier sampler steps (NFE)")
    p.add_argument("--sigma", type=float, default=0.2, help="Gaussian noise std on the [0, 1] scale")
    p.add_argument("--amount", type=float, default=0.1, help="share of pixels hit by salt-and-pepper")
    p.add_argument("--n", type=int, default=256, help="test images (the first n of the test split)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption noise")
    p.add_argument("--out", default="eval-corruption", help="output folder (JSON and PNG plot)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda, cuda:N or auto")


def validate(args: argparse.Namespace) -> list[float]:
    output_dir(args.out, "out")
    check(args.seed >= 0, "seed", f"must be >= 0, got {args.seed}")
    t_stars = parse_list(args.t_star, float, "t-star")
    check(
        math.isfinite(args.sigma) and args.sigma >= 0, "sigma", f"must be finite and >= 0, got {args.sigma}"
    )
    check(0 <= args.amount <= 1, "amount", "must be in [0, 1]")
    check(args.n >= 1 and args.batch_size >= 1 and args.steps >= 1, "n/batch-size/steps", "must be >= 1")
    args.sampler = check_purifier(args.model, args.sampler, args.steps, t_stars)
    check_classifier_fits(args.classifier, read_header(args.model).image_shape)
    return t_stars


def _summary(
    name: str, restored: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module
) -> dict[str, Any]:
    with torch.no_grad():
        correct = int((classifier(restored).argmax(1) == labels).sum())
    n = labels.shape[0]
    return {
        "images": name,
        "psnr_db": float(psnr(restored, clean).mean()),
        "ssim": float(ssim(restored, clean).mean()),
        "accuracy": correct / n,
        "accuracy_ci95": list(wilson_interval(correct, n)),
    }


def corrupted_inputs(
    x: torch.Tensor, y: torch.Tensor, sigma: float, amount: float, seed: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clean images, labels and each corrupted version, on ``device`` beside the classifier.

    The noise is drawn on the CPU from ``seed``, so every device purifies the same corrupted images.
    """
    from models.data import gaussian_noise, salt_and_pepper

    gen = torch.Generator().manual_seed(seed)
    corrupted = {
        "clean": x,
        f"gaussian sigma={sigma}": gaussian_noise(x, sigma, 1.0, gen)[0],
        f"salt-and-pepper amount={amount}": salt_and_pepper(x, amount, 1.0, gen)[0],
    }
    return x.to(device), y.to(device), {name: images.to(device) for name, images in corrupted.items()}


def run(args: argparse.Namespace) -> int:
    from models.data import load_fashion_mnist
    from models.pipeline import Pipeline

    t_stars = validate(args)
    classifier, cls_header = load_classifier(args.classifier, args.device)
    test = load_fashion_mnist("test", args.data)
    x, y, corrupted = corrupted_inputs(
        test.images[: args.n], test.labels[: args.n], args.sigma, args.amount, args.seed, args.device
    )
    pipe = Pipeline.from_checkpoint(args.model, args.device, batch_invariant=False)
    out = Path(args.out)  # created only once every input has loaded: a bad path leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name, images in corrupted.items():
        rows.append({"t_star": 0.0, **_summary(name, images, x, y, classifier)})
    with (
        tqdm(total=len(t_stars) * len(corrupted) * args.n, desc="eval corruption", unit="img") as bar,
        torch.no_grad(),
    ):
        for t in t_stars:
            defense = PurifiedClassifier(
                classifier, pipe.denoiser(), t_star=t, sampler=args.sampler, steps=args.steps
            )
            for name, images in corrupted.items():
                parts, start = [], time.perf_counter()
                for i in range(0, args.n, args.batch_size):
                    sl = slice(i, min(i + args.batch_size, args.n))
                    parts.append(
                        defense.purify(
                            images[sl], draw_seeds(torch.arange(sl.start, sl.stop), EVAL_PURPOSE, 0)
                        )
                    )
                    bar.update(sl.stop - sl.start)
                wall = time.perf_counter() - start
                rows.append(
                    {
                        "t_star": t,
                        "purify_s_per_image": wall / args.n,
                        **_summary(name, torch.cat(parts), x, y, classifier),
                    }
                )
    report = {
        **report_header(args.command_line, args.device, args.model, pipe.info),
        "classifier": {
            "path": args.classifier,
            "test_accuracy": cls_header.test_accuracy,
            "hash": cls_header.content_hash,
        },
        "purifier": {"sampler": args.sampler, "steps": args.steps},
        "n": args.n,
        "ssim": "Gaussian window 11x11, sigma 1.5, K1=0.01, K2=0.03, data range 1, valid region",
        "results": rows,
    }
    (out / "corruption.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "corruption.png")
    print(json.dumps([{k: r[k] for k in ("images", "t_star", "psnr_db", "ssim", "accuracy")} for r in rows]))
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    pur = report["purifier"]

    def draw(ax: Any) -> None:
        for name in dict.fromkeys(r["images"] for r in report["results"]):
            pts = [r for r in report["results"] if r["images"] == name]
            ax.plot([p["t_star"] for p in pts], [p["accuracy"] for p in pts], "o-", label=name)
        ax.set_xlabel("t* (0 = no purification)")
        ax.set_ylabel("classifier accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(
            f"{report['model']['name']}: {pur['sampler']} {pur['steps']} steps, n={report['n']}",
            fontsize=9,
        )
        ax.legend(fontsize=7)

    save_plot(path, draw)
