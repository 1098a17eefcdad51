from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.evaluation.corruption import corrupted_inputs, psnr, ssim


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


def test_corrupted_inputs_are_moved_to_the_device_and_drawn_on_the_cpu() -> None:
    """The classifier sits on --device: the clean images, labels and corrupted ones must follow it
    (a "meta" device stands in for a GPU here), with the same noise as on the CPU."""
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2])
    _, _, on_cpu = corrupted_inputs(x, y, 0.2, 0.1, 0, "cpu")
    x_dev, y_dev, on_meta = corrupted_inputs(x, y, 0.2, 0.1, 0, "meta")
    assert x_dev.device.type == y_dev.device.type == "meta"
    assert list(on_meta) == list(on_cpu) == ["clean", "gaussian sigma=0.2", "salt-and-pepper amount=0.1"]
    assert all(t.device.type == "meta" and t.shape == x.shape for t in on_meta.values())
    assert not torch.equal(on_cpu["gaussian sigma=0.2"], x)
    assert torch.equal(
        corrupted_inputs(x, y, 0.2, 0.1, 0, "cpu")[2]["gaussian sigma=0.2"], on_cpu["gaussian sigma=0.2"]
    )


def test_ssim_filters_with_a_window_on_the_images_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """As strict as CUDA about devices: a window left on the CPU would meet GPU images in conv2d."""
    conv2d = F.conv2d

    def strict(x: torch.Tensor, w: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert x.device == w.device, f"images on {x.device}, window on {w.device}"
        return conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", strict)
    x = torch.zeros(2, 1, 16, 16, device="meta")
    assert ssim(x, x).shape == (2,) and ssim(x, x).device.type == "meta"
