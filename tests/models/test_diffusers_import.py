from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.diffusers_import import convert_diffusers, load_diffusers_unet
from models.errors import UserError

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')"
)


def _ddpm_like(tmp_path: Path, **kw: object) -> Path:
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=None,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        **kw,
    ).eval()
    model.save_pretrained(tmp_path / "unet")
    return tmp_path


@pytest.mark.parametrize("kw", [{}, {"num_class_embeds": 4}])
def test_outputs_match_diffusers(tmp_path: Path, kw: dict) -> None:
    folder = _ddpm_like(tmp_path, **kw)
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    ours = load_diffusers_unet(folder)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([7.0, 800.0])
    labels = torch.tensor([1, 3]) if "num_class_embeds" in kw else None
    with torch.no_grad():
        ref = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, labels)
    assert (ref - got).abs().max() < 1e-4


def test_convert_writes_a_servable_checkpoint(tmp_path: Path) -> None:
    folder = _ddpm_like(tmp_path)
    header = convert_diffusers(folder, tmp_path / "imported.safetensors", "imported")
    _, got = load_checkpoint(tmp_path / "imported.safetensors")
    assert got.content_hash == header.content_hash and got.training.method == "imported"


def test_refuses_unsupported_layouts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config\.json"):
        load_diffusers_unet(tmp_path)
    _ddpm_like(tmp_path / "ss", resnet_time_scale_shift="scale_shift")
    with pytest.raises(UserError, match="resnet_time_scale_shift"):
        load_diffusers_unet(tmp_path / "ss")
    folder = _ddpm_like(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        load_diffusers_unet(folder)
