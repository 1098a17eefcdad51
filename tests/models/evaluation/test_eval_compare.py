from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from models.errors import UserError
from models.evaluation.common import wilson_interval
from models.evaluation.compare import compare_rows, mcnemar_exact_p, paired_difference_interval
from service.cli import main


@pytest.mark.parametrize(("a_only", "b_only"), [(0, 0), (0, 10), (3, 9), (12, 12), (40, 25), (300, 260)])
def test_mcnemar_matches_the_exact_binomial_test(a_only: int, b_only: int) -> None:
    expected = 1.0 if a_only + b_only == 0 else binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact_p(a_only, b_only) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact_p(a_only, b_only) == mcnemar_exact_p(b_only, a_only)


def test_mcnemar_does_not_underflow_on_large_tables() -> None:
    assert 0.0 < mcnemar_exact_p(700, 500) < 1e-6
    assert mcnemar_exact_p(1000, 1000) == 1.0


def test_paired_interval_is_antisymmetric_contains_the_estimate_and_stays_in_range() -> None:
    for table in [(50, 10, 3, 37), (0, 10, 0, 0), (10, 0, 0, 0), (0, 0, 0, 10), (5, 0, 7, 1)]:
        both, a_only, b_only, neither = table
        n = sum(table)
        lo, hi = paired_difference_interval(*table)
        lo_swapped, hi_swapped = paired_difference_interval(both, b_only, a_only, neither)
        assert lo == pytest.approx(-hi_swapped) and hi == pytest.approx(-lo_swapped)
        assert -1.0 <= lo <= (a_only - b_only) / n <= hi <= 1.0


def test_pairing_narrows_the_interval_when_the_models_agree() -> None:
    """Same marginals (70% vs 65% of 200), more agreement -> a narrower paired interval."""
    loose = paired_difference_interval(91, 49, 39, 21)  # agreement near independence
    tight = paired_difference_interval(130, 10, 0, 60)  # B's right images are a subset of A's
    assert tight[1] - tight[0] < 0.6 * (loose[1] - loose[0])
    assert tight[0] > 0.0 > loose[0]  # only the paired view of the agreeing models separates them


def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    """Correlated pairs with known marginals (0.72 and 0.66): simulated coverage near the nominal 95%."""
    rng = np.random.default_rng(0)
    cells = np.array([0.60, 0.12, 0.06, 0.22])  # both, A only, B only, neither
    truth = cells[1] - cells[2]
    hits = 0
    reps = 2000
    for table in rng.multinomial(150, cells, size=reps):
        lo, hi = paired_difference_interval(*(int(v) for v in table))
        hits += lo <= truth <= hi
    assert 0.93 <= hits / reps <= 0.975


def _report(bits_by_setting: dict[tuple, str]) -> dict:
    rows = []
    for (defense, attack, eps, eot, steps), bits in bits_by_setting.items():
        row = {"defense": defense, "attack": attack, "eps": eps, "majority_per_image": bits}
        if attack != "none":
            row |= {"eot": eot, "attack_steps": steps}
        rows.append(row)
    return {"results": rows}


CLEAN = ("purifier", "none", 0.0, None, None)
PGD = ("purifier", "pgd-eot", 0.0314, 8, 100)


def test_compare_pairs_shared_settings_on_the_shared_images() -> None:
    a = _report({CLEAN: "11110000", PGD: "11100000", ("purifier", "pgd-eot", 0.1, 8, 100): "1000"})
    b = _report({CLEAN: "1011", PGD: "0110"})  # a smaller n: only the first 4 images are shared
    rows = compare_rows(a, b, ("a", "b"))
    assert [r["setting"] for r in rows] == [
        "purifier, clean",
        "purifier, pgd-eot eps 0.0314 EOT 8, 100 steps",
    ]
    clean, pgd = rows
    assert (clean["n"], clean["both"], clean["a_only"], clean["b_only"], clean["neither"]) == (4, 3, 1, 0, 0)
    assert (pgd["both"], pgd["a_only"], pgd["b_only"], pgd["neither"]) == (2, 1, 0, 1)
    assert pgd["majority_a"] == 0.75 and pgd["majority_b"] == 0.5 and pgd["difference"] == 0.25
    assert pgd["majority_a_ci95"] == list(wilson_interval(3, 4))
    assert pgd["mcnemar_p"] == 1.0


def test_compare_refuses_reports_without_per_image_outcomes_or_shared_settings() -> None:
    old = {"results": [{"defense": "purifier", "attack": "none", "eps": 0.0, "majority": 0.9}]}
    with pytest.raises(UserError, match="no per-image outcomes"):
        compare_rows(old, _report({CLEAN: "1"}), ("old.json", "b"))
    with pytest.raises(UserError, match="share no setting"):
        compare_rows(_report({CLEAN: "1"}), _report({PGD: "1"}), ("a", "b"))


def test_compare_cli_writes_json_and_plot_and_rejects_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, bits in ((a, "1" * 30 + "0" * 10), (b, "1" * 18 + "0" * 22)):
        folder.mkdir()
        report = _report({PGD: bits}) | {"model": {"name": folder.name}, "classifier": {"hash": "h"}}
        (folder / "robust.json").write_text(json.dumps(report))
    out = tmp_path / "cmp"
    assert main(["eval", "compare", str(a), str(b / "robust.json"), "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    (row,) = report["results"]
    assert row["a_only"] == 12 and row["b_only"] == 0 and row["mcnemar_p"] == pytest.approx(2 * 0.5**12)
    assert row["difference_ci95"][0] > 0 and report["same_classifier"] is True
    assert (out / "compare.png").stat().st_size > 0
    assert "+30.0" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    for bad, message in (
        (tmp_path / "missing.json", "does not exist"),
        (tmp_path / "bad.json", "is not JSON"),
    ):
        assert main(["eval", "compare", str(bad), str(a), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            message in err
            and err.startswith("robustdiff eval: error: reports:")
            and len(err.splitlines()) == 1
        )
    assert not (tmp_path / "x").exists()


def test_compare_warns_when_one_classifier_disagrees_with_itself_on_clean_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same classifier, different clean outcomes: the reports cannot be on the same images."""
    undefended = ("none", "none", 0.0, None, None)
    paths = []
    for name, bits in (("a", "1101"), ("b", "1111")):
        report = _report({undefended: bits, PGD: "1000"}) | {"classifier": {"hash": "h"}}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert main(["eval", "compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    assert "disagrees with itself on 1 clean images" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["warnings"]) == 1
    paths[1].write_text(
        json.dumps(_report({undefended: "1101", PGD: "1000"}) | {"classifier": {"hash": "h"}})
    )
    assert main(["eval", "compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_compare_names_the_classifiers_when_they_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for name in ("robust", "plain"):
        classifier = {"hash": name, "path": f"models/weights/cls-{name}.safetensors"}
        report = _report({PGD: "1000"}) | {"model": {"name": "m"}, "classifier": classifier}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert main(["eval", "compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    assert "A = m + cls-robust (" in capsys.readouterr().out
    paths[1].write_text(paths[0].read_text())
    assert main(["eval", "compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    assert "A = m (" in capsys.readouterr().out
