"""Request resolution: a validated /sample or /purify body and the model's registry entry become
the ``Job`` a worker runs, with every default filled in (model, sampler, steps, seeds, labels, t*).

Pure functions (no Request, no Redis, no clock): the routes read the body and the registry, draw
the random base seed, and call these; everything a request may be refused for once its body is
well-formed is decided here, with the field and the reason (``ApiError``). The sampling rules come
from ``models.sampling_spec``, the same torch-free rules the library, the CLI and ``eval`` apply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models import sampling_spec as spec
from models.errors import UserError
from service.errors import ApiError
from service.jobs import Job
from service.schemas import MAX_SEED, ModelEntry, PurifyRequest, SampleRequest

Labels = list[int | str] | int | str | None


def default_model(served: dict[str, ModelEntry], configured: str) -> str | None:
    """The model a request that names none gets: ROBUSTDIFF_DEFAULT_MODEL if served, else the only
    one served, else none (the request must name one)."""
    if configured in served:
        return configured
    return next(iter(served)) if len(served) == 1 else None


def choose_model(served: dict[str, ModelEntry], name: str | None, configured_default: str) -> ModelEntry:
    """The registry entry of the model a request names (or the default one)."""
    if not served:
        raise ApiError(503, "model", "no worker has registered any model yet", headers={"Retry-After": "5"})
    if name is None:
        default = default_model(served, configured_default)
        if default is None:
            raise ApiError(422, "model", f"required: choose one of {sorted(served)}")
        return served[default]
    if name not in served:
        raise ApiError(422, "model", f"unknown model {name!r}; served: {sorted(served)}")
    return served[name]


@dataclass(frozen=True)
class Sampling:
    """How a request's images are sampled: the ``Job`` fields shared by /sample and /purify."""

    sampler: str
    steps: int
    times: list[float] | None
    eta: float
    spacing: spec.DiffusersSpacing | None
    ddim_eps: spec.DdimEps


def sampling(req: SampleRequest | PurifyRequest, model: ModelEntry, max_steps: int) -> Sampling:
    """The sampler (default: the model kind's), its checks against the model, and the step count:
    ``steps``, the model's default, or what ``times`` gives; diffusers' ``spacing`` (sampling only)
    and ``ddim_eps`` where they apply. Times below t* are checked by ``purify_job`` once t* is known."""
    sampler = req.sampler or spec.default_sampler(model.kind)
    try:
        spec.check_sampler(sampler, model.kind, model.name)
        spec.check_eta(sampler, req.eta)
        spec.check_spacing(
            req.spacing, sampler, times=req.times is not None, purify=isinstance(req, PurifyRequest)
        )
        spec.check_ddim_eps(req.ddim_eps, sampler)
        if req.times is None:
            steps = req.steps or model.default_steps
        else:
            steps = spec.check_times(req.times, 1.0, model.timesteps, req.steps)
        if req.spacing is not None:
            spec.diffusers_timesteps(model.timesteps, steps, req.spacing)
    except UserError as err:
        raise ApiError(422, err.field, err.reason) from None
    if steps > max_steps:
        raise ApiError(422, "steps", f"{steps} is over the maximum of {max_steps}")
    return Sampling(sampler, steps, req.times, req.eta, req.spacing, req.ddim_eps)


def seeds(given: list[int] | int | None, n: int, random_base: int) -> list[int]:
    """One seed per output image: the list given, base + i for a base seed, or random_base + i."""
    if given is None:
        return [random_base + i for i in range(n)]
    if isinstance(given, int):
        if given + n - 1 > MAX_SEED:
            raise ApiError(422, "seeds", f"base seed + {n - 1} is over {MAX_SEED}")
        return [given + i for i in range(n)]
    if len(given) != n:
        raise ApiError(
            422, "seeds", f"{len(given)} seeds given for {n} output images (or give one base seed)"
        )
    return list(given)


def labels(given: Labels, n: int, model: ModelEntry, seeds: list[int], kind: str) -> list[int] | None:
    """Class indices, one per image, for a conditional model (None for an unconditional one): as
    given (index or class name, one for all or one each), or for /sample drawn from the seeds."""
    classes = model.num_classes
    if not classes:
        if given is not None:
            raise ApiError(422, "labels", f"{model.name!r} is unconditional; omit labels")
        return None
    if given is None:
        if kind == "purify":
            raise ApiError(422, "labels", f"{model.name!r} is class-conditional: give each image's label")
        return [s % classes for s in seeds]  # reproducible from the seeds alone
    items = given if isinstance(given, list) else [given] * n
    if len(items) != n:
        raise ApiError(422, "labels", f"{len(items)} labels given for {n} images")
    names = model.class_names
    out = []
    for i, lab in enumerate(items):
        if isinstance(lab, str):
            if lab not in names:
                raise ApiError(422, f"labels[{i}]", f"unknown class {lab!r}; classes: {names}")
            out.append(names.index(lab))
        elif lab >= classes:
            raise ApiError(422, f"labels[{i}]", f"{lab} is not a class index in [0, {classes - 1}]")
        else:
            out.append(lab)
    return out


def check_sample(req: SampleRequest, max_images: int) -> None:
    """What /sample refuses before it looks at the model."""
    if req.num_images > max_images:
        raise ApiError(422, "num_images", f"{req.num_images} is over the maximum of {max_images}")


def sample_job(req: SampleRequest, model: ModelEntry, max_steps: int, random_base: int) -> Job:
    how = sampling(req, model, max_steps)
    out_seeds = seeds(req.seeds, req.num_images, random_base)
    return Job(
        kind="sample",
        model=model.name,
        format=req.format,
        seeds=out_seeds,
        labels=labels(req.labels, req.num_images, model, out_seeds, "sample"),
        **asdict(how),
    )


def check_purify(req: PurifyRequest, files: int, max_images: int) -> None:
    """What /purify refuses before it looks at the model (``files``: multipart image parts)."""
    if req.t_star is not None and req.strength is not None:
        raise ApiError(422, "strength", "give t_star or strength, not both")
    if not files and len(req.images) > max_images:
        raise ApiError(422, "images", f"{len(req.images)} is over the maximum of {max_images}")


def t_star(req: PurifyRequest, model: ModelEntry) -> float:
    """t_star, or the t* the model's worker registered for the named strength (default medium)."""
    return req.t_star if req.t_star is not None else model.strengths[req.strength or spec.DEFAULT_STRENGTH]


def purify_job(
    req: PurifyRequest,
    model: ModelEntry,
    how: Sampling,
    inputs: int,
    images: str,
    max_images: int,
    random_base: int,
) -> Job:
    """The purify job for ``inputs`` decoded images (``images``: their base64 .npy), with ``how``
    from ``sampling``. Without steps or times the model's default step count is lowered to what
    fits below t* for the samplers that take one step per step of the model's schedule (ddpm, ddim)."""
    outputs = inputs * req.draws
    if outputs > max_images:
        raise ApiError(
            422,
            "draws",
            f"{inputs} images x {req.draws} draws = {outputs} outputs, over the maximum of {max_images}",
        )
    out_seeds = seeds(req.seeds, outputs, random_base)
    t = t_star(req, model)
    t_min = 1 / model.timesteps
    if t < t_min:
        raise ApiError(422, "t_star", f"must be at least {t_min} (one step of the model's schedule)")
    steps = how.steps
    fit = spec.steps_that_fit(how.sampler, t, model.timesteps)
    if req.steps is None and req.times is None and fit is not None:  # the default must fit below t*
        steps = min(steps, fit)
    if req.times and req.times[0] >= t:
        raise ApiError(422, "times", f"must all be below t_star={t}, where purification starts")
    return Job(
        kind="purify",
        model=model.name,
        format=req.format,
        seeds=out_seeds,
        draws=req.draws,
        t_star=t,
        labels=labels(req.labels, inputs, model, out_seeds, "purify"),
        images=images,
        **{**asdict(how), "steps": steps},
    )
