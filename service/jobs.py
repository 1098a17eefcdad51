"""The job contracts between the API and the worker: one definition each, torch-free, stored as
JSON in the job's Redis hash.

The API writes a ``Job`` and resolves every default (model, sampler, steps, seeds, labels, t*)
before it does, so the worker reads exactly what it will run. The worker writes back a
``JobResult`` (which the API answers, adding the total time) or a ``JobError``, and says it is
alive with a ``Heartbeat`` (read by the API's /readyz, /models and gauges, and by the other
workers, which reclaim a dead one's jobs).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.sampling_spec import DdimEps, DiffusersSpacing

Kind = Literal["sample", "purify"]


class Job(BaseModel):
    """A resolved /sample or /purify request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    model: str
    sampler: str
    steps: int = Field(ge=1, description="network evaluations per image")
    times: list[float] | None = None
    eta: float = 0.0
    spacing: DiffusersSpacing | None = Field(None, description="diffusers' spacing; None: the sampler's own")
    ddim_eps: DdimEps = "from-x0"
    format: Literal["png", "npy"] = "png"
    seeds: list[int] = Field(min_length=1, description="one per output image (per image and draw)")
    labels: list[int] | None = Field(None, description="one per input image (per output for sample)")
    draws: int = Field(1, ge=1, description="purify: outputs per input image")
    t_star: float | None = Field(None, description="purify: the time inputs are diffused to")
    images: str | None = Field(None, description="purify: base64 .npy float32 [N, C, H, W] in [-1, 1]")

    @model_validator(mode="after")
    def _kind_fields(self) -> Job:
        purify = self.kind == "purify"
        if purify != (self.images is not None) or purify != (self.t_star is not None):
            raise ValueError("images and t_star are given exactly for purify jobs")
        if len(self.seeds) % self.draws:
            raise ValueError("a purify job has draws seeds per input image")
        return self

    @property
    def outputs(self) -> int:
        """Output images: rows of the running batch."""
        return len(self.seeds)

    def output_labels(self) -> list[int] | None:
        """One label per output row (a purify input's label repeated for each of its draws)."""
        if self.labels is None:
            return None
        return [c for c in self.labels for _ in range(self.draws)] if self.kind == "purify" else self.labels


class Timings(BaseModel):
    queue_s: float = Field(description="Enqueue to joining the worker's running batch.")
    compute_s: float = Field(description="Time of the network steps the job's images were part of.")
    total_s: float = Field(0.0, description="Enqueue to the response (added by the API).")
    batch_images: int = Field(
        description="Mean images in the running batch over the job's steps (other jobs join and leave it)."
    )


class JobResult(BaseModel):
    """A finished job's output: what the worker stores, and the response once the API adds timings.total_s."""

    job_id: str
    kind: Kind
    model: str
    model_hash: str
    sampler: str
    steps: int = Field(description="Network evaluations per image.")
    times: list[float] | None = Field(None, description="The times asked for, if any.")
    spacing: DiffusersSpacing | None = Field(None, description="diffusers' spacing asked for; null: ours.")
    ddim_eps: DdimEps = Field("from-x0", description="DDIM's eps after x0 clipping (see the request).")
    format: Literal["png", "npy"]
    seeds: list[int] | list[list[int]] = Field(description="Per image (per image and draw for /purify).")
    images: list[str] | list[list[str]] | None = Field(None, description="Base64 PNGs (format png).")
    array: str | None = Field(
        None, description="Base64 .npy float32 in [-1,1], [N,C,H,W] or [N,draws,C,H,W] (format npy)."
    )
    labels: list[int] | None = None
    t_star: float | None = None
    timings: Timings

    def answer(self, total_s: float) -> dict[str, Any]:
        """The response body: the output in its format only (images or array), t_star for purify."""
        drop = {"array" if self.array is None else "images"} | (
            {"t_star"} if self.kind == "sample" else set()
        )
        body = self.model_dump(mode="json", exclude=drop)
        body["timings"]["total_s"] = round(total_s, 6)
        return body


class JobError(BaseModel):
    """Why a job failed or was cancelled; ``code`` "invalid" when the worker refused the request
    (answered 422, nothing broke), empty otherwise."""

    field: str = "job"
    reason: str = "failed"
    code: str = ""


class Heartbeat(BaseModel):
    """A worker's word that it is alive, rewritten every ROBUSTDIFF_HEARTBEAT_S."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer worker's extra field is not an error

    ts: float = Field(description="Wall time (Unix seconds) of the beat.")
    models: list[str] = Field(default_factory=list, description="Models loaded and warmed; empty: loading.")
    pid: int | None = None
    host: str = ""
    device: str = Field("", description="Devices its models run on, comma-separated.")
    metrics: str | None = Field(None, description="URL of its /metrics (None: not served).")

    def age(self, now: float) -> float:
        return now - self.ts
