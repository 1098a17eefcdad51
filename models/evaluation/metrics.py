"""Accuracy over R purifier draws: mean, worst-of-R, majority vote and best-of-R, with Wilson CIs."""

from __future__ import annotations

from typing import Any

import torch

from models.evaluation.common import wilson_interval


def vote_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``preds`` [R, N] predicted labels, ``labels`` [N].

    - mean: accuracy averaged over the R draws (what one request sees on average);
    - worst: an image counts only if all R draws classify it correctly (worst-of-R);
    - majority: the most-voted label (ties to the lowest class index) is correct;
    - best: at least one draw is correct.
    Always worst <= mean <= best and worst <= majority <= best. Intervals are 95% Wilson intervals
    over the n images; for the mean this treats the per-image averages as n trials (conservative).
    ``majority_per_image`` ("1" right, "0" wrong, image by image) lets ``eval compare`` pair two
    reports on the same images, which separates models far better than two overlapping intervals.
    """
    if preds.ndim != 2 or preds.shape[1] != labels.shape[0]:
        raise ValueError("preds must be [R, N] with N = len(labels)")
    r, n = preds.shape
    correct = preds == labels[None, :]
    votes = torch.nn.functional.one_hot(preds.long(), num_classes).sum(0)  # [N, C]
    majority = votes.argmax(1) == labels
    values = {
        "mean": float(correct.float().mean()),
        "worst": float(correct.all(0).float().mean()),
        "majority": float(majority.float().mean()),
        "best": float(correct.any(0).float().mean()),
    }
    out: dict[str, Any] = {"n": n, "draws": r}
    for name, v in values.items():
        out[name] = v
        out[f"{name}_ci95"] = list(wilson_interval(v * n, n))
    out["majority_per_image"] = "".join("1" if ok else "0" for ok in majority.tolist())
    return out
