"""Fused GroupNorm(+modulation)(+SiLU) against its reference, and the reference against PyTorch."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference, triton_groupnorm

Close = Callable[[torch.Tensor, torch.Tensor], None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [torch.contiguous_format, torch.channels_last]
GPU_SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8), (256, 256, 4, 4)]


def _inputs(
    shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, fmt: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape))
    b, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype).contiguous(memory_format=fmt)
    weight, bias = (torch.randn(c, generator=g).to(device) for _ in range(2))
    scale, shift = (0.5 * torch.randn(b, c, generator=g).to(device) for _ in range(2))
    return x, weight, bias, scale, shift


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((3, 12, 7, 5), 1), ((3, 12, 7, 5), 4), ((1, 6, 5, 5), 2), ((1, 6, 5, 5), 3), ((7, 20, 3, 3), 4)],
)
@pytest.mark.parametrize("modulate", [False, True])
def test_triton_matches_reference(
    dtype: torch.dtype,
    fmt: torch.memory_format,
    shape: tuple[int, int, int, int],
    groups: int,
    modulate: bool,
    device: torch.device,
    close: Close,
    poison: None,
) -> None:
    x, weight, bias, scale, shift = _inputs(shape, dtype, device, fmt)
    mods = (scale, shift) if modulate else (None, None)
    kwargs = {"scale": mods[0], "shift": mods[1], "silu": not modulate}
    actual = kernels.groupnorm_silu(x, groups, weight, bias, impl="triton", **kwargs)  # type: ignore[arg-type]
    expected = reference.groupnorm_silu(x, groups, weight, bias, **kwargs)  # type: ignore[arg-type]
    close(actual, expected)
    assert actual.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("scale_on", [False, True])
@pytest.mark.parametrize("shift_on", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_every_optional_part(
    scale_on: bool, shift_on: bool, silu: bool, affine: bool, device: torch.device, close: Close, poison: None
) -> None:
    x, weight, bias, scale, shift = _inputs((2, 6, 3, 5), torch.float32, device, torch.contiguous_format)
    args = (x, 3, weight if affine else None, bias if affine else None)
    kwargs = {"scale": scale if scale_on else None, "shift": shift if shift_on else None, "silu": silu}
    actual = kernels.groupnorm_silu(*args, impl="triton", **kwargs)  # type: ignore[arg-type]
    close(actual, reference.groupnorm_silu(*args, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_groups_larger_than_a_tile(
    fmt: torch.memory_format,
    device: torch.device,
    close: Close,
    poison: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Statistics merged over many chunks (the last one partial), on data far from zero mean."""
    monkeypatch.setattr(triton_groupnorm, "_TILE", 16)
    x, weight, bias, scale, shift = _inputs((2, 12, 7, 7), torch.float32, device, fmt)
    x = (x + 20.0).contiguous(memory_format=fmt)
    actual = kernels.groupnorm_silu(x, 3, weight, bias, scale=scale, shift=shift, impl="triton")
    close(actual, reference.groupnorm_silu(x, 3, weight, bias, scale=scale, shift=shift))


def test_layouts_and_parameter_shapes(device: torch.device, close: Close) -> None:
    x, weight, bias, scale, shift = _inputs((3, 6, 4, 6), torch.float32, device, torch.contiguous_format)
    strided = x[:, :, ::2]
    expected = reference.groupnorm_silu(strided, 2, weight, bias, scale=scale, shift=shift)
    close(kernels.groupnorm_silu(strided, 2, weight, bias, scale=scale, shift=shift, impl="triton"), expected)
    four_d = {"scale": scale[:, :, None, None], "shift": shift[:, :, None, None]}
    close(kernels.groupnorm_silu(strided, 2, weight, bias, impl="triton", **four_d), expected)
    column = x[:, :, :, :1].contiguous(memory_format=torch.channels_last)
    close(
        kernels.groupnorm_silu(column, 3, weight, bias, impl="triton"),
        reference.groupnorm_silu(column, 3, weight, bias),
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_reference_is_group_norm_then_the_formula(fmt: torch.memory_format) -> None:
    x, weight, bias, scale, shift = _inputs((2, 6, 5, 3), torch.float32, torch.device("cpu"), fmt)
    plain = reference.groupnorm_silu(x, 3, weight, bias, silu=False)
    torch.testing.assert_close(plain, F.group_norm(x, 3, weight, bias, 1e-5), atol=1e-6, rtol=1e-6)
    xd = x.double().reshape(2, 3, -1)
    var = xd.var(-1, unbiased=False, keepdim=True)
    norm = ((xd - xd.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    y = norm * weight.double()[:, None, None] + bias.double()[:, None, None]
    y = y * (1 + scale.double()[:, :, None, None]) + shift.double()[:, :, None, None]
    y = y * torch.sigmoid(y)
    actual = reference.groupnorm_silu(x, 3, weight, bias, scale=scale, shift=shift)
    torch.testing.assert_close(actual.double(), y, atol=1e-5, rtol=1e-5)
    assert actual.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_computes_nhwc_in_place_exactly_and_row_by_row(offset: float, affine: bool) -> None:
    """The channels_last reference (no NCHW round trip) is the NCHW one to float32 rounding, even far
    from zero mean where PyTorch's own channels_last group_norm loses ~1e-2, and each image's output
    is bitwise the same alone or in a batch."""
    x, weight, bias, scale, shift = _inputs(
        (5, 12, 6, 4), torch.float32, torch.device("cpu"), torch.channels_last
    )
    x = (x + offset).contiguous(memory_format=torch.channels_last)
    w, b = (weight, bias) if affine else (None, None)
    for kwargs in ({}, {"scale": scale, "shift": shift}, {"silu": False}):
        out = reference.groupnorm_silu(x, 4, w, b, **kwargs)  # type: ignore[arg-type]
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        torch.testing.assert_close(
            out, reference.groupnorm_silu(x.contiguous(), 4, w, b, **kwargs), atol=2e-5, rtol=1e-5
        )  # type: ignore[arg-type]
        for i in (0, 3):
            one = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            assert torch.equal(reference.groupnorm_silu(x[i : i + 1], 4, w, b, **one), out[i : i + 1])  # type: ignore[arg-type]


def test_reference_nhwc_never_materialises_nchw() -> None:
    """No op inside the channels_last reference writes a full-size NCHW tensor (the layout round trip
    that made ROBUSTDIFF_CPU_CHANNELS_LAST slower than the default)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, weight, bias, scale, shift = _inputs(
        (2, 8, 4, 4), torch.float32, torch.device("cpu"), torch.channels_last
    )
    nchw: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.shape == x.shape and t.is_contiguous():
                    nchw.append(str(func))
            return out

    with torch.inference_mode(), Record():
        out = reference.groupnorm_silu(x, 4, weight, bias, scale=scale, shift=shift)
        assert not nchw, nchw
        reference.groupnorm_silu(x.contiguous(), 4, weight, bias, scale=scale, shift=shift)
    assert nchw  # the check sees a layout change where there is one
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_reference_nhwc_has_a_backward() -> None:
    x, weight, bias, scale, _ = _inputs((2, 6, 3, 3), torch.float32, torch.device("cpu"), torch.channels_last)
    grads = []
    for fmt in FORMATS:
        w = weight.clone().requires_grad_(True)
        reference.groupnorm_silu(x.contiguous(memory_format=fmt), 2, w, bias, scale=scale).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_auto_on_cpu_is_the_reference() -> None:
    x, weight, bias, _, _ = _inputs((2, 6, 3, 3), torch.bfloat16, torch.device("cpu"), torch.channels_last)
    expected = reference.groupnorm_silu(x, 2, weight, bias)
    assert torch.equal(kernels.groupnorm_silu(x, 2, weight, bias), expected)


def test_autograd_takes_the_reference(device: torch.device) -> None:
    x, weight, bias, _, _ = _inputs((2, 6, 3, 3), torch.float32, device, torch.contiguous_format)
    weight.requires_grad_(True)
    kernels.groupnorm_silu(x, 2, weight, bias).sum().backward()
    assert weight.grad is not None


def test_bad_arguments(device: torch.device) -> None:
    x, weight, bias, scale, _ = _inputs((2, 6, 3, 3), torch.float32, device, torch.contiguous_format)
    with pytest.raises(ValueError, match="divide"):
        kernels.groupnorm_silu(x, 4, weight, bias, impl="triton")
    with pytest.raises(ValueError, match="weight"):
        kernels.groupnorm_silu(x, 3, weight[:5], bias, impl="triton")
    with pytest.raises(ValueError, match="scale"):
        kernels.groupnorm_silu(x, 3, weight, bias, scale=scale[:1], impl="triton")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        kernels.groupnorm_silu(x[0], 3, weight, bias, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_gpu_real_shapes(shape: tuple[int, int, int, int], fmt: torch.memory_format, close: Close) -> None:
    x, weight, bias, scale, shift = _inputs(shape, torch.bfloat16, torch.device("cuda"), fmt)
    actual = kernels.groupnorm_silu(x, 32, weight, bias, scale=scale, shift=shift)
    close(actual, reference.groupnorm_silu(x, 32, weight, bias, scale=scale, shift=shift))
    assert actual.is_contiguous(memory_format=fmt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
def test_gpu_torch_compile(close: Close) -> None:
    cuda = torch.device("cuda")
    x, weight, bias, scale, shift = _inputs((8, 64, 16, 16), torch.bfloat16, cuda, torch.channels_last)

    def block(x: torch.Tensor) -> torch.Tensor:
        return kernels.groupnorm_silu(x, 32, weight, bias, scale=scale, shift=shift) * 2

    close(torch.compile(block, fullgraph=True)(x), block(x))
