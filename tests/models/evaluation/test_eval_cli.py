from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.data import FASHION_MNIST_DIR, load_fashion_mnist
from models.evaluation.classifier import DEFAULT_CLASSIFIER, load_classifier, read_classifier_header
from models.testing import tiny_checkpoint
from service.cli import main

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")


def _robust(model: Path, classifier: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "robust",
        "--model",
        str(model),
        "--classifier",
        str(classifier),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--eps", "0.1,-0.03"), "eps: must be finite and >= 0"),
        (("--attacks", "none,fgsm"), "attacks: unknown attack 'fgsm'"),
        (("--threat", "l1"), "threat: unknown threat 'l1'"),
        (("--eot", "0"), "eot: must be >= 1"),
        (("--steps", "200"), "steps: at most 100 steps fit below t*=0.1"),
        (("--sampler", "consistency"), "sampler: 'consistency' needs a consistency model"),
        (("--no-wait",), "no-wait: only for --attack-only helpers"),
        (("--claim-timeout", "0"), "claim-timeout: must be > 0 seconds"),
        (("--restarts", "0"), "restarts: must be >= 1"),
        (("--loss", "dlr"), "loss: unknown loss 'dlr'; known: ce, margin"),
        (("--restarts", "2000", "--attack-steps", "100", "--eot", "8"), "restarts: restarts x attack steps"),
        (("--sanity-n", "0"), "sanity-n: must be >= 1, got 0"),
        (("--sanity-n", "-4"), "sanity-n: must be >= 1, got -4"),
    ],
)
def test_bad_robust_arguments_fail_before_any_work(
    tiny_model: Path,
    tiny_classifier: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(_robust(tiny_model, tiny_classifier, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_classifier_model_shape_mismatch_fails_before_any_work(
    tiny_model16: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("robust", "quality", "corruption"):
        out = tmp_path / command
        args = [
            "eval",
            command,
            "--model",
            str(tiny_model16),
            "--classifier",
            str(tiny_classifier),
            "--out",
            str(out),
        ]
        assert main(args) == 2
        assert "classifier: expects images 1x32x32" in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize("command", ["robust", "quality", "corruption"])
def test_a_bad_data_path_fails_and_leaves_no_out_folder(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "out"
    args = ["eval", command, "--model", str(tiny_model), "--classifier", str(tiny_classifier)]
    assert main([*args, "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: data_path:" in err and "nowhere not found" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("sigma", ["inf", "nan", "-0.1"])
def test_a_non_finite_or_negative_sigma_is_refused(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sigma: str
) -> None:
    out = tmp_path / "out"
    args = ["eval", "corruption", "--model", str(tiny_model), "--classifier", str(tiny_classifier)]
    assert main([*args, "--sigma", sigma, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"sigma: must be finite and >= 0, got {float(sigma)}" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_diffusion_checkpoint_is_not_a_classifier(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_robust(tiny_model, tiny_model, tmp_path / "o")) == 2
    assert "is not a classifier" in capsys.readouterr().err


@needs_data
def test_eval_robust_end_to_end_on_a_tiny_model(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path
) -> None:
    out = tmp_path / "robust"
    args = _robust(
        tiny_model,
        tiny_classifier,
        out,
        "--n",
        "4",
        "--eps",
        "0.05",
        "--attack-steps",
        "1,2",
        "--eot",
        "1,2",
        "--draws",
        "3",
        "--steps",
        "2",
        "--sanity-n",
        "2",
    )
    assert main(args) == 0
    report = json.loads((out / "robust.json").read_text())
    attacks = {(r["defense"], r["attack"]) for r in report["results"]}
    assert attacks == {("none", "none"), ("purifier", "none"), ("purifier", "classifier-only"), ("none", "classifier-only"),
                       ("purifier", "bpda-eot"), ("purifier", "pgd-eot")}  # fmt: skip
    for r in report["results"]:
        assert r["worst"] <= r["mean"] <= r["best"] and r["draws"] in (1, 3)
        bits = r["majority_per_image"]
        assert len(bits) == 4 and bits.count("1") / 4 == r["majority"]
    assert report["sanity"]["gradients_finite"] is True
    assert report["purifier"]["grad_checkpoint"] is True  # auto: a 2-step purifier recomputes in backward
    assert "large_eps" in report["sanity"] and report["sanity"]["non_increasing_in_eot"]
    assert (out / "robust_vs_eps.png").stat().st_size > 0 and (out / "robust_vs_steps.png").stat().st_size > 0
    # a report compared with itself: every setting paired, no discordant image, no difference
    assert main(["eval", "compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]
    assert len(rows) == len(report["results"])
    assert all(r["difference"] == 0 and r["mcnemar_p"] == 1.0 and r["n"] == 4 for r in rows)


@needs_data
def test_eval_quality_and_corruption_end_to_end(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = tmp_path / "q"
    args = [
        "eval",
        "quality",
        "--model",
        str(tiny_model),
        "--classifier",
        str(tiny_classifier),
        "--out",
        str(q),
    ]
    assert main([*args, "--sampler", "ddim,dpm-solver++", "--steps", "1,2", "--n", "8"]) == 0
    report = json.loads((q / "quality.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in report["results"]] == [
        ("ddim", 1),
        ("ddim", 2),
        ("dpm-solver++", 1),
        ("dpm-solver++", 2),
    ]
    digest = read_classifier_header(tiny_classifier).content_hash[:12]
    features = f"tiny-classifier (penultimate layer of {tiny_classifier.name}, hash {digest})"
    assert report["feature_network"] == features and len(digest) == 12
    assert all(r["feature_network"] == features for r in report["results"])
    assert f"FD in the feature space of {features}" in capsys.readouterr().out
    assert all(r["fd"] >= 0 for r in report["results"]) and (q / "fd_vs_nfe.png").is_file()
    for row in report["results"]:  # the bootstrap resamples the 8 samples: its interval holds FD
        assert row["fd_ci95"][0] <= row["fd_ci95"][1] and isinstance(row["kid"], float)
        assert row["kid_ci95"][0] <= row["kid_ci95"][1]
    assert "unbiased" in report["kid"] and "bootstrap" in report["intervals"]
    for row in [*report["results"], report["reference"]]:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["coverage"] <= 1
        assert row["density"] >= 0
    c = tmp_path / "c"
    args = [
        "eval",
        "corruption",
        "--model",
        str(tiny_model),
        "--classifier",
        str(tiny_classifier),
        "--out",
        str(c),
    ]
    assert main([*args, "--t-star", "0.05,0.1", "--steps", "2", "--n", "4"]) == 0
    corruption = json.loads((c / "corruption.json").read_text())
    assert corruption["classifier"]["hash"] == read_classifier_header(tiny_classifier).content_hash
    rows = corruption["results"]
    assert len(rows) == 3 * 3
    clean = next(r for r in rows if r["t_star"] == 0.0 and r["images"] == "clean")
    assert clean["ssim"] == pytest.approx(1.0) and clean["psnr_db"] == 100.0


@needs_data
def test_eval_robust_one_step_consistency_purifier(tiny_classifier: Path, tmp_path: Path) -> None:
    """A CM purifier is attacked through its single call, without recomputation (auto), and reported."""
    model = tiny_checkpoint(tmp_path / "cm.safetensors", kind="consistency", image_size=32)
    out = tmp_path / "robust"
    args = _robust(model, tiny_classifier, out, "--n", "2", "--eps", "0.05", "--attacks", "none,pgd-eot")
    args += ["--attack-steps", "1", "--eot", "2", "--draws", "2", "--sampler", "consistency", "--steps", "1"]
    assert main([*args, "--sanity-eps", "0"]) == 0
    report = json.loads((out / "robust.json").read_text())
    assert report["purifier"] == report["purifier"] | {
        "sampler": "consistency",
        "nfe": 1,
        "grad_checkpoint": False,
    }
    pgd = next(r for r in report["results"] if r["attack"] == "pgd-eot")
    assert pgd["attack_network_evals_per_image"] == 2 and 0 <= pgd["mean"] <= 1


def _stored_advs(folder: Path, steps: int) -> torch.Tensor:
    return torch.cat([load_file(f)[f"adv_{steps}"] for f in sorted(folder.glob("*.safetensors"))])


@needs_data
def test_restarts_reuse_the_attack_without_them_and_keep_what_fools_the_classifier(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Against the real classifier alone an image survives 3 restarts only if it survives each."""
    out, n = tmp_path / "robust", 24
    base = _robust(tiny_model, DEFAULT_CLASSIFIER, out, "--n", str(n), "--batch-size", "8", "--eps", "0.02")
    base += ["--attacks", "none,classifier-only", "--attack-steps", "1,3", "--draws", "1", "--steps", "1"]
    base += ["--sanity-eps", "0"]
    assert main(base) == 0
    adversarial = out / "adversarial"
    first = _stored_advs(adversarial / "classifier-only-linf-eps0.02-eot1", 3)
    once = json.loads((out / "robust.json").read_text())
    assert main([*base, "--restarts", "3"]) == 0
    report = json.loads((out / "robust.json").read_text())
    assert report["restarts"] == 3
    folders = [adversarial / f"classifier-only-linf-eps0.02-eot1{s}" for s in ("", "-restart1", "-restart2")]
    advs = [_stored_advs(f, 3) for f in folders]
    assert torch.equal(advs[0], first)  # restart 0 is the attack without restarts, reused
    assert not torch.equal(advs[1], advs[0]) and not torch.equal(advs[2], advs[1])
    net, _ = load_classifier(DEFAULT_CLASSIFIER)
    y = load_fashion_mnist("test").labels[:n]
    with torch.no_grad():
        survives = torch.stack([net(a).argmax(1) == y for a in advs]).all(0)
    undefended = [r for r in report["results"] if r["defense"] == "none" and r["attack"] == "classifier-only"]
    alone_once = [r for r in once["results"] if r["defense"] == "none" and r["attack"] == "classifier-only"]
    top, top_once = undefended[-1], alone_once[-1]
    assert top["majority_per_image"] == "".join("1" if ok else "0" for ok in survives.tolist())
    by_restarts = top["majority_by_restarts"]
    assert by_restarts[0] == top_once["majority"] and by_restarts[-1] == top["majority"]
    assert all(b <= a for a, b in itertools.pairwise(by_restarts))
    assert 0 < top["majority"] < top_once["majority"]  # restarts found images one attack missed
    pitfall = [
        r for r in report["results"] if r["defense"] == "purifier" and r["attack"] == "classifier-only"
    ]
    assert pitfall[-1]["resumed_images"] == n and pitfall[-1]["restarts"] == top["restarts"] == 3
    # a report with restarts pairs only with one of the same restarts
    assert main(["eval", "compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]
    assert {r["setting"] for r in rows} >= {"undefended, classifier-only eps 0.02 EOT 1, 3 steps, 3 restarts"}


@needs_data
def test_the_margin_loss_attack_is_stored_apart_and_labelled(tiny_model: Path, tmp_path: Path) -> None:
    out, n = tmp_path / "robust", 8
    args = _robust(tiny_model, DEFAULT_CLASSIFIER, out, "--n", str(n), "--batch-size", "8", "--eps", "0.02")
    args += ["--attacks", "none,classifier-only", "--attack-steps", "3", "--draws", "1", "--steps", "1"]
    assert main([*args, "--sanity-eps", "0.5", "--sanity-n", "8", "--loss", "margin"]) == 0
    report = json.loads((out / "robust.json").read_text())
    assert report["loss"] == "margin" and report["sanity"]["large_eps"]["reaches_zero"] is True
    assert sorted(p.name for p in (out / "adversarial").iterdir()) == [
        "classifier-only-linf-eps0.02-eot1-margin",
        "sanity-classifier-only-linf-eps0.5-eot1-margin",
        "sanity-steps-classifier-only-linf-eps0.02-eot1-margin",  # one step count: 1 vs 3 checked
    ]
    attacked = [r for r in report["results"] if r["attack"] != "none"]
    assert attacked and all(r["loss"] == "margin" for r in attacked)
    assert main(["eval", "compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]
    assert "undefended, classifier-only eps 0.02 EOT 1, 3 steps, margin loss" in {r["setting"] for r in rows}


def _row(report: dict, eot: int, steps: int) -> dict:
    return next(
        r
        for r in report["results"]
        if r["attack"] == "pgd-eot" and r["eot"] == eot and r["attack_steps"] == steps
    )


@needs_data
def test_one_eot_and_one_step_count_are_still_checked_on_the_sanity_images(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path
) -> None:
    """One --eot and one --attack-steps value: the sanity images are attacked at EOT 1 and at half
    the steps with the reported attack's seeds, which gives what a run reporting those rows gives."""
    base = _robust(tiny_model, tiny_classifier, tmp_path / "one", "--n", "4", "--eps", "0.05")
    base += ["--attacks", "none,pgd-eot", "--draws", "2", "--steps", "1", "--sanity-eps", "0"]
    assert main([*base, "--eot", "2", "--attack-steps", "2", "--sanity-n", "100"]) == 0  # clamped to --n
    sanity = json.loads((tmp_path / "one" / "robust.json").read_text())["sanity"]
    (by_eot,), (by_steps,) = sanity["non_increasing_in_eot"], sanity["non_increasing_in_steps"]
    assert (by_eot["eot"], by_eot["attack_steps"], by_eot["n"]) == ([1, 2], 2, 4)
    assert (by_steps["attack_steps"], by_steps["eot"], by_steps["n"]) == ([1, 2], 2, 4)
    assert by_eot["compared"].startswith("the first 4 images: the reported attack (restart 0) at EOT 2")
    assert by_eot["tolerance"] == 0.5 and "large_eps" not in sanity
    assert sorted(p.name for p in (tmp_path / "one" / "adversarial").iterdir()) == [
        "pgd-eot-linf-eps0.05-eot2",
        "sanity-eot-pgd-eot-linf-eps0.05-eot1",
        "sanity-steps-pgd-eot-linf-eps0.05-eot2",
    ]
    both = _robust(tiny_model, tiny_classifier, tmp_path / "both", *base[base.index("--n") :])
    assert main([*both, "--eot", "1,2", "--attack-steps", "1,2", "--sanity-n", "4"]) == 0
    report = json.loads((tmp_path / "both" / "robust.json").read_text())
    rows_eot = [_row(report, e, 2) for e in (1, 2)]
    rows_steps = [_row(report, 2, s) for s in (1, 2)]
    assert by_eot["mean_by_eot"] == [r["mean"] for r in rows_eot]
    assert by_eot["majority_by_eot"] == [r["majority"] for r in rows_eot]
    assert by_steps["mean_by_steps"] == [r["mean"] for r in rows_steps]
    assert by_steps["majority_by_steps"] == [r["majority"] for r in rows_steps]
    (row_eot,) = report["sanity"]["non_increasing_in_eot"]
    assert (
        row_eot["compared"] == "report rows, all 4 images" and row_eot["mean_by_eot"] == by_eot["mean_by_eot"]
    )
    assert not any(p.name.startswith("sanity") for p in (tmp_path / "both" / "adversarial").iterdir())


@needs_data
def test_a_failed_sanity_check_warns_on_stderr_and_the_report_says_so(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny --sanity-eps cannot fool the real classifier: reported, warned about, exit 0."""
    out = tmp_path / "robust"
    args = _robust(tiny_model, DEFAULT_CLASSIFIER, out, "--n", "8", "--eps", "0.02", "--steps", "1")
    args += ["--attacks", "none,classifier-only", "--attack-steps", "2", "--draws", "1"]
    assert main([*args, "--sanity-eps", "0.001", "--sanity-n", "8"]) == 0
    sanity = json.loads((out / "robust.json").read_text())["sanity"]
    assert sanity["large_eps"]["reaches_zero"] is False and sanity["passed"] is False
    assert len(sanity["failed"]) == 1 and sanity["failed"][0].startswith("large_eps: classifier-only")
    (by_steps,) = sanity["non_increasing_in_steps"]  # classifier-only: 1 vs 2 steps on the 8 images
    assert by_steps["attack_steps"] == [1, 2] and by_steps["eot"] == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert warnings == [f"WARNING: sanity check failed: {sanity['failed'][0]}"]


@needs_data
def test_no_attack_draws_no_empty_legend(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    out = tmp_path / "robust"
    args = _robust(tiny_model, tiny_classifier, out, "--n", "2", "--attacks", "none", "--steps", "1")
    assert main(args) == 0
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]
    sanity = json.loads((out / "robust.json").read_text())["sanity"]
    assert sanity["passed"] is True and sanity["non_increasing_in_eot"] == []
    assert (out / "robust_vs_eps.png").stat().st_size > 0
