"""Request resolution in-process: model choice, sampler defaults and checks, steps, seeds, labels,
t* and the purify step default, diffusers' spacing and DDIM's eps: each refusal with its field."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service import resolve
from service.errors import ApiError
from service.jobs import Job
from service.schemas import MAX_SEED, ModelEntry, PurifyRequest, SampleRequest

ROOT = Path(__file__).resolve().parents[2]


def entry(name: str = "m", kind: str = "diffusion", classes: int = 0, **kw: Any) -> ModelEntry:
    fields: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "method": "standard",
        "image_shape": [1, 28, 28],
        "num_classes": classes,
        "timesteps": 1000,
        "class_names": [f"c{i}" for i in range(classes)],
        "hash": "h",
        "samplers": ["consistency"] if kind == "consistency" else ["ddpm", "ddim", "dpm-solver++"],
        "default_steps": 1 if kind == "consistency" else 10,
    }
    return ModelEntry(**{**fields, **kw})


@contextmanager
def refused(field: str, status: int = 422) -> Iterator[None]:
    """The block raises an ApiError naming ``field`` with ``status``."""
    with pytest.raises(ApiError) as err:
        yield
    assert (err.value.field, err.value.status) == (field, status), err.value


def purify_req(**kw: Any) -> PurifyRequest:
    return PurifyRequest(images=["x"], **kw)


# ---- model choice ---------------------------------------------------------------------------------
def test_the_default_model_is_the_configured_one_else_the_only_one() -> None:
    a, b = entry("a"), entry("b")
    assert resolve.choose_model({"a": a, "b": b}, None, "b") is b
    assert resolve.choose_model({"a": a}, None, "missing") is a
    assert resolve.choose_model({"a": a, "b": b}, "a", "b") is a
    with refused("model"):
        resolve.choose_model({"a": a, "b": b}, None, "missing")
    with refused("model"):
        resolve.choose_model({"a": a}, "c", "a")
    with refused("model", 503):
        resolve.choose_model({}, None, "a")


# ---- sampler, steps, times -------------------------------------------------------------------------
def test_the_sampler_and_steps_default_to_the_model_kinds() -> None:
    assert resolve.sampling(SampleRequest(), entry(), 20) == resolve.Sampling(
        "ddim", 10, None, 0.0, None, "from-x0"
    )
    cm = resolve.sampling(SampleRequest(), entry(kind="consistency"), 20)
    assert (cm.sampler, cm.steps) == ("consistency", 1)
    assert resolve.sampling(SampleRequest(times=[0.6, 0.3]), entry(), 20).steps == 3


@pytest.mark.parametrize(
    ("request_fields", "kind", "field"),
    [
        ({"sampler": "consistency"}, "diffusion", "sampler"),
        ({"sampler": "ddim"}, "consistency", "sampler"),
        ({"sampler": "euler"}, "diffusion", "sampler"),
        ({"sampler": "ddpm", "eta": 0.5}, "diffusion", "eta"),
        ({"steps": 21}, "diffusion", "steps"),
        ({"times": [0.3, 0.6]}, "diffusion", "times"),
        ({"times": [0.5], "steps": 3}, "diffusion", "steps"),
        ({"times": [0.0001]}, "diffusion", "times"),
    ],
)
def test_sampling_refusals_name_the_field(request_fields: dict[str, Any], kind: str, field: str) -> None:
    with refused(field):
        resolve.sampling(SampleRequest(**request_fields), entry(kind=kind), 20)


# ---- diffusers' spacing and DDIM's eps --------------------------------------------------------------
def test_spacing_and_ddim_eps_are_carried_where_they_apply() -> None:
    how = resolve.sampling(SampleRequest(spacing="trailing", ddim_eps="model"), entry(), 20)
    assert (how.spacing, how.ddim_eps) == ("trailing", "model")
    job = resolve.sample_job(SampleRequest(spacing="leading", seeds=3), entry(), 20, random_base=0)
    assert (job.spacing, job.ddim_eps, job.seeds) == ("leading", "from-x0", [3])
    pj = resolve.sampling(purify_req(ddim_eps="model"), entry(), 20)
    assert pj.ddim_eps == "model"


@pytest.mark.parametrize(
    ("req", "kind", "field", "reason"),
    [
        (
            SampleRequest(spacing="trailing"),
            "consistency",
            "spacing",
            "for diffusion samplers, not consistency",
        ),
        (
            SampleRequest(spacing="trailing", times=[0.5]),
            "diffusion",
            "spacing",
            "times or a spacing, not both",
        ),
        (purify_req(spacing="leading"), "diffusion", "spacing", "not for purification"),
        (SampleRequest(ddim_eps="model", sampler="ddpm"), "diffusion", "ddim_eps", "with the ddim sampler"),
        (SampleRequest(ddim_eps="model"), "consistency", "ddim_eps", "with the ddim sampler"),
        (SampleRequest(spacing="leading", steps=1001), "diffusion", "steps", "at most 1000 steps"),
    ],
)
def test_spacing_and_ddim_eps_refusals(req: Any, kind: str, field: str, reason: str) -> None:
    with pytest.raises(ApiError) as err:
        resolve.sampling(req, entry(kind=kind), 2000)
    assert (err.value.status, err.value.field) == (422, field) and reason in err.value.reason


# ---- seeds and labels ----------------------------------------------------------------------------
def test_seeds() -> None:
    assert resolve.seeds(None, 3, 7) == [7, 8, 9]
    assert resolve.seeds(5, 2, 7) == [5, 6]
    assert resolve.seeds([4, 1], 2, 7) == [4, 1]
    with refused("seeds"):
        resolve.seeds([1], 2, 0)
    with refused("seeds"):
        resolve.seeds(MAX_SEED, 2, 0)
    assert resolve.seeds(MAX_SEED, 1, 0) == [MAX_SEED]


def test_labels() -> None:
    cond = entry(classes=3)
    assert resolve.labels(None, 2, cond, [4, 5], "sample") == [1, 2]  # drawn from the seeds
    assert resolve.labels("c2", 2, cond, [0, 1], "sample") == [2, 2]
    assert resolve.labels([0, "c1"], 2, cond, [0, 1], "purify") == [0, 1]
    assert resolve.labels(None, 2, entry(), [0, 1], "sample") is None
    with refused("labels"):
        resolve.labels(1, 2, entry(), [0, 1], "sample")  # unconditional
    with refused("labels"):
        resolve.labels(None, 1, cond, [0], "purify")  # a purify input's class is not guessed
    with refused("labels"):
        resolve.labels([0], 2, cond, [0, 1], "sample")
    with refused("labels[1]"):
        resolve.labels([0, 3], 2, cond, [0, 1], "sample")
    with refused("labels[0]"):
        resolve.labels(["dog"], 1, cond, [0], "sample")


# ---- whole jobs ----------------------------------------------------------------------------------
def test_sample_job() -> None:
    assert resolve.sample_job(SampleRequest(num_images=2), entry(classes=3), 20, 10) == Job(
        kind="sample", model="m", sampler="ddim", steps=10, seeds=[10, 11], labels=[1, 2]
    )
    resolve.check_sample(SampleRequest(num_images=8), 8)
    with refused("num_images"):
        resolve.check_sample(SampleRequest(num_images=9), 8)


def test_purify_job_t_star_and_its_step_default() -> None:
    how = resolve.sampling(purify_req(), entry(), 20)
    job = resolve.purify_job(purify_req(draws=2), entry(), how, 2, "npy", 8, 0)
    assert (job.t_star, job.steps, job.seeds, job.images) == (0.1, 10, [0, 1, 2, 3], "npy")
    shallow = resolve.purify_job(purify_req(strength="light", t_star=None), entry(), how, 1, "npy", 8, 0)
    assert shallow.t_star == 0.05
    tiny = resolve.purify_job(purify_req(t_star=0.004), entry(), how, 1, "npy", 8, 0)
    assert tiny.steps == 4  # the default lowered to what fits below t*
    dpm = resolve.sampling(purify_req(sampler="dpm-solver++"), entry(), 20)
    assert (
        resolve.purify_job(purify_req(t_star=0.004), entry(), dpm, 1, "npy", 8, 0).steps == 10
    )  # log-SNR grid
    asked = resolve.sampling(purify_req(steps=9), entry(), 20)
    assert resolve.purify_job(purify_req(steps=9, t_star=0.004), entry(), asked, 1, "npy", 8, 0).steps == 9


def test_a_named_strength_is_the_t_star_its_worker_registered() -> None:
    """The name is a noise level: each model's entry carries its own t* for it (a CM's Karras grid);
    an entry from a worker that registered none gets DDPM's t* 0.05 / 0.1 / 0.2."""
    cm = entry(kind="consistency", timesteps=40, strengths={"light": 0.275, "medium": 0.325, "strong": 0.4})
    how = resolve.sampling(purify_req(), cm, 20)
    for name, t in (("light", 0.275), ("strong", 0.4), (None, 0.325)):
        job = resolve.purify_job(purify_req(strength=name), cm, how, 1, "npy", 8, 0)
        assert job.t_star == t and job.steps == 1
    assert resolve.purify_job(purify_req(t_star=0.1), cm, how, 1, "npy", 8, 0).t_star == 0.1  # as given
    assert entry().strengths == {"light": 0.05, "medium": 0.1, "strong": 0.2}
    older = ModelEntry.model_validate_json(entry().model_dump_json(exclude={"strengths"}))
    assert older.strengths == entry().strengths


def test_purify_refusals() -> None:
    how = resolve.sampling(purify_req(), entry(), 20)
    with refused("strength"):
        resolve.check_purify(purify_req(t_star=0.1, strength="light"), 0, 8)
    with refused("images"):
        resolve.check_purify(PurifyRequest(images=["x"] * 9), 0, 8)
    resolve.check_purify(PurifyRequest(images=["x"] * 9), 9, 8)  # multipart: counted when decoded
    with refused("draws"):
        resolve.purify_job(purify_req(draws=5), entry(), how, 2, "npy", 8, 0)
    with refused("t_star"):
        resolve.purify_job(purify_req(t_star=0.0005), entry(), how, 1, "npy", 8, 0)
    times = resolve.sampling(purify_req(times=[0.3]), entry(), 20)
    with refused("times"):
        resolve.purify_job(purify_req(times=[0.3], t_star=0.2), entry(), times, 1, "npy", 8, 0)
    with refused("labels"):
        resolve.purify_job(purify_req(), entry(classes=3), how, 1, "npy", 8, 0)


def test_resolution_imports_no_torch() -> None:
    code = "import sys, service.resolve; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
