"""The trainer's consistency methods (cd, ct, cd-at, ct-at): m = 1 reduces AT to CD / CT bitwise,
replay spends m updates, CD starts from the teacher, resume is exact with an EMA target network, and
the exported file is a consistency checkpoint that the serving pipeline samples and purifies with."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import read_header
from models.errors import UserError
from models.pipeline import Pipeline
from models.schedules import Schedule
from models.testing import tiny_checkpoint
from models.train import state as ckpt
from models.train.cli import resume_config
from models.train.config import TrainConfig
from models.train.trainer import Trainer, train


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "teacher.safetensors", name="tiny-teacher", seed=3)


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def same_run(a: Path, b: Path) -> bool:
    ta, tb = ckpt.load(a)[1], ckpt.load(b)[1]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and losses(a) == losses(b)


@pytest.mark.parametrize(("plain", "at"), [("cd", "cd-at"), ("ct", "ct-at")])
def test_m1_reduces_the_at_method_to_plain_cd_ct_bitwise(
    make_config: Callable[..., TrainConfig], tmp_path: Path, teacher: Path, plain: str, at: str
) -> None:
    opts: dict[str, Any] = {"teacher": str(teacher)} if plain == "cd" else {}
    common = {"updates": 3, "log_every": 1, "model": {"dropout": 0.1}}
    train(make_config(method=plain, options=opts, out_dir=str(tmp_path / "plain"), **common))
    train(make_config(method=at, options={**opts, "m": 1}, out_dir=str(tmp_path / "at"), **common))
    assert same_run(tmp_path / "plain", tmp_path / "at")
    # With m = 3 the same seed takes a different path (the replays see delta).
    train(make_config(method=at, options={**opts, "m": 3}, out_dir=str(tmp_path / "at3"), **common))
    assert not same_run(tmp_path / "plain", tmp_path / "at3")


def test_replay_spends_m_updates_per_minibatch(
    make_config: Callable[..., TrainConfig], teacher: Path
) -> None:
    cfg = make_config(method="cd-at", options={"teacher": str(teacher), "m": 3}, updates=6)
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.updates == 6 and trainer.state.images == 2 * cfg.batch_size


def test_cd_student_starts_from_the_teacher(make_config: Callable[..., TrainConfig], teacher: Path) -> None:
    weights = Pipeline.from_checkpoint(teacher).net.state_dict()
    plain = Trainer(make_config(method="cd", options={"teacher": str(teacher), "teacher_init": "weights"}))
    assert all(torch.equal(plain.net.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(plain.ema.state_dict()[k], v) for k, v in weights.items())
    # Default: the output layer negated, so F = -eps_teacher and f is the teacher's denoiser near sigma_min.
    trainer = Trainer(make_config(method="cd", options={"teacher": str(teacher)}))
    for k, v in weights.items():
        assert torch.equal(trainer.ema.state_dict()[k], -v if k.startswith("conv_out.") else v), k
    fresh = Trainer(make_config(method="cd", options={"teacher": str(teacher), "teacher_init": "none"}))
    assert not torch.equal(fresh.net.state_dict()["conv_in.weight"], weights["conv_in.weight"])


def test_eps_parameterized_student_starts_as_the_teachers_denoiser_at_every_noise_level(
    make_config: Callable[..., TrainConfig], tmp_path: Path, teacher: Path
) -> None:
    """With c_skip = 1, c_out = -(sigma - sigma_min) a plain copy is x/a - (sigma - sigma_min) eps_teacher;
    EDM's coefficients (the default) are far from the denoiser at mid noise, which made poor purifiers."""
    out = tmp_path / "cm.safetensors"
    opts = {"teacher": str(teacher), "parameterization": "eps"}
    trainer = Trainer(make_config(method="cd", options=opts, export_path=str(out), export_dtype="float32"))
    trainer.export()
    assert read_header(out).consistency.parameterization == "eps"  # type: ignore[union-attr]
    cm = Pipeline.from_checkpoint(out).denoiser()
    den = Pipeline.from_checkpoint(teacher).denoiser()
    sch = Schedule(read_header(teacher).schedule)
    t = torch.tensor([0.02, 0.1, 0.3, 0.7, 1.0], dtype=torch.float64)
    x = torch.randn(5, *read_header(teacher).image_shape)
    sigma = sch.sigma(t).reshape(-1, 1, 1, 1).float()
    expected = x / sch.a(t).reshape(-1, 1, 1, 1).float() - (sigma - 0.002) * den(x, t)
    torch.testing.assert_close(cm.x0(x, t), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm.x0(x, t), den.x0(x, t), rtol=0, atol=0.002 * 10)
    edm = Trainer(make_config(method="cd", options={"teacher": str(teacher)}))
    edm_cm = edm.method.sampling(edm.ema, sch, 1)[0]
    with torch.no_grad():  # the trainer's EMA network still tracks gradients
        assert float((edm_cm.x0(x[1:], t[1:]) - den.x0(x[1:], t[1:])).abs().max()) > 0.1


def test_resume_with_an_ema_target_is_bitwise(
    make_config: Callable[..., TrainConfig], tmp_path: Path, teacher: Path
) -> None:
    common = {
        "method": "cd-at",
        "options": {"teacher": str(teacher), "target_ema": 0.9, "m": 2, "solver": "ddim"},
        "checkpoint_every": 2,
        "log_every": 1,
    }
    train(make_config(updates=6, out_dir=str(tmp_path / "whole"), **common))
    train(make_config(updates=2, out_dir=str(tmp_path / "split"), **common))
    train(resume_config(str(tmp_path / "split"), ["updates=6"]), resume=tmp_path / "split")
    assert same_run(tmp_path / "whole", tmp_path / "split")
    assert any(k.startswith("method.target.") for k in ckpt.load(tmp_path / "whole")[1])


def test_exported_cm_loads_samples_and_purifies(
    make_config: Callable[..., TrainConfig], tmp_path: Path, teacher: Path
) -> None:
    out = tmp_path / "cm.safetensors"
    cfg = make_config(
        method="cd",
        options={"teacher": str(teacher)},
        export_path=str(out),
        sample_count=4,
        checkpoint_every=2,
    )
    train(cfg)
    header = read_header(out)
    assert header.kind == "consistency" and header.consistency is not None
    assert header.consistency.teacher_hash == read_header(teacher).content_hash
    assert header.consistency.sigma_min == 0.002 and header.consistency.sigma_data == 0.5
    assert header.consistency.sigma_max == pytest.approx(float(Schedule(header.schedule).sigma(1.0)))
    assert header.training.method == "cd" and header.training.options["teacher"] == str(teacher)
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()
    pipe = Pipeline.from_checkpoint(out)
    assert (
        pipe.info.kind == "consistency"
        and pipe.info.samplers == ["consistency"]
        and pipe.info.default_steps == 1
    )
    for steps in (1, 2):
        images = pipe.sample([0, 1, 2], sampler="consistency", steps=steps)
        assert images.shape == (3, 1, 16, 16) and bool(torch.isfinite(images).all())
        assert torch.equal(images[1:2], pipe.sample([1], sampler="consistency", steps=steps))
    calls: list[tuple[int, int]] = []
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    purified = pipe.purify(
        x, [5, 6], sampler="consistency", steps=1, callback=lambda i, n: calls.append((i, n))
    )
    assert purified.shape == x.shape and calls == [(1, 1)]  # one network evaluation
    with pytest.raises(ValueError, match="sampler"):
        pipe.sample([0], sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="sampler"):
        Pipeline.from_checkpoint(teacher).sample([0], sampler="consistency", steps=1)


def test_cm_export_from_a_training_checkpoint_keeps_the_kind(
    make_config: Callable[..., TrainConfig], tmp_path: Path
) -> None:
    from models.train.export import export_checkpoint

    train(make_config(method="ct-at", updates=2))
    header = read_header(export_checkpoint(tmp_path / "run", tmp_path / "again.safetensors"))
    assert header.kind == "consistency" and header.consistency is not None
    assert header.consistency.teacher_hash is None and header.training.options["m"] == 3


@pytest.mark.parametrize(
    ("method", "options", "field"),
    [
        ("cd", {}, "options.teacher"),
        ("cd", {"teacher": "/nonexistent/teacher.safetensors"}, "options.teacher"),
        ("cd-at", {"teacher": "TEACHER", "eta": -1}, "options.eta"),
        ("ct", {"solver": "heun"}, "options.solver"),
        ("ct", {"m": 3}, "options.m"),
        ("ct-at", {"norm": "linf"}, "options.norm"),
        ("ct", {"sigma_max": 0.001}, "options"),
    ],
)
def test_bad_consistency_configs_name_the_field(
    make_config: Callable[..., TrainConfig], teacher: Path, method: str, options: dict[str, Any], field: str
) -> None:
    opts = {k: str(teacher) if v == "TEACHER" else v for k, v in options.items()}
    with pytest.raises(UserError) as err:
        make_config(method=method, options=opts)
    assert err.value.field.startswith(field), err.value


def test_teacher_must_be_a_diffusion_model_with_the_same_network(
    make_config: Callable[..., TrainConfig], tmp_path: Path
) -> None:
    cm = tiny_checkpoint(tmp_path / "cm.safetensors", kind="consistency")
    with pytest.raises(UserError, match="diffusion") as err:
        make_config(method="cd", options={"teacher": str(cm)})
    assert err.value.field == "options.teacher"
    wide = tiny_checkpoint(tmp_path / "wide.safetensors", base_channels=32)
    with pytest.raises(UserError) as err:
        Trainer(make_config(method="cd", options={"teacher": str(wide)}))
    assert err.value.field == "preset"
