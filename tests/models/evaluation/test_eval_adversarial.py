"""Stored adversarial examples: an interrupted, extended or shared attack ends bit for bit the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import models.evaluation.robust as robust
from models.data import FASHION_MNIST_DIR
from models.errors import UserError
from models.evaluation import adversarial
from models.evaluation.adversarial import AdversarialStore
from service.cli import main

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
STORED = "adversarial/pgd-eot-linf-eps0.05-eot2"


def _args(model: Path, classifier: Path, out: Path, n: int, *extra: str) -> list[str]:
    args = ["eval", "robust", "--model", str(model), "--classifier", str(classifier), "--out", str(out)]
    args += ["--n", str(n), "--batch-size", "2", "--eps", "0.05", "--attacks", "none,pgd-eot", "--eot", "2"]
    return [*args, "--attack-steps", "1,2", "--draws", "2", "--steps", "2", "--sanity-eps", "0", *extra]


def _run(model: Path, classifier: Path, out: Path, n: int, *extra: str) -> int:
    return main(_args(model, classifier, out, n, *extra))


def _stored(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every batch file of the attack, by name; claim files must all be gone once a run ends."""
    folder = out / STORED
    assert not list(folder.glob("*.claim")) and not list(folder.glob("*.tmp"))
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


def _same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a
    )


def _results(out: Path) -> list[dict[str, Any]]:
    """The report's rows without timings; the first gradient's mean |g| to a relative 1e-6.

    That mean is a float reduction over a gradient whose last bits depend on the process's thread
    count (a helper runs with one thread, the in-process run with pytest's); the attacked images it
    steers by sign are compared bitwise by ``_same``.
    """
    drop = ("attack_wall_s", "resumed_images", "latency_s_per_purification", "purifier_wall_s")
    rows = json.loads((out / "robust.json").read_text())["results"]
    kept = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    for r in kept:
        for g in r.get("gradients", []):
            g["mean_abs"] = pytest.approx(g["mean_abs"], rel=1e-6)
    return kept


class _Counting:
    """Wraps robust.pgd: counts the batches attacked, and fails on call ``fail_at`` like a killed job."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at, self.pgd = 0, fail_at, robust.pgd

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.pgd(*args, **kwargs)


@pytest.fixture(scope="module")
def whole(tiny_model: Path, tiny_classifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted attack on 4 images (2 batches): what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    assert _run(tiny_model, tiny_classifier, out, 4) == 0
    return out


@needs_data
def test_an_interrupted_attack_resumes_bitwise(
    tiny_model: Path, tiny_classifier: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = tmp_path / "parts"
    killed = _Counting(fail_at=2)
    monkeypatch.setattr(robust, "pgd", killed)
    assert _run(tiny_model, tiny_classifier, parts, 4) == 130  # Ctrl-C / a killed job
    assert list(_stored(parts)) == ["000000.safetensors"]  # the first batch survived, its claim is gone
    again = _Counting()
    monkeypatch.setattr(robust, "pgd", again)
    assert _run(tiny_model, tiny_classifier, parts, 4) == 0
    # only the second batch was attacked, then the EOT check's EOT-1 attack on the 4 sanity images
    assert again.calls == 1 + 2
    stored = _stored(whole)
    assert list(stored) == ["000000.safetensors", "000002.safetensors"]
    assert stored["000000.safetensors"].keys() == {"clean", "adv_1", "adv_2"}
    assert _same(_stored(parts), stored)
    assert _results(parts) == _results(whole)
    pgd_row = next(
        r for r in json.loads((parts / "robust.json").read_text())["results"] if r["attack"] == "pgd-eot"
    )
    assert pgd_row["resumed_images"] == 2


@needs_data
def test_more_images_extend_a_finished_attack(
    tiny_model: Path, tiny_classifier: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown = tmp_path / "grown"
    assert _run(tiny_model, tiny_classifier, grown, 2) == 0
    counting = _Counting()
    monkeypatch.setattr(robust, "pgd", counting)
    assert _run(tiny_model, tiny_classifier, grown, 4) == 0
    assert counting.calls == 1 + 1  # the new batch, for the attack and for the EOT check's attack
    assert _same(_stored(grown), _stored(whole))


@needs_data
def test_two_processes_share_an_attack_and_match_one(
    tiny_model: Path, tiny_classifier: Path, whole: Path, tmp_path: Path
) -> None:
    """A helper with --attack-only and the reporting process, started together on one --out."""
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "service.cli"]
    helper = subprocess.Popen(
        [*cli, *_args(tiny_model, tiny_classifier, out, 4, "--attack-only")], env=env, stderr=subprocess.PIPE
    )
    reporter = subprocess.run(
        [*cli, *_args(tiny_model, tiny_classifier, out, 4)], env=env, capture_output=True, timeout=300
    )
    assert helper.wait(timeout=300) == 0, helper.stderr.read() if helper.stderr else ""
    assert reporter.returncode == 0, reporter.stderr
    assert _same(_stored(out), _stored(whole))
    assert _results(out) == _results(whole)


@needs_data
def test_other_attack_settings_are_refused_not_mixed(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert _run(tiny_model, tiny_classifier, out, 2) == 0
    assert _run(tiny_model, tiny_classifier, out, 2, "--seed", "1") != 0
    err = capsys.readouterr().err
    assert "holds an attack with other settings (seed)" in err and "Traceback" not in err
    assert _run(tiny_model, tiny_classifier, out, 2, "--draws", "3") == 0  # evaluation only: reused


SETTINGS = {"attack_steps": [1], "seed": 0}


def _finish(store: AdversarialStore, sl: slice) -> None:
    assert store.x is not None
    store.add(sl, {1: store.x[sl] + 0.1}, {"finite": True}, 0.5)


def test_a_store_refuses_other_clean_images(tmp_path: Path) -> None:
    store = AdversarialStore(tmp_path / "a", SETTINGS, batch=2)
    x = torch.zeros(2, 1, 4, 4)
    assert store.open(x) == 0 and store.claim() == slice(0, 2)
    _finish(store, slice(0, 2))
    assert store.claim() is None
    again = AdversarialStore(tmp_path / "a", SETTINGS, batch=2)
    assert again.open(x) == 2 and again.wall_s == 0.5
    assert torch.equal(again.advs[1], x + 0.1)
    with pytest.raises(UserError, match=r"data: .* was attacked on other images"):
        AdversarialStore(tmp_path / "a", SETTINGS, batch=2).open(torch.ones(2, 1, 4, 4))


def test_claims_give_each_store_other_batches_and_the_last_one_waits(tmp_path: Path) -> None:
    x = torch.arange(6.0).view(6, 1, 1, 1)
    a, b = AdversarialStore(tmp_path / "s", SETTINGS, 2), AdversarialStore(tmp_path / "s", SETTINGS, 2)
    assert a.open(x) == b.open(x) == 0
    assert a.claim() == slice(0, 2) and b.claim() == slice(2, 4) and a.claim() == slice(4, 6)
    _finish(a, slice(0, 2))
    _finish(a, slice(4, 6))
    returned: list[slice | None] = []
    waiter = threading.Thread(target=lambda: returned.append(a.claim()))
    waiter.start()
    time.sleep(3 * adversarial.POLL_S)
    assert waiter.is_alive()  # b's batch is held by a live claim: a waits instead of attacking it
    _finish(b, slice(2, 4))
    waiter.join(timeout=10 * adversarial.POLL_S)
    assert returned == [None] and a.done == 6
    assert b.claim() is None and b.done == 6  # reads the batches a finished
    assert torch.equal(a.advs[1], x + 0.1) and a.wall_s == 1.5


def _foreign_claim(store: AdversarialStore, start: int, pid: int, host: str) -> Path:
    claim = store.folder / f"{start:06d}.claim"
    store.folder.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"host": host, "pid": pid, "token": "other"}))
    return claim


def test_abandoned_claims_are_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = AdversarialStore(tmp_path / "s", SETTINGS, batch=2)
    store.open(torch.zeros(4, 1, 1, 1))
    _foreign_claim(store, 0, dead.pid, socket.gethostname())  # its process is gone
    stale = _foreign_claim(store, 2, os.getpid(), "another-host")  # cannot be checked, but quiet too long
    old = time.time() - adversarial.STALE_S - 1
    os.utime(stale, (old, old))
    assert store.claim() == slice(0, 2) and store.claim() == slice(2, 4)
    assert json.loads(stale.read_text())["token"] != "other"


def test_a_live_claim_is_left_alone_and_release_keeps_others(tmp_path: Path) -> None:
    store = AdversarialStore(tmp_path / "s", SETTINGS, batch=2)
    store.open(torch.zeros(4, 1, 1, 1))
    held = _foreign_claim(store, 0, os.getpid(), socket.gethostname())
    assert store.claim() == slice(2, 4)
    store.release(slice(0, 2))  # not ours: stays
    assert held.exists()


def test_a_helper_that_does_not_wait_leaves_the_batches_others_hold(tmp_path: Path) -> None:
    store = AdversarialStore(tmp_path / "s", SETTINGS, batch=2)
    store.open(torch.arange(4.0).view(4, 1, 1, 1))
    held = _foreign_claim(store, 0, os.getpid(), socket.gethostname())  # a live process holds batch 0
    assert store.claim(wait=False) == slice(2, 4)
    _finish(store, slice(2, 4))
    start = time.monotonic()
    assert store.claim(wait=False) is None and store.done == 2
    assert time.monotonic() - start < adversarial.POLL_S  # returned at once, no polling
    assert held.exists()


def test_the_cross_host_claim_timeout_is_a_knob(tmp_path: Path) -> None:
    """A claim from another host, quiet for 60 s: abandoned under a 30 s timeout, live under the default."""
    x = torch.zeros(2, 1, 1, 1)
    patient = AdversarialStore(tmp_path / "s", SETTINGS, batch=2)
    patient.open(x)
    claim = _foreign_claim(patient, 0, os.getpid(), "another-host")
    old = time.time() - 60
    os.utime(claim, (old, old))
    assert patient.claim(wait=False) is None
    hasty = AdversarialStore(tmp_path / "s", SETTINGS, batch=2, stale_s=30)
    hasty.open(x)
    assert hasty.claim(wait=False) == slice(0, 2)
    assert json.loads(claim.read_text())["token"] != "other"


def _single_file_attack(path: Path, x: torch.Tensor, grads: list[dict[str, Any]], settings: dict) -> None:
    """An attack as the earlier one-file format stored it: all batches in one file, one total time."""
    meta = {"settings": json.dumps(settings), "grads": json.dumps(grads), "wall_s": "3.0"}
    save_file({"clean": x, "adv_1": x + 0.1}, str(path), metadata=meta)


def test_an_earlier_one_file_attack_is_split_into_batches_not_redone(tmp_path: Path) -> None:
    x = torch.arange(5.0).view(5, 1, 1, 1)
    grads = [{"finite": True, "batch": i} for i in range(3)]
    _single_file_attack(tmp_path / "s.safetensors", x, grads, SETTINGS)
    store = AdversarialStore(tmp_path / "s", SETTINGS, batch=2)
    assert store.open(x) == 5 and store.claim(wait=False) is None  # nothing left to attack
    assert torch.equal(store.advs[1], x + 0.1) and store.grads == grads
    assert store.wall_s == pytest.approx(3.0)  # the total, split evenly over the batches
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "000000.safetensors",
        "000002.safetensors",
        "000004.safetensors",
        "s",
    ]
    with pytest.raises(UserError, match="other settings"):
        AdversarialStore(tmp_path / "s", {**SETTINGS, "seed": 1}, batch=2).open(x)


def test_an_unreadable_one_file_attack_is_refused(tmp_path: Path) -> None:
    x = torch.zeros(4, 1, 1, 1)
    _single_file_attack(tmp_path / "s.safetensors", x, [{"finite": True}], SETTINGS)  # 1 grad, 2 batches
    with pytest.raises(UserError, match=r"out: .*s\.safetensors is not an attack file"):
        AdversarialStore(tmp_path / "s", SETTINGS, batch=2).open(x)
