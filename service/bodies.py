"""Reading request bodies: bounded in size and time, JSON (strict) or multipart for /purify,
validated against their schema; and the purify inputs decoded to the model's image shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service import images as imgs
from service.errors import ApiError, ClientGone, InvalidBody
from service.schemas import ModelEntry, PurifyRequest
from service.settings import Settings

MAX_FORM_FIELDS = 64  # non-file multipart fields: far more than PurifyRequest has
Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refused (413) over MAX_BODY_BYTES and (408) after BODY_TIMEOUT_S."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", f"{declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    timeout = settings.body_timeout_s
    try:
        async with asyncio.timeout(timeout):  # a slow or lying client must not hold a connection
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body", f"more than the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body",
            f"{size} bytes of {declared or 'an unknown length'} arrived in {timeout} s "
            "(ROBUSTDIFF_BODY_TIMEOUT_S)",
            code="timeout",
            headers={"Connection": "close"},  # the rest of the body may still come: never reuse it
        ) from None
    except ClientDisconnect:
        raise ClientGone(f"{request.method} {request.url.path} after {size} bytes of the body") from None
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what was already read
    return body


async def parse(request: Request, schema: type[Body], settings: Settings) -> tuple[Body, list[bytes]]:
    """The validated body (JSON, or multipart for /purify) and any uploaded files."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(415, "content-encoding", f"{encoding!r} is not supported; send the body as is")
    body = await read_body(request, settings)
    ctype = request.headers.get("content-type", "").lower()  # media types are case-insensitive
    if ctype.startswith("multipart/form-data") and schema is PurifyRequest:
        return await _parse_form(request, schema, settings)
    if ctype and not ctype.startswith("application/json"):
        accepted = (
            "application/json or multipart/form-data" if schema is PurifyRequest else "application/json"
        )
        raise ApiError(415, "content-type", f"{ctype.split(';')[0]!r} is not {accepted}", code="unsupported")
    try:  # strict: JSON has types, so "4" is not a number and "yes" not a boolean
        return schema.model_validate_json(body or b"null", strict=True), []
    except ValidationError as err:
        raise InvalidBody(err) from None


async def _parse_form(request: Request, schema: type[Body], settings: Settings) -> tuple[Body, list[bytes]]:
    """multipart/form-data: image files named ``files``, every other field a JSON value or a string."""
    data: dict[str, Any] = {}
    files: list[bytes] = []
    try:
        form = await request.form(max_files=settings.max_images, max_fields=MAX_FORM_FIELDS)
    except Exception as err:  # python-multipart / starlette raise several types for bad bodies
        raise multipart_error(err, settings.max_images) from None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("files", "images"):
                raise ApiError(422, key, "file parts must be named 'files'")
            files.append(await value.read())
        elif key in data:
            raise ApiError(422, key, "given more than once")
        else:
            try:
                data[key] = json.loads(value)
            except ValueError:
                data[key] = value
    if not files:
        raise ApiError(422, "files", "at least one image file is required")
    if "images" in data:
        raise ApiError(422, "images", "send images as files or as base64 JSON, not both")
    data["images"] = ["multipart"]  # placeholder: the files are decoded instead
    try:
        return schema.model_validate(data), files
    except ValidationError as err:
        raise InvalidBody(err) from None


def multipart_error(err: Exception, max_files: int) -> ApiError:
    """Starlette's parser stops at its limits with a 400 ("Too many files. Maximum number of files
    is 64."); say which field is over which limit, as for every other refusal."""
    detail = str(getattr(err, "detail", "") or err)
    if detail.startswith("Too many files"):
        return ApiError(
            422, "files", f"more than the maximum of {max_files} files (ROBUSTDIFF_MAX_IMAGES) in one request"
        )
    if detail.startswith("Too many fields"):
        return ApiError(422, "body", f"more than the maximum of {MAX_FORM_FIELDS} form fields")
    return ApiError(422, "body", f"malformed multipart body ({detail})")


def decode_inputs(
    req: PurifyRequest, files: list[bytes], model: ModelEntry, max_images: int
) -> list[np.ndarray]:
    """Each input image (PNG, JPEG or .npy; a .npy may hold several) as float32 [C, H, W] in
    [-1, 1] of the model's shape (resized only when ``req.resize``). CPU work: run it in a thread."""
    shape = tuple(model.image_shape)
    raws = (
        [(f"files[{i}]", data) for i, data in enumerate(files)]
        if files
        else [(f"images[{i}]", imgs.b64decode(text, f"images[{i}]")) for i, text in enumerate(req.images)]
    )
    out: list[np.ndarray] = []
    for field, data in raws:
        decoded = imgs.decode(data, field, req.npy_range)
        if len(out) + len(decoded) > max_images:
            raise ApiError(422, "images", f"more than the maximum of {max_images} images")
        out += [imgs.fit(d, shape, field, req.resize) for d in decoded]  # type: ignore[arg-type]
    return out
