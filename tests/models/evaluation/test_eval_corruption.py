from __future__ import annotations

import pytest
import torch

from models.evaluation.corruption import psnr, ssim


def test_ssim_of_an_image_with_itself_is_one() -> None:
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_falls_with_noise_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    values = [
        float(ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)).mean())
        for s in (0.05, 0.2, 0.8)
    ]
    assert values == sorted(values, reverse=True)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x))


def test_ssim_of_a_constant_shift_is_luminance_only() -> None:
    x = torch.full((1, 1, 16, 16), 0.0)  # 0.5 on the [0, 1] scale
    y = torch.full((1, 1, 16, 16), 0.2)  # 0.6
    expected = (2 * 0.5 * 0.6 + 0.01**2) / (0.5**2 + 0.6**2 + 0.01**2)
    assert float(ssim(x, y)) == pytest.approx(expected, rel=1e-6)


def test_psnr_known_values() -> None:
    x = torch.full((1, 1, 8, 8), -1.0)  # 0 on the [0, 1] scale
    assert float(psnr(x, x + 0.2)) == pytest.approx(20.0, abs=1e-4)  # difference 0.1 -> MSE 0.01
    assert float(psnr(x, x + 0.02)) == pytest.approx(40.0, abs=1e-3)
    assert float(psnr(x, x)) == 100.0
