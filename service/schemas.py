"""Request and response bodies (pydantic v2). Flat models, so OpenAPI needs no shared definitions.

Requests forbid unknown fields (a typo is a 422 naming it, not a silently ignored option) and
non-finite floats.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from models.sampling_spec import (
    CONSISTENCY_SAMPLERS,
    DIFFUSION_SAMPLERS,
    STRENGTHS,
    DdimEps,
    DiffusersSpacing,
    StrengthName,
)
from service.jobs import JobResult

MAX_SEED = 2**63 - 1

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Label = Annotated[StrictInt, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=64)]


class _JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    model: str | None = Field(
        None, min_length=1, max_length=128, description="Served model; default: see /models."
    )
    sampler: str | None = Field(
        None,
        description=f"{' | '.join(DIFFUSION_SAMPLERS)} (diffusion models) or {' | '.join(CONSISTENCY_SAMPLERS)}; "
        "default: the model's.",
    )
    steps: int | None = Field(
        None, ge=1, description="Sampler steps (network evaluations); default: the model's."
    )
    times: list[Annotated[float, Field(gt=0.0, lt=1.0)]] | None = Field(
        None,
        max_length=999,
        description="Times after the first network evaluation at which the sampler evaluates the network "
        "again, strictly decreasing and below the start (1 for /sample, t* for /purify): for a consistency "
        "model the re-noising times of multistep sampling, e.g. [0.5]. Replaces the sampler's own spacing; "
        "network evaluations = len(times) + 1, so steps may be omitted.",
    )
    eta: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="DDIM stochasticity (0: deterministic); only the ddim sampler uses it.",
    )
    spacing: DiffusersSpacing | None = Field(
        None,
        description="diffusers' timestep spacing (its DDIM/DDPM scheduler's timestep_spacing) instead of the "
        "sampler's own, to reproduce a diffusers run: diffusion samplers, /sample only, not with times. "
        "Omitted: ours (docs/IMPORTING.md says why it is the default).",
    )
    ddim_eps: DdimEps = Field(
        "from-x0",
        description="DDIM after x0 clipping: from-x0 steps along the eps of the clipped x0 (ours; diffusers' "
        "use_clipped_model_output=True), model keeps the network's eps (diffusers' default); model is for the "
        "ddim sampler only.",
    )
    seeds: list[Seed] | Seed | None = Field(
        None,
        description="One seed per output image, or a base seed (output i gets base + i); omitted: random, "
        "returned in the response.",
    )
    format: Literal["png", "npy"] = Field(
        "png", description="png: base64 PNG per image; npy: one base64 float32 .npy array in [-1, 1]."
    )
    async_: bool = Field(
        False, alias="async", description="Return 202 with the job id and a Location header at once."
    )


# A 28x28 grey gradient: the examples in /openapi.json run as they are (Swagger UI's "Try it out",
# schemathesis' examples phase) on any served model, /purify resizing it to the model's shape.
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAWElEQVR42u3SQQ7AIAhEUTvh3//KXWgjis4JutLkJcAQnhYQwHzmV8aQsZ"
    "AxZAwZGz3P1nteLEcplqJUQ8ZCxr4oR6vry5VkbF/fOoGMrevbJxf/JfhLeAE7WA6pRvdufwAAAABJRU5ErkJggg=="
)


class SampleRequest(_JobRequest):
    """POST /sample."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"num_images": 2, "steps": 4, "seeds": 7}]})

    num_images: int = Field(1, ge=1, description="Images to generate (at most ROBUSTDIFF_MAX_IMAGES).")
    labels: list[Label] | Label | None = Field(
        None,
        description="Class label(s) for a conditional model: one per image or one for all; index or name.",
    )


class PurifyRequest(_JobRequest):
    """POST /purify as JSON (multipart/form-data takes the same fields, with images as `files`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"images": [EXAMPLE_PNG], "strength": "strong", "resize": True, "seeds": 7}]
        }
    )

    images: list[str] = Field(
        ..., min_length=1, description="Base64 PNG, JPEG or .npy (shape [C,H,W] or [N,C,H,W]) images."
    )
    npy_range: Literal["0,1", "-1,1"] | None = Field(
        None, description="Value range of .npy inputs; required when any image is a .npy array."
    )
    t_star: float | None = Field(None, gt=0.0, le=1.0, description="Diffusion time to noise the input to.")
    strength: StrengthName | None = Field(
        None,
        description="A named noise level, the same on every model: light, medium, strong add noise of std "
        "0.17 / 0.34 / 0.72 (data in [-1, 1]; DDPM's linear schedule at t* 0.05 / 0.1 / 0.2). Each model "
        "runs it at the t* of its own schedule with the nearest noise level (GET /models lists them as "
        "strengths; the response reports t_star). Default medium; excludes t_star.",
    )
    draws: int = Field(1, ge=1, description="Purified draws per image (independent noise), e.g. for voting.")
    resize: bool = Field(
        False, description="Resize and convert channels of images that differ from the model's shape."
    )
    labels: list[Label] | Label | None = Field(
        None,
        description="Class label(s) of the inputs, required by a conditional model: one per image or one.",
    )


class ErrorItem(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a code, a one-line detail, and each offending field with its reason."""

    error: str
    detail: str
    errors: list[ErrorItem]


class JobStatus(BaseModel):
    id: str
    kind: str
    model: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: dict[str, int] | None = Field(None, description="{'step': i, 'steps': n} once running.")
    result: JobResult | None = None
    error: ErrorItem | None = None


class ModelEntry(BaseModel):
    """A served model as its worker registers it in Redis: what a request may ask of it."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer worker's extra field is not an error

    name: str
    kind: str
    method: str
    image_shape: list[int]
    num_classes: int
    timesteps: int = Field(description="T of the model's schedule: t_star and times must be at least 1/T.")
    class_names: list[str]
    hash: str
    samplers: list[str]
    default_steps: int
    dataset: str = "unknown"
    eval_s: float = Field(
        0.0, description="Seconds per image per network evaluation, measured by the worker at warm-up."
    )
    strengths: dict[str, float] = Field(
        default_factory=lambda: dict(STRENGTHS),
        description="t* of each named strength on this model's schedule: the grid time whose noise level is "
        "nearest to the name's (light / medium / strong: sigma 0.17 / 0.34 / 0.72).",
    )
    seed: int | None = Field(
        None, description="The seed the model was trained with (null: not recorded, e.g. an imported model)."
    )


class ServedModel(ModelEntry):
    """A registered model as GET /models lists it."""

    workers: int = Field(description="Live workers serving it.")
    default: bool


class ModelsResponse(BaseModel):
    models: list[ServedModel]


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of a flat request model, inlined into OpenAPI by the routes that parse bodies by hand."""
    return model.model_json_schema(by_alias=True)


class JobAccepted(BaseModel):
    """The 202 answer of an asynchronous request (or of one whose Idempotency-Key found its job)."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    created: bool = Field(description="False when the Idempotency-Key named a job submitted before.")
    location: str = Field(description="/jobs/{id}: poll it for the status and result.")
