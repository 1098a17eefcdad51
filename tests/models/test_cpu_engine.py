"""The CPU engine's batch invariance: an image's bytes never depend on the rows evaluated beside it.

Bitwise checks on the served weights (models/weights) and on a class-conditional, scale/shift tiny
network (the label and modulation paths the served models do not use), with micro-batches small
enough that a batch spans several of them and ends in a partial one.
"""

from pathlib import Path

import pytest
import torch

from kernels.reference import memory_format_of
from models.pipeline import CpuOptions, Pipeline, cpu_bf16_support
from models.testing import tiny_checkpoint
from models.unet import Conv2d, Linear, Norm
from service.settings import _committed_weights

SERVED = {Path(p).stem: p for p in _committed_weights()}


def _rows(pipe: Pipeline, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *pipe.info.image_shape), generator=gen)
    t = torch.rand(n, generator=gen, dtype=torch.float64).float() * 999
    classes = pipe.info.num_classes
    y = torch.randint(0, classes, (n,), generator=gen) if classes else None
    return x, t, y


def _alone(pipe: Pipeline, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return torch.cat(
        [pipe.forward(x[i : i + 1], t[i : i + 1], None if y is None else y[i : i + 1]) for i in range(len(x))]
    )


def _check_compositions(pipe: Pipeline) -> None:
    """Every row of batches of many sizes (several micro-batches, a partial last one) and in shuffled
    positions equals the same row evaluated alone, bitwise."""
    x, t, y = _rows(pipe, 11, seed=1)
    with torch.inference_mode():
        alone = _alone(pipe, x, t, y)
        for n in (2, 3, 5, 11):
            out = pipe.forward(x[:n], t[:n], None if y is None else y[:n])
            assert torch.equal(out, alone[:n]), f"batch of {n}"
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(2))
        out = pipe.forward(x[perm], t[perm], None if y is None else y[perm])
        assert torch.equal(out, alone[perm]), "shuffled rows"


@pytest.mark.parametrize("name", ["fmnist-dro-at", "fmnist-cd-at"])
@pytest.mark.parametrize("pad", [False, True])
def test_served_models_are_bitwise_batch_invariant(name: str, pad: bool) -> None:
    pipe = Pipeline.from_checkpoint(SERVED[name], cpu=CpuOptions(micro_batch=4, pad=pad))
    _check_compositions(pipe)


def test_default_micro_batch_is_invariant_past_one_micro_batch() -> None:
    """The served default: one row alone vs the same row inside a batch larger than a micro-batch."""
    pipe = Pipeline.from_checkpoint(SERVED["fmnist-dro-at"])
    n = pipe.cpu.micro_batch + 3
    x, t, _ = _rows(pipe, n, seed=3)
    with torch.inference_mode():
        out = pipe.forward(x, t)
        for i in (0, pipe.cpu.micro_batch - 1, pipe.cpu.micro_batch, n - 1):
            assert torch.equal(out[i : i + 1], pipe.forward(x[i : i + 1], t[i : i + 1])), f"row {i}"


def test_channels_last_stays_nhwc_and_bitwise_batch_invariant() -> None:
    """ROBUSTDIFF_CPU_CHANNELS_LAST: every GroupNorm(+SiLU) takes and returns NHWC (no round trip
    to NCHW inside the network), images keep the bitwise guarantee, and match the default layout
    to float32 rounding."""
    pipe = Pipeline.from_checkpoint(
        SERVED["fmnist-dro-at"], cpu=CpuOptions(micro_batch=4, channels_last=True)
    )
    _check_compositions(pipe)
    seen: list[tuple[torch.memory_format, torch.memory_format]] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: seen.append((memory_format_of(inp[0]), memory_format_of(out)))
        )
        for m in pipe.net.modules()
        if isinstance(m, Norm)
    ]
    x, t, _ = _rows(pipe, 3, seed=4)
    with torch.inference_mode():
        out = pipe.forward(x, t)
        ref = Pipeline.from_checkpoint(SERVED["fmnist-dro-at"], cpu=CpuOptions(micro_batch=4)).forward(x, t)
    for h in hooks:
        h.remove()
    assert len(seen) > 20 and set(seen) == {(torch.channels_last, torch.channels_last)}
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_conditional_scale_shift_network_is_bitwise_batch_invariant(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "cond.safetensors", num_classes=3, scale_shift_norm=True)
    _check_compositions(Pipeline.from_checkpoint(path, cpu=CpuOptions(micro_batch=4)))


def test_sampling_a_seed_gives_the_same_bytes_in_any_request() -> None:
    pipe = Pipeline.from_checkpoint(SERVED["fmnist-dro-at"], cpu=CpuOptions(micro_batch=4))
    alone = pipe.sample([42], sampler="ddim", steps=2)
    crowd = pipe.sample([7, 8, 9, 10, 11, 42, 12], sampler="ddim", steps=2)
    assert torch.equal(crowd[5], alone[0])


def test_invariant_kernels_compute_the_plain_layers(tmp_path: Path) -> None:
    """The pinned kernels are the same function as nn.Conv2d / nn.Linear (to float32 rounding), and
    only the batch-invariant pipeline switches them on (training and the attacks keep torch's)."""
    torch.manual_seed(0)
    conv, lin = Conv2d(8, 16, 1), Linear(8, 5)
    x, v = torch.randn(3, 8, 6, 6), torch.randn(4, 8)
    plain = conv(x), lin(v)
    conv.batch_invariant = lin.batch_invariant = True
    assert torch.allclose(conv(x), plain[0], atol=1e-5) and torch.allclose(lin(v), plain[1], atol=1e-6)
    path = tiny_checkpoint(tmp_path / "t.safetensors")
    fast = Pipeline.from_checkpoint(path, batch_invariant=False)
    assert not any(getattr(mod, "batch_invariant", False) for mod in fast.net.modules())
    assert all(
        mod.batch_invariant for mod in Pipeline.from_checkpoint(path).net.modules() if isinstance(mod, Conv2d)
    )


def test_eager_path_never_touches_inductor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freezing is a compile option: the eager default must not patch Inductor's config per call (its
    first import cost a second, which the worker's warm-up timed as the model's speed)."""
    import models.pipeline

    asked: list[bool] = []
    real = models.pipeline._freezing
    monkeypatch.setattr(models.pipeline, "_freezing", lambda on: asked.append(on) or real(on))
    pipe = Pipeline.from_checkpoint(
        tiny_checkpoint(tmp_path / "t.safetensors"), cpu=CpuOptions(micro_batch=4)
    )
    x, t, _ = _rows(pipe, 2, seed=1)
    with torch.inference_mode():
        pipe.forward(x, t)
    assert asked and not any(asked)


def test_micro_batch_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="micro_batch: 0 must be >= 1"):
        Pipeline.from_checkpoint(tiny_checkpoint(tmp_path / "t.safetensors"), cpu=CpuOptions(micro_batch=0))


def test_bf16_is_batch_invariant_where_the_cpu_has_it_and_refused_elsewhere() -> None:
    """bfloat16 autocast keeps the bitwise guarantee and stays near float32 (4% at DDIM 3, 1.0% at DDIM 10)."""
    opts = CpuOptions(micro_batch=4, dtype="bfloat16")
    if cpu_bf16_support() is None:
        with pytest.raises(ValueError, match="needs a CPU with avx512_bf16 or AMX"):
            Pipeline.from_checkpoint(SERVED["fmnist-dro-at"], cpu=opts)
        return
    pipe = Pipeline.from_checkpoint(SERVED["fmnist-dro-at"], cpu=opts)
    _check_compositions(pipe)
    ref = Pipeline.from_checkpoint(SERVED["fmnist-dro-at"]).sample([1, 2], steps=3)
    out = pipe.sample([1, 2], steps=3)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.08


@pytest.mark.slow
def test_compiled_frozen_network_is_bitwise_batch_invariant(tmp_path: Path) -> None:
    """ROBUSTDIFF_CPU_COMPILE (with freezing: weights folded as constants and prepacked for oneDNN):
    a row of a padded micro-batch is bitwise the same whatever rows sit beside it and wherever it
    sits, and the compiled network is this checkpoint's (equal to eager to float32 rounding). A
    one-level network keeps the compile short; the served network takes minutes
    (bench/bench_cpu_options.py checks it). One compile thread: on 2 cores Inductor's pool of
    compile workers cost more than it saved (83 s -> 59 s from a cold cache)."""
    import torch._inductor.config

    small = {"channel_mult": (1,), "attention_resolutions": (), "mid_attention": False}
    path = tiny_checkpoint(tmp_path / "t.safetensors", **small)  # type: ignore[arg-type]
    pipe = Pipeline.from_checkpoint(path, cpu=CpuOptions(micro_batch=3, compile=True))
    assert pipe.cpu.freeze
    with torch._inductor.config.patch(compile_threads=1), torch.inference_mode():
        x, t, _ = _rows(pipe, 7, seed=5)  # inputs made as the sampler makes them: one compiled graph
        other, _, _ = _rows(pipe, 7, seed=6)
        alone = _alone(pipe, x, t, None)  # each row padded with copies of itself
        assert torch.equal(pipe.forward(x, t), alone)  # two full micro-batches and a padded one
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(2))
        assert torch.equal(pipe.forward(x[perm], t[perm]), alone[perm])
        # row 3 beside other images, at position 2
        mixed = torch.cat([other[:2], x[3:4], other[4:]])
        assert torch.equal(pipe.forward(mixed, t[[0, 1, 3, 4, 5, 6]])[2], alone[3])
        ref = Pipeline.from_checkpoint(path).forward(x, t)
    assert float((alone - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.slow
def test_every_compiled_model_gets_its_own_graph_past_dynamos_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen network is guarded on its own weights, so each compiled model is one more graph of
    UNet.forward; past Dynamo's default limit of 8 the later models used to run eagerly. Dynamo is
    real here; only its backend is the eager one (it traces as Inductor's does, compiling nothing)."""
    import torch._dynamo
    import torch._dynamo.config
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda net, dynamic, options: real_compile(net, backend="eager", dynamic=dynamic)
    )
    torch._dynamo.reset()
    counters.clear()
    small = {"channel_mult": (1,), "attention_resolutions": (), "mid_attention": False}
    path = tiny_checkpoint(tmp_path / "t.safetensors", **small)  # type: ignore[arg-type]
    # Dynamo's own patch: after pytest's monkeypatch undid these, the next compile found no recompile_limit
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        pipes = [
            Pipeline.from_checkpoint(path, cpu=CpuOptions(micro_batch=2, compile=True)) for _ in range(11)
        ]
        x, t, _ = _rows(pipes[0], 2, seed=3)
        with torch.inference_mode():
            for pipe in pipes:
                pipe.forward(x, t)
    assert counters["stats"]["unique_graphs"] == 11
    torch._dynamo.reset()
