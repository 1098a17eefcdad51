"""The counter-based noise: Triton draws the reference's numbers, and a row never depends on its batch."""

import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import rng, triton_sampler

SEEDS = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 7, rng.SEED_MAX], dtype=torch.int64)


@triton.jit
def _bits_to_normal_kernel(r0_ptr, r1_ptr, out_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    r0 = tl.load(r0_ptr + idx, mask=mask).to(tl.uint32)
    r1 = tl.load(r1_ptr + idx, mask=mask).to(tl.uint32)
    tl.store(out_ptr + idx, triton_sampler._normal_from_bits(r0, r1), mask=mask)


@pytest.mark.parametrize("stream", [0, 1, 7])
def test_triton_randn_rows_matches_reference(stream: int, device: torch.device, poison: None) -> None:
    expected = rng.randn_rows(SEEDS, stream, 777)
    actual = kernels.randn_rows(SEEDS.to(device), stream, 777, device, impl="triton")
    assert actual.dtype == torch.float32 and actual.shape == (len(SEEDS), 777)
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=0)


def test_box_muller_map_at_the_extremes(device: torch.device) -> None:
    """Bits whose uniforms sit at 0, 1/2 and 1: float32 in-kernel math must still match float64."""
    top = torch.tensor([0, 1, 2, 100, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 101, 2**24 - 2, 2**24 - 1])
    grid = torch.cartesian_prod(top, top)
    low = torch.randint(0, 256, grid.shape, generator=torch.Generator().manual_seed(0))
    bits = torch.cat([grid * 256 + low, torch.randint(0, 2**32, (4096, 2), dtype=torch.int64)])
    u1, u2 = rng.uniform_from_bits(bits[:, 0]), rng.uniform_from_bits(bits[:, 1])
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    r0, r1 = (bits[:, i].contiguous().to(device) for i in (0, 1))
    out = torch.full((len(bits),), float("nan"), device=device)
    _bits_to_normal_kernel[(triton.cdiv(len(bits), 8192),)](r0, r1, out, len(bits), BLOCK=8192)
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-6, rtol=0)


def test_rows_do_not_depend_on_the_batch(device: torch.device) -> None:
    full = kernels.randn_rows(SEEDS.to(device), 3, 100, device, impl="triton")
    for i in (0, 4):
        alone = kernels.randn_rows(SEEDS[i : i + 1].to(device), 3, 100, device, impl="triton")
        assert torch.equal(alone[0], full[i])
    ref = rng.randn_rows(SEEDS, 3, 100)
    assert torch.equal(rng.randn_rows(SEEDS[2:3], 3, 100)[0], ref[2])


def test_streams_and_seeds_differ() -> None:
    a = rng.randn_rows(SEEDS[:2], 0, 64)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, rng.randn_rows(SEEDS[:2], 1, 64))


def test_reference_is_standard_normal() -> None:
    z = rng.randn_rows(torch.arange(4), 0, 10_000).flatten()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03


def test_auto_on_cpu_is_the_reference() -> None:
    expected = rng.randn_rows(SEEDS, 2, 50)
    assert torch.equal(kernels.randn_rows(SEEDS, 2, 50, "cpu"), expected)
    assert torch.equal(kernels.randn_rows(SEEDS, 2, 50, impl="reference"), expected)


def test_environment_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("Triton ran despite ROBUSTDIFF_KERNELS=reference")

    monkeypatch.setenv("ROBUSTDIFF_KERNELS", "reference")
    monkeypatch.setattr(triton_sampler, "randn_rows", fail)
    out = kernels.randn_rows(SEEDS, 2, 50, impl="triton")
    assert torch.equal(out, rng.randn_rows(SEEDS, 2, 50))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="impl"):
        kernels.randn_rows(SEEDS, 0, 4, impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream"):
        kernels.randn_rows(SEEDS, -1, 4, impl="triton")
    with pytest.raises(ValueError, match="seeds"):
        rng.randn_rows(torch.tensor([-1]), 0, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
def test_gpu_randn_rows_real_shape() -> None:
    seeds = torch.randint(0, rng.SEED_MAX, (256,), dtype=torch.int64)
    actual = kernels.randn_rows(seeds, 5, 3 * 32 * 32, "cuda")
    torch.testing.assert_close(actual.cpu(), rng.randn_rows(seeds, 5, 3 * 32 * 32), atol=1e-5, rtol=0)


def test_kernels_import_without_triton() -> None:
    """macOS has no triton: ``import kernels`` and the reference paths must still work."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.TRITON_AVAILABLE\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "kernels.groupnorm_silu(x, 2, None, None)\n"
        "kernels.sampler_update(x, x, torch.ones(2, 6), seeds=torch.tensor([1, 2]))\n"
        "try:\n"
        "    kernels.randn_rows(torch.tensor([1]), 0, 4, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('impl=triton ran without triton')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.parametrize("chunk", [64, 100, 1000, 2**40])
def test_drawing_in_chunks_never_changes_a_value(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Chunks of part of a row, of whole rows, or everything at once: the same numbers."""
    streams = torch.arange(len(SEEDS))
    expected = rng.randn_rows(SEEDS, streams, 300)
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", chunk)
    assert torch.equal(rng.randn_rows(SEEDS, streams, 300), expected)
    assert torch.equal(rng.randn_rows(SEEDS, 3, 300)[2], rng.randn_rows(SEEDS[2:3], 3, 300)[0])


def test_a_draw_holds_at_most_one_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory rule: no Philox block is larger than CHUNK_ELEMENTS, however many rows are drawn,
    so a 16-image 256x256 draw peaks like a small one."""
    blocks: list[int] = []
    real = rng._randn_block

    def spy(seeds: torch.Tensor, streams: torch.Tensor, start: int, width: int) -> torch.Tensor:
        blocks.append(seeds.shape[0] * width)
        return real(seeds, streams, start, width)

    monkeypatch.setattr(rng, "_randn_block", spy)
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", 1000)
    rng.randn_rows(SEEDS, 0, 3 * 16 * 16)  # 768 per row: one row per block
    rng.randn_rows(SEEDS[:2], 0, 2500)  # longer than a chunk: parts of a row
    rng.randn_rows(torch.arange(40), 0, 10)  # short rows: 100 rows per block
    assert max(blocks) <= 1000 and len(blocks) == 6 + 2 * 3 + 1
