"""Threat models, PGD, BPDA and the purifier as a differentiable defence.

Conventions: images live in [-1, 1]; ``eps`` is given on the [0, 1] pixel scale, as in the
literature, and is doubled internally. Every attack is PGD with a different gradient oracle:

- ``classifier-only``: gradients of the classifier alone; the adversarial image is then fed
  through the purifier. This is the known pitfall (an attack that ignores the defence), shown so
  its optimistic number can be seen next to the honest ones.
- ``bpda-eot``: the purifier's forward pass with an identity backward (BPDA), gradients averaged
  over EOT draws of the purifier's noise.
- ``pgd-eot``: exact gradients through the deployed purifier (same sampler, steps, t*), fresh
  noise per EOT draw, each network call checkpointed so memory does not grow with the steps.

Restarts run the same attack again from other random starts with fresh EOT noise; per image the
attacker keeps the restart that fools its own estimate (``attacker_view``, seeds of their own)
most, so picking one never looks at the draws the accuracy is reported on. PGD ascends the
cross-entropy or the Carlini-Wagner margin (``attack_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.denoisers import Denoiser
from models.generate import purify
from models.noise import NoiseSource

Threat = Literal["linf", "l2"]
THREATS: tuple[str, ...] = ("linf", "l2")
ATTACKS: tuple[str, ...] = ("none", "classifier-only", "bpda-eot", "pgd-eot")
LOSSES: tuple[str, ...] = ("ce", "margin")
EVAL_PURPOSE, ATTACK_PURPOSE, SELECT_PURPOSE = 0, 1, 2
_IMAGE_STRIDE, _DRAW_STRIDE = 10_000_019, 1_000_003
MAX_DRAWS = _DRAW_STRIDE  # noise draws per purpose: bounds restarts x PGD steps x EOT


def draw_seeds(indices: torch.Tensor, purpose: int, draw: int) -> torch.Tensor:
    """Per-image purifier seeds for one draw; evaluation and attack draws never share a seed.

    Seeds are a function of the image's index in the evaluation set, so an image's noise does
    not depend on the batch it sits in.
    """
    if not 0 <= draw < _DRAW_STRIDE:
        raise ValueError(f"draw must be in [0, {_DRAW_STRIDE})")
    return indices.to(torch.int64) + (purpose * _DRAW_STRIDE + draw) * _IMAGE_STRIDE


def checkpointed(net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Recompute each network call in the backward pass: memory stays one step's activations."""

    def forward(x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out: torch.Tensor = checkpoint(net, x, t, *rest, use_reentrant=False)
            return out
        return net(x, t, *rest)

    return forward


class _BPDAIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(x.detach())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


def bpda(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) forward, identity backward (Athalye et al.'s straight-through approximation)."""
    out: torch.Tensor = _BPDAIdentity.apply(x, fn)
    return out


@dataclass
class PurifiedClassifier:
    """The deployed defence: purify with per-image seeds, then classify."""

    classifier: torch.nn.Module
    denoiser: Denoiser | None
    t_star: float = 0.1
    sampler: str = "ddim"
    steps: int = 5
    eta: float = 0.0
    checkpoint: bool = True  # recompute network calls in backward: memory of one call, one more forward

    def __post_init__(self) -> None:
        self.classifier.requires_grad_(False)
        if self.denoiser is not None and self.checkpoint:
            self.denoiser.net = checkpointed(self.denoiser.net)

    @property
    def nfe(self) -> int:
        return 0 if self.denoiser is None else self.steps

    def purify(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if self.denoiser is None:
            return x
        noise = NoiseSource(seeds, tuple(x.shape[1:]), x.device)
        return purify(
            self.denoiser, x, noise, t_star=self.t_star, sampler=self.sampler, steps=self.steps, eta=self.eta
        )

    def logits(self, x: torch.Tensor, seeds: torch.Tensor, *, gradient: str = "exact") -> torch.Tensor:
        """Classifier logits of the purified images; ``gradient='bpda'`` uses the identity backward."""
        if gradient == "bpda":
            purified = bpda(lambda z: self.purify(z, seeds), x)
        elif gradient == "none":
            purified = x
        else:
            purified = self.purify(x, seeds)
        out: torch.Tensor = self.classifier(purified)
        return out


GradOracle = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per image, what PGD ascends: the cross-entropy, or the margin max_{j != y} z_j - z_y.

    The margin (Carlini and Wagner) keeps its gradient where a confident softmax saturates the
    cross-entropy's, so an accuracy that only holds against one of them is a sign of masking.
    """
    z = logits.float()
    if loss == "ce":
        return F.cross_entropy(z, y, reduction="none")
    if loss == "margin":
        true = z.gather(1, y[:, None]).squeeze(1)
        other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
        return other - true
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def make_oracle(
    defense: PurifiedClassifier, attack: str, eot: int, first_draw: int = 0, loss: str = "ce"
) -> GradOracle:
    """The loss gradient each attack follows: (x, labels, image indices, iteration) -> dL/dx.

    EOT draws are numbered from ``first_draw``, so each restart of an attack sees fresh noise.
    """
    if attack not in ATTACKS or attack == "none":
        raise ValueError(f"attack {attack!r} has no gradient; known: {', '.join(ATTACKS[1:])}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    mode = {"classifier-only": "none", "bpda-eot": "bpda", "pgd-eot": "exact"}[attack]
    draws = 1 if attack == "classifier-only" else eot

    def oracle(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, iteration: int) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        xs = x.repeat(draws, *([1] * (x.ndim - 1)))
        seeds = torch.cat(
            [draw_seeds(indices, ATTACK_PURPOSE, first_draw + iteration * draws + e) for e in range(draws)]
        )
        logits = defense.logits(xs, seeds, gradient=mode)
        objective = attack_loss(logits, y.repeat(draws), loss).sum() / draws
        (grad,) = torch.autograd.grad(objective, x)
        return grad

    return oracle


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, threat: str) -> torch.Tensor:
    """Back into the eps-ball around x (eps in [-1, 1] units) and the image range."""
    delta = x_adv - x
    if threat == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / norms).clamp(max=1.0).reshape(-1, *([1] * (x.ndim - 1)))
    return (x + delta).clamp(-1.0, 1.0)


def ascent_step(grad: torch.Tensor, alpha: float, threat: str) -> torch.Tensor:
    """The steepest-ascent step of length alpha for the threat's norm."""
    if threat == "linf":
        return alpha * grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return alpha * grad / norms.reshape(-1, *([1] * (grad.ndim - 1)))


def random_start(x: torch.Tensor, eps: float, threat: str, generator: torch.Generator) -> torch.Tensor:
    """A uniform point of the linf ball, or a random direction at a uniform radius of the l2 ball."""
    if threat == "linf":
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator)
        d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
        delta = d * eps * torch.rand(x.shape[0], generator=generator).reshape(-1, *([1] * (x.ndim - 1)))
    return project(x + delta.to(x), x, eps, threat)


@dataclass
class GradStats:
    """What the first gradient looked like: the 'finite and non-zero' sanity check."""

    finite: bool = True
    nonzero_fraction: float = 0.0
    mean_abs: float = 0.0

    @classmethod
    def of(cls, grad: torch.Tensor) -> GradStats:
        return cls(
            bool(torch.isfinite(grad).all()), float((grad != 0).float().mean()), float(grad.abs().mean())
        )


@dataclass
class PGDResult:
    """Adversarial images at each recorded step count, plus the first gradient's statistics."""

    at_steps: dict[int, torch.Tensor]
    grad: GradStats = field(default_factory=GradStats)


def pgd(
    oracle: GradOracle,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    *,
    eps: float,
    threat: str,
    steps: int,
    step_size: float | None = None,
    record: Sequence[int] = (),
    rand_init: bool = True,
    seed: int = 0,
    callback: Callable[[int, int], None] | None = None,
) -> PGDResult:
    """Projected gradient ascent on the loss; ``eps`` and ``step_size`` on the [0, 1] scale.

    The default step is eps/4 (the reference protocol). ``record`` lists the step counts whose
    iterates are returned, so one trajectory yields robust accuracy vs attack steps. ``callback``
    gets (steps done, steps) after every step: one step through a 10-step purifier with EOT takes
    minutes on a CPU, and a progress bar should show it.
    """
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {THREATS}, got {threat!r}")
    if eps < 0 or steps < 0:
        raise ValueError("eps and steps must be >= 0")
    e = 2.0 * eps
    alpha = 2.0 * (step_size if step_size is not None else eps / 4)
    wanted = set(record) | {steps}
    x = x.detach()
    x_adv = (
        random_start(x, e, threat, torch.Generator().manual_seed(seed))
        if rand_init and eps > 0
        else x.clone()
    )
    out = PGDResult({0: x_adv.clone()} if 0 in wanted else {})
    for k in range(steps):
        grad = oracle(x_adv, y, indices, k)
        if k == 0:
            out.grad = GradStats.of(grad)
        x_adv = project(x_adv + ascent_step(grad, alpha, threat), x, e, threat).detach()
        if k + 1 in wanted:
            out.at_steps[k + 1] = x_adv.clone()
        if callback is not None:
            callback(k + 1, steps)
    return out


@torch.no_grad()
def predict_draws(
    defense: PurifiedClassifier, x: torch.Tensor, indices: torch.Tensor, draws: int
) -> torch.Tensor:
    """Predicted labels [R, N] under R evaluation draws of the purifier's noise (unseen by attacks)."""
    return torch.stack(
        [defense.logits(x, draw_seeds(indices, EVAL_PURPOSE, r)).argmax(1) for r in range(draws)]
    )


@torch.no_grad()
def attacker_view(
    target: PurifiedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    draws: int,
    loss: str = "ce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """How well adversarial images do by the attacker's own estimate: share of wrong draws, mean loss.

    ``target`` is what the attack differentiates (the classifier alone for the pitfall attack);
    the draws use selection seeds, never the evaluation ones.
    """
    wrong = torch.zeros(x.shape[0], device=x.device)
    total = torch.zeros(x.shape[0], device=x.device)
    for e in range(draws):
        logits = target.logits(x, draw_seeds(indices, SELECT_PURPOSE, e))
        wrong += (logits.argmax(1) != y).float()
        total += attack_loss(logits, y, loss)
    return wrong / draws, total / draws


def pick_restarts(wrong: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Per image ([K, N] -> [N]) the restart whose image fools most draws; ties go to the larger loss."""
    if wrong.ndim != 2 or wrong.shape != loss.shape:
        raise ValueError("wrong and loss must both be [restarts, images]")
    most = wrong.max(0).values
    return loss.masked_fill(wrong < most, float("-inf")).argmax(0)
