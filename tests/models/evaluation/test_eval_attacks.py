from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.evaluation.attacks import (
    ATTACK_PURPOSE,
    EVAL_PURPOSE,
    SELECT_PURPOSE,
    PurifiedClassifier,
    attack_loss,
    attacker_view,
    bpda,
    draw_seeds,
    make_oracle,
    pgd,
    pick_restarts,
    predict_draws,
    project,
)
from models.evaluation.classifier import ClassifierConfig, ResNetClassifier, load_classifier
from models.evaluation.metrics import vote_metrics
from models.evaluation.robust import _evaluate_restarts, _predict
from models.pipeline import Pipeline


def _undefended(seed: int = 0) -> tuple[PurifiedClassifier, torch.Tensor, torch.Tensor]:
    """A random tiny classifier and images it 'classifies correctly' by construction (its own labels)."""
    torch.manual_seed(seed)
    net = ResNetClassifier(ClassifierConfig(image_size=16, widths=(8, 16))).eval()
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        y = net(x).argmax(1)
    return PurifiedClassifier(net, None), x, y


@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize(("threat", "eps"), [("linf", 0.5), ("l2", 8.0)])
def test_pgd_on_an_undefended_classifier_reaches_zero_at_large_eps(
    threat: str, eps: float, loss: str
) -> None:
    defense, x, y = _undefended()
    idx = torch.arange(x.shape[0])
    oracle = make_oracle(defense, "classifier-only", eot=1, loss=loss)
    res = pgd(oracle, x, y, idx, eps=eps, threat=threat, steps=20, record=(0, 20))
    clean = float((predict_draws(defense, res.at_steps[0], idx, 1)[0] == y).float().mean())
    adv = float((predict_draws(defense, res.at_steps[20], idx, 1)[0] == y).float().mean())
    assert adv <= 0.05 < clean
    assert res.grad.finite and res.grad.nonzero_fraction > 0


def test_pgd_reports_every_step_to_its_callback() -> None:
    defense, x, y = _undefended()
    seen: list[tuple[int, int]] = []
    pgd(
        make_oracle(defense, "classifier-only", 1),
        x,
        y,
        torch.arange(16),
        eps=0.1,
        threat="linf",
        steps=4,
        callback=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_pgd_with_zero_eps_changes_nothing() -> None:
    defense, x, y = _undefended()
    res = pgd(
        make_oracle(defense, "classifier-only", 1), x, y, torch.arange(16), eps=0.0, threat="linf", steps=3
    )
    assert torch.equal(res.at_steps[3], x)


@pytest.mark.parametrize("threat", ["linf", "l2"])
def test_projection_stays_in_the_ball_and_the_image_range(threat: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    x_adv = x + 3 * torch.randn(x.shape, generator=g)
    p = project(x_adv, x, 0.2, threat)
    d = (p - x).flatten(1)
    norms = d.abs().amax(1) if threat == "linf" else d.norm(dim=1)
    assert bool((norms <= 0.2 + 1e-6).all())
    assert float(p.min()) >= -1 and float(p.max()) <= 1


def test_bpda_backward_is_the_identity() -> None:
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    w = torch.randn(4, 1, 8, 8)
    y = bpda(lambda z: torch.tanh(3 * z) ** 2, x)
    assert torch.allclose(y, torch.tanh(3 * x.detach()) ** 2)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(grad, w)


def test_attack_selection_and_evaluation_seeds_never_collide() -> None:
    idx = torch.arange(1000)
    attack = torch.cat([draw_seeds(idx, ATTACK_PURPOSE, d) for d in range(50)])
    evaluation = torch.cat([draw_seeds(idx, EVAL_PURPOSE, r) for r in range(16)])
    selection = torch.cat([draw_seeds(idx, SELECT_PURPOSE, e) for e in range(8)])
    union = set(attack.tolist()) | set(evaluation.tolist()) | set(selection.tolist())
    assert len(union) == len(attack) + len(evaluation) + len(selection)


def test_the_margin_loss_is_the_best_other_logit_minus_the_true_one() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [-5.0, 0.0, 4.0]])
    y = torch.tensor([0, 1, 2])
    assert attack_loss(logits, y, "margin").tolist() == [2.0, -1.0, -4.0]
    ce = attack_loss(logits, y, "ce")
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    with pytest.raises(ValueError, match="loss must be one of"):
        attack_loss(logits, y, "dlr")
    with pytest.raises(ValueError, match="loss must be one of"):
        make_oracle(_undefended()[0], "pgd-eot", eot=1, loss="hinge")


def test_pick_restarts_prefers_more_fooled_draws_then_the_larger_loss() -> None:
    wrong = torch.tensor([[0.5, 1.0, 0.0, 0.25], [1.0, 1.0, 0.0, 0.25], [0.0, 0.5, 0.0, 0.25]])
    loss = torch.tensor([[9.0, 1.0, 0.1, 2.0], [0.1, 3.0, 0.3, 1.0], [50.0, 99.0, 0.2, 3.0]])
    assert pick_restarts(wrong, loss).tolist() == [1, 1, 1, 2]
    assert pick_restarts(wrong[:1], loss[:1]).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="restarts, images"):
        pick_restarts(wrong, loss[:2])


def test_the_attacker_view_of_an_undefended_classifier_is_its_error_and_loss() -> None:
    defense, x, y = _undefended()
    y = y.roll(1)  # some images now carry a label the classifier does not give them
    wrong, loss = attacker_view(defense, x, y, torch.arange(x.shape[0]), draws=3)
    logits = defense.logits(x, torch.zeros(x.shape[0], dtype=torch.long)).detach()
    assert torch.equal(wrong, (logits.argmax(1) != y).float())
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, y, reduction="none"), atol=1e-6)


@pytest.fixture(scope="module")
def purifier(tiny_model16: Path, tiny_classifier16: Path) -> tuple[Pipeline, PurifiedClassifier]:
    pipe = Pipeline.from_checkpoint(tiny_model16, batch_invariant=False)
    pipe.net.requires_grad_(False)
    cls, _ = load_classifier(tiny_classifier16)
    return pipe, PurifiedClassifier(cls, pipe.denoiser(), t_star=0.1, sampler="ddim", steps=3)


def test_full_gradient_pgd_through_a_tiny_purifier_is_finite_and_nonzero(
    purifier: tuple[Pipeline, PurifiedClassifier],
) -> None:
    _, defense = purifier
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2])
    grad = make_oracle(defense, "pgd-eot", eot=2)(x, y, torch.arange(3), 0)
    assert grad.shape == x.shape
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0
    bpda_grad = make_oracle(defense, "bpda-eot", eot=2)(x, y, torch.arange(3), 0)
    assert bool(torch.isfinite(bpda_grad).all()) and not torch.allclose(grad, bpda_grad)


def test_a_restart_draws_fresh_eot_noise(purifier: tuple[Pipeline, PurifiedClassifier]) -> None:
    """Draws are numbered iteration x EOT + e from ``first_draw``: restart r's noise is nobody else's."""
    _, defense = purifier
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y, idx = torch.tensor([0, 1]), torch.arange(2)
    first = make_oracle(defense, "pgd-eot", eot=2)(x, y, idx, 3)
    assert torch.equal(first, make_oracle(defense, "pgd-eot", eot=2, first_draw=0)(x, y, idx, 3))
    assert torch.equal(first, make_oracle(defense, "pgd-eot", eot=2, first_draw=4)(x, y, idx, 1))
    assert not torch.allclose(first, make_oracle(defense, "pgd-eot", eot=2, first_draw=1)(x, y, idx, 3))


def test_checkpointing_does_not_change_the_gradient(purifier: tuple[Pipeline, PurifiedClassifier]) -> None:
    pipe, defense = purifier
    plain = PurifiedClassifier(
        defense.classifier, pipe.denoiser(), t_star=0.1, sampler="ddim", steps=3, checkpoint=False
    )
    assert plain.denoiser is not None and plain.denoiser.net == pipe.denoiser().net  # not wrapped
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = torch.tensor([3, 4])
    g1 = make_oracle(defense, "pgd-eot", eot=1)(x, y, torch.arange(2), 5)
    g2 = make_oracle(plain, "pgd-eot", eot=1)(x, y, torch.arange(2), 5)
    assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-4)


def test_the_attacked_purifier_is_the_deployed_one(purifier: tuple[Pipeline, PurifiedClassifier]) -> None:
    pipe, defense = purifier
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    seeds = draw_seeds(torch.arange(4), EVAL_PURPOSE, 0)
    served = pipe.purify(x, seeds.tolist(), t_star=0.1, sampler="ddim", steps=3)
    with torch.no_grad():
        attacked = defense.purify(x, seeds)
    assert torch.allclose(served, attacked, atol=1e-5)


def test_gathered_restart_predictions_equal_evaluating_the_kept_images(
    purifier: tuple[Pipeline, PurifiedClassifier],
) -> None:
    """eval robust evaluates each restart once and gathers; that must be evaluating the kept images."""
    _, defense = purifier
    torch.manual_seed(3)
    advs = [torch.rand(6, 1, 16, 16) * 2 - 1 for _ in range(3)]
    y = torch.randint(0, 10, (6,))
    choices = [
        torch.zeros(6, dtype=torch.long),
        torch.tensor([1, 0, 1, 0, 1, 0]),
        torch.tensor([2, 0, 1, 2, 1, 0]),
    ]
    got = _evaluate_restarts(defense, advs, choices, y, draws=3, batch=4, classes=10)
    for k, c in enumerate(choices):
        kept = torch.stack([advs[int(r)][i] for i, r in enumerate(c)])
        want = vote_metrics(_predict(defense, kept, 3, 4), y, 10)
        assert got["majority_by_restarts"][k] == want["majority"]
        if k == len(choices) - 1:
            assert got["majority_per_image"] == want["majority_per_image"] and got["mean"] == want["mean"]
