"""The job contract between the API (which writes it) and the worker (which reads it): one
definition, torch-free, stored as JSON in the job's Redis hash.

The API resolves every default (model, sampler, steps, seeds, labels, t*) before it writes a job,
so the worker reads exactly what it will run; the result it writes back is ``schemas.JobResult``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
