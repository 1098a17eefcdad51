"""Imported models sample what diffusers' own pipelines sample, from the same noise.

DDIM on diffusers' timestep spacings against DDIMPipeline, and 1- and 2-step consistency sampling
against ConsistencyModelPipeline. Our noise (per-image seeds) is handed to diffusers in place of its
``randn_tensor`` draws, so the two runs see identical numbers.
"""

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.diffusers_import import import_diffusers
from models.generate import generate
from models.noise import NoiseSource
from models.pipeline import Pipeline
from models.testing import (
    CD_IMAGENET64_REDUCED,
    CD_SCHEDULER,
    DDPM_SCHEDULER,
    SMALL_DDPM,
    diffusers_unet,
    write_diffusers_folder,
)

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')"
)

SEEDS = [3, 11]


def _feed(monkeypatch: pytest.MonkeyPatch, module: str, draws: list[torch.Tensor]) -> None:
    """diffusers' ``randn_tensor`` in ``module`` returns ``draws`` in order (our noise)."""
    queue: Iterator[torch.Tensor] = iter(draws)
    monkeypatch.setattr(f"{module}.randn_tensor", lambda *a, **k: next(queue).clone())


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Pipeline]:
    # Attention not sharpened here (the import tests do that): with the network's own eps after
    # clipping (diffusers' default) a sharpened net amplifies the 1e-7 rounding of each update ~10x
    # per evaluation, and 10 steps would compare float noise, not the sampler.
    model = diffusers_unet(SMALL_DDPM, sharpen=1.0)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("ddpm"), model, DDPM_SCHEDULER)
    imported = import_diffusers(folder)
    return model, Pipeline(imported.net, imported.header, torch.device("cpu"))


@pytest.mark.parametrize(
    ("spacing", "clip", "use_clipped"),
    [
        ("leading", False, None),  # without clipping both eps conventions are one update
        ("trailing", False, None),
        ("leading", True, True),  # x0 clipped, eps recomputed from it: our default ddim
        ("trailing", True, None),  # x0 clipped, the network's eps kept: diffusers' default
    ],
)
def test_ddim_on_diffusers_spacings_matches_ddim_pipeline(
    monkeypatch: pytest.MonkeyPatch,
    ddpm: tuple[torch.nn.Module, Pipeline],
    spacing: str,
    clip: bool,
    use_clipped: bool | None,
) -> None:
    model, pipe = ddpm
    noise = NoiseSource(SEEDS, pipe.info.image_shape)
    if clip and not use_clipped:
        # This update feeds the network's eps forward unchecked, so the ~1e-6 float difference between
        # the two networks' evaluations grows step by step (1.2e-4 after 10): here the sampler is
        # compared on identical network outputs (the networks are compared in test_diffusers_import).
        ours_net = pipe.net

        def same_net(
            sample: torch.Tensor, timestep: torch.Tensor, *a: object, **k: object
        ) -> SimpleNamespace:
            return SimpleNamespace(sample=ours_net(sample, timestep.float().expand(sample.shape[0])))

        monkeypatch.setattr(model, "forward", same_net)
    _feed(monkeypatch, "diffusers.pipelines.ddim.pipeline_ddim", [noise.initial()])
    scheduler = diffusers.DDIMScheduler.from_config(
        DDPM_SCHEDULER, timestep_spacing=spacing, clip_sample=clip
    )
    theirs = diffusers.DDIMPipeline(unet=model, scheduler=scheduler)(
        batch_size=2, num_inference_steps=10, eta=0.0, use_clipped_model_output=use_clipped, output_type="np"
    ).images
    ddim_eps = "from-x0" if use_clipped else "model"
    if clip:
        ours = pipe.sample(SEEDS, sampler="ddim", steps=10, spacing=spacing, ddim_eps=ddim_eps)
    else:
        with torch.no_grad():
            ours = generate(pipe.denoiser(), noise, steps=10, spacing=spacing, clip_x0=False).clamp(-1, 1)
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours_np - theirs).max() < 1e-4
    assert theirs.std() > 0.05


def test_the_eps_convention_matters_with_clipping(ddpm: tuple[torch.nn.Module, Pipeline]) -> None:
    """So the test above could fail: the two conventions give visibly different images."""
    _, pipe = ddpm
    a = pipe.sample(SEEDS, sampler="ddim", steps=10, spacing="trailing")
    b = pipe.sample(SEEDS, sampler="ddim", steps=10, spacing="trailing", ddim_eps="model")
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sampling_matches_consistency_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, steps: int
) -> None:
    model = diffusers_unet(CD_IMAGENET64_REDUCED, sharpen=2.0)
    imported = import_diffusers(write_diffusers_folder(tmp_path / "cm", model, CD_SCHEDULER))
    pipe = Pipeline(imported.net, imported.header, torch.device("cpu"))
    labels = [7, 998]
    noise = NoiseSource(SEEDS, pipe.info.image_shape)
    # diffusers' steps: 1 -> sigma_max; [22, 0] (its documented 2-step CD setting) -> sigma_max and the
    # Karras sigma 22 of 39 down from sigma_max, which is table step 40 - 22 = 18 of T = 40: t = 0.45.
    kwargs = {"num_inference_steps": 1} if steps == 1 else {"timesteps": [22, 0]}
    times = [] if steps == 1 else [18 / 40]
    _feed(
        monkeypatch,
        "diffusers.schedulers.scheduling_consistency_models",
        [noise.draw(NoiseSource.step_stream(i)) for i in range(steps)],
    )
    scheduler = diffusers.CMStochasticIterativeScheduler(
        **{k: v for k, v in CD_SCHEDULER.items() if k[0] != "_"}
    )
    theirs = diffusers.ConsistencyModelPipeline(unet=model, scheduler=scheduler)(
        batch_size=2, class_labels=labels, latents=noise.initial(), output_type="pt", **kwargs
    ).images
    ours = pipe.sample(SEEDS, sampler="consistency", times=times, labels=labels)
    assert ((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max() < 1e-4
    assert theirs.std() > 0.05


def _karras_sigma(k: int, t_steps: int, smin: float, smax: float, rho: float) -> float:
    """docs/IMPORTING.md's sigma_k, the k-th smallest of the model's T Karras sigmas (k = 1..T)."""
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return (lo + (k - 1) / (t_steps - 1) * (hi - lo)) ** rho


def _documented_sigma(t_star: float, t_steps: int, smin: float, smax: float, rho: float) -> float:
    """t* = k/T starts at sigma_k; between grid points log(1 + sigma^2) is linear in t* (sigma_0 = 0)."""
    k, frac = divmod(t_star * t_steps, 1.0)
    lo = 0.0 if k == 0 else math.log1p(_karras_sigma(int(k), t_steps, smin, smax, rho) ** 2)
    if frac == 0.0:
        return math.sqrt(math.expm1(lo))
    hi = math.log1p(_karras_sigma(int(k) + 1, t_steps, smin, smax, rho) ** 2)
    return math.sqrt(math.expm1((1 - frac) * lo + frac * hi))


@pytest.fixture(scope="module")
def cm(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    model = diffusers_unet(CD_IMAGENET64_REDUCED, sharpen=1.0)
    imported = import_diffusers(write_diffusers_folder(tmp_path_factory.mktemp("cm"), model, CD_SCHEDULER))
    return Pipeline(imported.net, imported.header, torch.device("cpu"))


@pytest.mark.parametrize("t_star", [0.025, 0.1, 0.45, 0.5, 0.3125, 1.0])
def test_purify_t_star_of_an_imported_consistency_model_is_the_documented_sigma(
    monkeypatch: pytest.MonkeyPatch, cm: Pipeline, t_star: float
) -> None:
    """The first network call of a CM purification at t* sees c_in(sigma) (x0 + sigma eps) at time
    input 250 ln(sigma), sigma the documented one; at t* = k/T that is diffusers' sigmas[T - k]."""
    sched = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5, **CD_SCHEDULER}
    t_steps = int(sched["num_train_timesteps"])
    sigma = _documented_sigma(t_star, t_steps, sched["sigma_min"], sched["sigma_max"], sched["rho"])
    if (t_star * t_steps).is_integer():
        theirs = diffusers.CMStochasticIterativeScheduler(**{k: v for k, v in sched.items() if k[0] != "_"})
        assert sigma == pytest.approx(float(theirs.sigmas[t_steps - round(t_star * t_steps)]), rel=1e-6)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def first_call(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    monkeypatch.setattr(cm, "_forward", first_call)
    image = torch.linspace(-0.9, 0.9, 3 * 64 * 64).reshape(1, 3, 64, 64)
    cm.purify(image, [21], t_star=t_star, sampler="consistency", steps=1, labels=[5])
    x, t = seen[0]
    assert float(t[0]) == pytest.approx(250 * math.log(sigma), rel=1e-6, abs=1e-4)
    eps = NoiseSource([21], (3, 64, 64)).initial()
    expected = (image + sigma * eps) / math.sqrt(sigma**2 + sched["sigma_data"] ** 2)
    assert torch.allclose(x, expected, rtol=1e-5, atol=1e-5)
