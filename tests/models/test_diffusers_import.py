"""Imported diffusers UNet2DModels compute exactly diffusers' function, or are refused by field.

Every model is built by diffusers itself in a public configuration (random weights, jittered, with
sharpened attention), saved as diffusers saves it, imported, and evaluated against diffusers.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_checkpoint
from models.diffusers_import import convert_diffusers, import_diffusers, load_diffusers_unet
from models.errors import UserError
from models.testing import (
    CD_IMAGENET64_REDUCED,
    CD_SCHEDULER,
    DDPM_256_REDUCED,
    DDPM_CIFAR10_32,
    DDPM_SCHEDULER,
    SMALL_DDPM,
    diffusers_unet,
    write_diffusers_folder,
)
from models.unet import UNet

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')"
)


def _max_diff(theirs: torch.nn.Module, ours: UNet, size: int, labels: torch.Tensor | None = None) -> float:
    """max |ours - diffusers| over one evaluation, relative to the output's scale when that exceeds 1."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([7.0, 800.0])
    with torch.no_grad():
        ref = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, labels)
    assert ref.std() > 0.1  # a non-trivial function
    return float((ref - got).abs().max() / ref.abs().max().clamp(min=1.0))


@pytest.mark.parametrize(
    ("config", "size"),
    [(DDPM_CIFAR10_32, 32), (DDPM_256_REDUCED, 256)],
    ids=["ddpm-cifar10-32", "ddpm-256-layout"],
)
def test_public_ddpm_layouts_match_diffusers(tmp_path: Path, config: dict, size: int) -> None:
    model = diffusers_unet(config)
    folder = write_diffusers_folder(tmp_path / "pipe", model, DDPM_SCHEDULER)
    imported = import_diffusers(folder)
    assert imported.net.cfg.downsample_padding == 0
    assert _max_diff(model, imported.net, size) < 1e-5
    assert imported.header.schedule.name == "linear" and imported.header.prediction == "epsilon"


def test_asymmetric_padding_is_what_makes_ddpm_exact(tmp_path: Path) -> None:
    """The regression: with symmetric padding the same weights compute a clearly different network."""
    model = diffusers_unet(SMALL_DDPM)
    ours = load_diffusers_unet(write_diffusers_folder(tmp_path / "p", model, None, "bare"))
    assert _max_diff(model, ours, 16) < 1e-5
    wrong = UNet(ours.cfg.model_copy(update={"downsample_padding": 1}))
    wrong.load_state_dict(ours.state_dict())
    assert _max_diff(model, wrong, 16) > 1e-2


def test_every_implemented_field_matches_diffusers(tmp_path: Path) -> None:
    """Per-level heads, mish, mid_block_scale_factor, attn_norm_num_groups, classes, time width."""
    config = {
        **SMALL_DDPM,
        "block_out_channels": [32, 64, 96],
        "attention_head_dim": 16,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "act_fn": "mish",
        "mid_block_scale_factor": 1.4142,
        "attn_norm_num_groups": 8,
        "num_class_embeds": 5,
        "time_embedding_dim": 64,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    model = diffusers_unet(config)
    ours = load_diffusers_unet(write_diffusers_folder(tmp_path / "p", model, DDPM_SCHEDULER))
    labels = torch.tensor([1, 4])
    assert _max_diff(model, ours, 16, labels) < 1e-5
    # The sharpened attention makes the per-level head count visible: one global count is far off.
    one_head = UNet(ours.cfg.model_copy(update={"head_channels": None, "num_heads": 1}))
    one_head.load_state_dict(ours.state_dict())
    assert _max_diff(model, one_head, 16, labels) > 1e-2


def test_consistency_layout_matches_diffusers(tmp_path: Path) -> None:
    model = diffusers_unet(CD_IMAGENET64_REDUCED)
    imported = import_diffusers(write_diffusers_folder(tmp_path / "cm", model, CD_SCHEDULER))
    cfg = imported.net.cfg
    assert (cfg.resample, cfg.scale_shift_norm, cfg.head_channels, cfg.num_classes) == (
        "resnet",
        True,
        16,
        1000,
    )
    assert imported.header.kind == "consistency" and imported.header.schedule.name == "edm"
    assert _max_diff(model, imported.net, 64, torch.tensor([3, 999])) < 1e-5


def test_old_attention_key_names_load(tmp_path: Path) -> None:
    model = diffusers_unet(SMALL_DDPM)
    folder = write_diffusers_folder(tmp_path / "old", model, None, "bare")
    path = folder / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in load_file(str(path)).items():
        for new, legacy in renames.items():
            k = k.replace(new, legacy)
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(path))
    assert (
        _max_diff(diffusers.UNet2DModel.from_pretrained(folder).eval(), load_diffusers_unet(folder), 16)
        < 1e-5
    )
    assert _max_diff(model, load_diffusers_unet(folder), 16) < 1e-5


@pytest.mark.parametrize("layout", ["bare", "root"])
def test_bare_and_root_scheduler_folders(tmp_path: Path, layout: str) -> None:
    model = diffusers_unet(SMALL_DDPM)
    cosine = {**DDPM_SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    folder = write_diffusers_folder(tmp_path / layout, model, cosine if layout == "root" else None, layout)
    imported = import_diffusers(folder)
    assert _max_diff(model, imported.net, 16) < 1e-5
    if layout == "root":  # the root scheduler_config.json is read, not ignored
        assert (imported.header.schedule.name, imported.header.prediction) == ("cosine", "v_prediction")
    else:  # a bare folder gets DDPM's linear betas unless --schedule says otherwise
        assert imported.header.schedule.name == "linear"
        assert import_diffusers(folder, schedule="cosine").header.schedule.name == "cosine"


def test_ddim_pipeline_folder(tmp_path: Path) -> None:
    model = diffusers_unet(SMALL_DDPM)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    diffusers.DDIMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp_path / "ddim")
    imported = import_diffusers(tmp_path / "ddim")
    assert imported.header.schedule.name == "scaled-linear"
    assert _max_diff(model, imported.net, 16) < 1e-5


def test_bin_weights_only_offline(tmp_path: Path) -> None:
    model = diffusers_unet(SMALL_DDPM)
    folder = tmp_path / "bin"
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UserError, match=r"never unpickles.*import-diffusers"):
        import_diffusers(folder)
    convert_diffusers(folder, tmp_path / "m.safetensors", "from-bin")
    net, header = load_checkpoint(tmp_path / "m.safetensors")
    assert header.training.method == "imported" and _max_diff(model, net, 16) < 1e-5


REFUSED = [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"class_embed_type": "identity"}, "class_embed_type"),
    ({"class_embed_type": "timestep", "num_class_embeds": None}, "class_embed_type"),
    ({"sample_size": [16, 32]}, "sample_size"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"resnet_time_scale_shift": "ada_group"}, "resnet_time_scale_shift"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"norm_num_groups": None}, "norm_num_groups"),
    ({"downsample_padding": 2}, "downsample_padding"),
    ({"downsample_type": "resnet"}, "down_block_types"),  # resnet in an Attn level, conv elsewhere
    ({"downsample_type": "fir"}, "downsample_type"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
    ({"down_block_types": ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"attention_head_dim": [8, 8, 8]}, "attention_head_dim"),
    ({"attention_head_dim": 24}, "config"),  # 64 channels do not split into 24-channel heads
    ({"time_embedding_dim": 100}, "time_embedding_dim"),
    ({"block_out_channels": [32, 48, 64]}, "block_out_channels"),
    ({"some_future_field": 1}, "some_future_field"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
]


@pytest.mark.parametrize(("change", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_refused_fields_name_themselves(tmp_path: Path, change: dict, field: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(__import__("json").dumps({**SMALL_DDPM, **change}))
    with pytest.raises(UserError) as err:
        load_diffusers_unet(folder)
    assert err.value.field.endswith(field), err.value


@pytest.mark.parametrize(
    ("scheduler", "field"),
    [
        ({**DDPM_SCHEDULER, "beta_schedule": "sigmoid"}, "scheduler.beta_schedule"),
        ({**DDPM_SCHEDULER, "trained_betas": [0.1] * 1000}, "scheduler.trained_betas"),
        ({**DDPM_SCHEDULER, "prediction_type": "flow"}, "scheduler.prediction_type"),
        ({**DDPM_SCHEDULER, "rescale_betas_zero_snr": True}, "scheduler.rescale_betas_zero_snr"),
        ({**DDPM_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}, "scheduler._class_name"),
        ({**CD_SCHEDULER, "s_noise": 1.1}, "scheduler.s_noise"),
    ],
)
def test_refused_scheduler_fields(tmp_path: Path, scheduler: dict, field: str) -> None:
    folder = write_diffusers_folder(tmp_path / "s", diffusers_unet(SMALL_DDPM), scheduler)
    with pytest.raises(UserError) as err:
        import_diffusers(folder)
    assert err.value.field == field


def test_refuses_non_model_folders(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config\.json"):
        load_diffusers_unet(tmp_path)
    folder = write_diffusers_folder(tmp_path / "p", diffusers_unet(SMALL_DDPM), DDPM_SCHEDULER)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="not found"):
        load_diffusers_unet(folder)
    folder = write_diffusers_folder(tmp_path / "q", diffusers_unet(SMALL_DDPM), DDPM_SCHEDULER)
    with pytest.raises(UserError, match="--schedule"):
        import_diffusers(folder, schedule="quadratic")


def test_a_pipeline_with_other_components_is_refused(tmp_path: Path) -> None:
    folder = write_diffusers_folder(tmp_path / "ldm", diffusers_unet(SMALL_DDPM), DDPM_SCHEDULER)
    index = {
        "_class_name": "LDMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }
    (folder / "model_index.json").write_text(__import__("json").dumps(index))
    with pytest.raises(UserError, match="unet \\+ scheduler") as err:
        import_diffusers(folder)
    assert err.value.field == "model_index.json"


def test_import_diffusers_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    folder = write_diffusers_folder(tmp_path / "cm", diffusers_unet(CD_IMAGENET64_REDUCED), CD_SCHEDULER)
    out = tmp_path / "cm64.safetensors"
    assert main(["import-diffusers", str(folder), "--out", str(out), "--name", "cm64"]) == 0
    printed = capsys.readouterr().out
    for expected in ("kind: consistency", '"name": "edm"', '"head_channels": 16', "parameters: ", "wrote "):
        assert expected in printed, printed
    _, header = load_checkpoint(out)
    assert header.name == "cm64" and header.consistency is not None and header.consistency.c_in
    bad = main(["import-diffusers", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert bad == 2 and err.count("\n") == 1 and "not a folder" in err
    refused = main(["import-diffusers", str(folder), "--out", str(tmp_path / "x.pt")])
    assert refused == 2 and "--out" in capsys.readouterr().err
