from __future__ import annotations

import pytest
import torch

from models.evaluation.common import wilson_interval
from models.evaluation.metrics import vote_metrics


def test_vote_metrics_on_a_constructed_case() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    preds = torch.tensor(
        [
            [0, 1, 2, 0],  # image 0 always right; 1 right 2/3; 2 right 1/3; 3 never
            [0, 1, 0, 1],
            [0, 0, 1, 2],
        ]
    )
    m = vote_metrics(preds, labels, num_classes=4)
    assert m["mean"] == pytest.approx(6 / 12)
    assert m["worst"] == pytest.approx(1 / 4)
    assert m["best"] == pytest.approx(3 / 4)
    assert m["majority"] == pytest.approx(
        2 / 4
    )  # images 0 and 1 win the vote; image 2's votes 2,0,1 tie -> 0
    assert m["majority_per_image"] == "1100"


@pytest.mark.parametrize("seed", range(20))
def test_worst_mean_majority_best_relations(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r, n, c = 5, 50, 3
    labels = torch.randint(0, c, (n,), generator=g)
    flips = torch.rand(r, n, generator=g) < torch.rand(n, generator=g)
    preds = torch.where(flips, torch.randint(0, c, (r, n), generator=g), labels)
    m = vote_metrics(preds, labels, c)
    assert m["worst"] <= m["mean"] <= m["best"]
    assert m["worst"] <= m["majority"] <= m["best"]
    for key in ("mean", "worst", "majority", "best"):
        lo, hi = m[f"{key}_ci95"]
        assert lo <= m[key] <= hi


def test_one_draw_makes_all_summaries_equal() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    m = vote_metrics(torch.tensor([[0, 0, 1, 1]]), labels, 2)
    assert m["mean"] == m["worst"] == m["majority"] == m["best"] == 0.5


def test_wilson_width_shrinks_with_n_and_stays_in_range() -> None:
    widths = [hi - lo for lo, hi in (wilson_interval(0.7 * n, n) for n in (10, 100, 1000, 10000))]
    assert widths == sorted(widths, reverse=True)
    assert wilson_interval(0, 20)[0] >= 0.0 and wilson_interval(20, 20)[1] <= 1.0
    assert wilson_interval(0, 20)[1] > 0  # a zero count still has uncertainty
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
