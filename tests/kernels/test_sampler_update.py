"""The fused sampler update against its reference, flag by flag, dtype by dtype."""

from collections.abc import Callable

import pytest
import torch

import kernels
from kernels import reference, rng, triton_sampler

Close = Callable[[torch.Tensor, torch.Tensor], None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, m, prev = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    coef = torch.randn(shape[0], 6, generator=g)
    seeds = torch.randint(0, rng.SEED_MAX, (shape[0],), generator=g)
    return x, m, prev, coef, seeds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_triton_matches_reference(
    dtype: torch.dtype,
    with_prev: bool,
    with_noise: bool,
    clip: bool,
    device: torch.device,
    close: Close,
    poison: None,
) -> None:
    x, m, prev, coef, seeds = _inputs((3, 3, 5, 7), dtype, device)
    kwargs = {
        "x0_prev": prev if with_prev else None,
        "seeds": seeds if with_noise else None,
        "stream": 4,
        "clip_x0": clip,
    }
    actual = kernels.sampler_update(x, m, coef, impl="triton", **kwargs)  # type: ignore[arg-type]
    expected = reference.sampler_update(x, m, coef, **kwargs)  # type: ignore[arg-type]
    for a, e in zip(actual, expected, strict=True):
        close(a, e)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (7, 2, 3, 5), (3, 10)])
def test_odd_shapes_and_rows_longer_than_a_block(
    shape: tuple[int, ...], device: torch.device, close: Close, poison: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_sampler, "_MAX_BLOCK", 8)
    x, m, prev, coef, seeds = _inputs(shape, torch.float32, device, seed=1)
    actual = kernels.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=2, impl="triton")
    expected = reference.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=2)
    for a, e in zip(actual, expected, strict=True):
        close(a, e)


def test_mixed_input_dtypes(device: torch.device, close: Close) -> None:
    x, m, prev, coef, seeds = _inputs((2, 3, 3, 3), torch.bfloat16, device)
    m32 = m.float()
    actual = kernels.sampler_update(x, m32, coef, x0_prev=prev, seeds=seeds, impl="triton")
    expected = reference.sampler_update(x, m32, coef, x0_prev=prev, seeds=seeds)
    for a, e in zip(actual, expected, strict=True):
        close(a, e)


def test_in_kernel_noise_is_randn_rows(device: torch.device) -> None:
    x, m, _, _, seeds = _inputs((3, 3, 5, 5), torch.float32, device)
    coef = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(3, 1)
    x_next, _ = kernels.sampler_update(x, m, coef, seeds=seeds, stream=9, impl="triton")
    expected = rng.randn_rows(seeds, 9, 75).reshape(x.shape)
    torch.testing.assert_close(x_next.cpu(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_row_does_not_depend_on_the_other_rows(impl: str, device: torch.device) -> None:
    x, m, prev, coef, seeds = _inputs((7, 3, 4, 4), torch.float32, device)
    full = kernels.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=1, impl=impl)  # type: ignore[arg-type]
    for i in (0, 3, 6):
        rows = slice(i, i + 1)
        alone = kernels.sampler_update(
            x[rows],
            m[rows],
            coef[rows],
            x0_prev=prev[rows],
            seeds=seeds[rows],
            stream=1,
            impl=impl,  # type: ignore[arg-type]
        )
        for a, f in zip(alone, full, strict=True):
            assert torch.equal(a[0], f[i])


def test_reference_formula() -> None:
    x = torch.tensor([[0.5, -2.0]])
    m = torch.tensor([[1.0, 3.0]])
    prev = torch.tensor([[0.25, 0.75]])
    coef = torch.tensor([[2.0, 0.5, 0.1, 0.3, 0.2, 0.0]])
    x_next, x0 = reference.sampler_update(x, m, coef, x0_prev=prev, clip_x0=True)
    x0_expected = torch.tensor([[1.0, -2.5]]).clamp(-1, 1)
    assert torch.allclose(x0, x0_expected)
    assert torch.allclose(x_next, 0.1 * x + 0.3 * x0_expected + 0.2 * prev)
    z = rng.randn_rows(torch.tensor([5]), 3, 2)
    only_noise = torch.tensor([[0, 0, 0, 0, 0, 2.0]])
    noisy, _ = reference.sampler_update(x, m, only_noise, seeds=torch.tensor([5]), stream=3)
    assert torch.allclose(noisy, 2.0 * z)


def test_auto_on_cpu_is_the_reference() -> None:
    x, m, _, coef, seeds = _inputs((2, 3, 4, 4), torch.float32, torch.device("cpu"))
    a = kernels.sampler_update(x, m, coef, seeds=seeds)
    e = reference.sampler_update(x, m, coef, seeds=seeds)
    assert all(torch.equal(u, v) for u, v in zip(a, e, strict=True))


def test_autograd_takes_the_reference(device: torch.device) -> None:
    x, m, _, coef, _ = _inputs((2, 3, 4, 4), torch.float32, device)
    m.requires_grad_(True)
    x_next, _ = kernels.sampler_update(x, m, coef)
    x_next.sum().backward()
    assert m.grad is not None
    with pytest.raises(RuntimeError, match="backward"):
        kernels.sampler_update(x, m, coef, impl="triton")


def test_bad_arguments(device: torch.device) -> None:
    x, m, _, coef, seeds = _inputs((2, 3, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="coef"):
        kernels.sampler_update(x, m, coef[:1], impl="triton")
    with pytest.raises(ValueError, match="same shape"):
        kernels.sampler_update(x, m[:, :2], coef, impl="triton")
    with pytest.raises(ValueError, match="one seed per row"):
        kernels.sampler_update(x, m, coef, seeds=seeds[:1], impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
def test_gpu_real_shape_and_torch_compile(close: Close) -> None:
    x, m, prev, coef, seeds = _inputs((256, 3, 32, 32), torch.bfloat16, torch.device("cuda"))
    expected = reference.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=3, clip_x0=True)
    actual = kernels.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=3, clip_x0=True)
    for a, e in zip(actual, expected, strict=True):
        close(a, e)

    def step(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x_next, x0 = kernels.sampler_update(x, m, coef.cuda(), x0_prev=prev, seeds=seeds.cuda(), stream=3)
        return x_next + x0

    compiled = torch.compile(step, fullgraph=True)(x, m)
    close(compiled, step(x, m))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_per_row_streams_equal_each_row_at_its_own_stream(impl: str, device: torch.device) -> None:
    """A running batch holds rows at different steps: row b draws from (seeds[b], stream[b])."""
    x, m, prev, coef, seeds = _inputs((4, 3, 4, 4), torch.float32, device)
    coef[1, 4] = 0.0  # a row with no x0_prev term (DPM-Solver++'s first step) and one without noise
    coef[2, 5] = 0.0
    streams = torch.tensor([1, 7, 3, 250])
    full = kernels.sampler_update(x, m, coef, x0_prev=prev, seeds=seeds, stream=streams, impl=impl)  # type: ignore[arg-type]
    for i, stream in enumerate(streams.tolist()):
        rows = slice(i, i + 1)
        uses_prev, uses_noise = bool(coef[i, 4] != 0), bool(coef[i, 5] != 0)
        alone = kernels.sampler_update(
            x[rows],
            m[rows],
            coef[rows],
            x0_prev=prev[rows] if uses_prev else None,
            seeds=seeds[rows] if uses_noise else None,
            stream=stream,
            impl=impl,  # type: ignore[arg-type]
        )
        for a, f in zip(alone, full, strict=True):
            if impl == "reference":
                assert torch.equal(a[0], f[i])
            else:
                torch.testing.assert_close(a[0].cpu(), f[i].cpu(), atol=1e-5, rtol=0)


def test_randn_rows_per_row_stream() -> None:
    seeds = torch.tensor([3, 3, 8])
    rows = rng.randn_rows(seeds, torch.tensor([0, 5, 2]), 10)
    for i, stream in enumerate((0, 5, 2)):
        assert torch.equal(rows[i], rng.randn_rows(seeds[i : i + 1], stream, 10)[0])
    with pytest.raises(ValueError, match="one per seed"):
        rng.randn_rows(seeds, torch.tensor([1, 2]), 10)
