import pytest
import torch

from models.unet import UNet, UNetConfig, count_parameters, preset


def test_ddpm_cifar10_is_exactly_ddpms_network() -> None:
    assert count_parameters(UNet(preset("ddpm-cifar10"))) == 35_746_307  # DDPM's 35.7M


def test_preset_sizes() -> None:
    assert count_parameters(UNet(preset("tiny"))) < 500_000
    assert 4_000_000 <= count_parameters(UNet(preset("fmnist"))) <= 8_000_000


@pytest.mark.parametrize(
    "overrides",
    [{}, {"scale_shift_norm": True}, {"num_classes": 3}, {"num_heads": 2, "mid_attention": False}],
)
def test_forward_shapes(overrides: dict) -> None:
    net = UNet(preset("tiny", **overrides)).eval()
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([0, 1, 2]) if overrides.get("num_classes") else None
    out = net(x, torch.tensor([0.0, 10.5, 999.0]), labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_class_conditional_needs_labels() -> None:
    net = UNet(preset("tiny", num_classes=3))
    with pytest.raises(ValueError, match="labels"):
        net(torch.randn(1, 1, 16, 16), torch.tensor([1.0]))


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(base_channels=20, groups=32)
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(KeyError):
        preset("huge")


def test_bf16_network_takes_float32_timesteps() -> None:
    """The GPU pipeline casts the network to bf16 and still passes float32 timesteps (a crash before)."""
    torch.manual_seed(0)
    net = UNet(preset("tiny", image_size=16)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        ref = net(x, t)
        out = net.to(torch.bfloat16)(x.to(torch.bfloat16), t)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-2
