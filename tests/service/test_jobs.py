"""The job contracts in-process: the result the worker stores becomes the answer, errors keep
their field, and a job's kind fixes which fields it has."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.jobs import Job, JobError, JobResult, Timings
from service.submit import job_result, job_status


def result(**kw: object) -> JobResult:
    fields: dict[str, object] = {
        "job_id": "j",
        "kind": "sample",
        "model": "m",
        "model_hash": "h",
        "sampler": "ddim",
        "steps": 10,
        "format": "png",
        "seeds": [1],
        "images": ["png"],
        "timings": Timings(queue_s=0.5, compute_s=1.0, batch_images=3),
    }
    return JobResult.model_validate({**fields, **kw})


def test_the_answer_has_its_format_only_and_the_total_time() -> None:
    body = result().answer(2.0000004)
    assert "array" not in body and "t_star" not in body and body["images"] == ["png"]
    assert body["timings"] == {"queue_s": 0.5, "compute_s": 1.0, "total_s": 2.0, "batch_images": 3}
    assert (body["spacing"], body["ddim_eps"]) == (None, "from-x0")
    npy = result(kind="purify", format="npy", images=None, array="npy", t_star=0.1).answer(1.0)
    assert "images" not in npy and npy["array"] == "npy" and npy["t_star"] == 0.1


def test_a_stored_record_reads_back_as_its_answer_and_status() -> None:
    record = {
        "id": "j",
        "kind": "sample",
        "model": "m",
        "status": "done",
        "created": "10.0",
        "finished": "12.5",
        "step": "10",
        "steps": "10",
        "result": result(spacing="trailing").model_dump_json(),
    }
    assert job_result(record)["timings"]["total_s"] == 2.5
    status = job_status(record)
    assert status["progress"] == {"step": 10, "steps": 10} and status["result"]["spacing"] == "trailing"
    failed = {
        **record,
        "status": "failed",
        "error": JobError(field="steps", reason="too many").model_dump_json(),
    }
    del failed["result"]
    assert job_status(failed)["error"] == {"field": "steps", "reason": "too many"}


def test_a_job_has_the_fields_of_its_kind() -> None:
    Job(kind="sample", model="m", sampler="ddim", steps=1, seeds=[0])
    Job(kind="purify", model="m", sampler="ddim", steps=1, seeds=[0, 1], draws=2, t_star=0.1, images="x")
    with pytest.raises(ValidationError, match="exactly for purify jobs"):
        Job(kind="sample", model="m", sampler="ddim", steps=1, seeds=[0], t_star=0.1)
    with pytest.raises(ValidationError, match="draws seeds per input"):
        Job(kind="purify", model="m", sampler="ddim", steps=1, seeds=[0], draws=2, t_star=0.1, images="x")
    with pytest.raises(ValidationError, match="spacing"):
        Job.model_validate(
            {"kind": "sample", "model": "m", "sampler": "ddim", "steps": 1, "seeds": [0], "spacing": "x"}
        )
