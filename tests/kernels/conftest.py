"""Kernel tests: without CUDA the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, i.e. before the
``kernels.triton_*`` modules are imported, hence at the top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator
from typing import Any

import pytest

_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Kernel vs reference at the tolerance of the data type (fp32 ~1e-5, half types ~3e-2)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "an element was never written (still NaN)"
    tol = _TOL[expected.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@pytest.fixture
def device() -> torch.device:
    """CUDA where there is one (compiled kernels), else the CPU (interpreted kernels)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def close() -> Callable[[torch.Tensor, torch.Tensor], None]:
    return _assert_close


@pytest.fixture(autouse=True)
def _no_reference_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's ROBUSTDIFF_KERNELS=reference would silently compare the reference to itself."""
    monkeypatch.delenv("ROBUSTDIFF_KERNELS", raising=False)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the launchers' output allocations NaN-filled, so an unwritten element shows up."""

    def poisoned(alloc: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = alloc(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    yield
