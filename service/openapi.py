"""What the OpenAPI document says beyond the route signatures: each status a route may answer, the
Idempotency-Key header, the hand-parsed request bodies (JSON and multipart) and bearer auth."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from service.middleware import PUBLIC_PATHS
from service.schemas import ErrorBody, JobAccepted, model_schema

Responses = dict[int | str, dict[str, Any]]

ERROR_RESPONSES: Responses = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)}
# What a job submission may answer besides its result: each status with what it means.
SUBMIT_RESPONSES: Responses = {
    **ERROR_RESPONSES,
    202: {
        "model": JobAccepted,
        "description": "Accepted (async, or found by its Idempotency-Key): poll the Location",
        "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
        "links": {
            "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
            "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/id"}},
        },
    },
    408: {"model": ErrorBody, "description": "The body did not arrive within ROBUSTDIFF_BODY_TIMEOUT_S"},
    409: {"model": ErrorBody, "description": "Idempotency-Key reused for another request, or job cancelled"},
    415: {"model": ErrorBody, "description": "Content-Type or Content-Encoding not supported"},
    429: {
        "model": ErrorBody,
        "description": "The model's queue is full; retry after Retry-After seconds (spread per client)",
        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
    },
    500: {"model": ErrorBody, "description": "The job failed in the worker"},
    503: {
        "model": ErrorBody,
        "description": "Redis unreachable or busy, or no model registered; when the job was already "
        "accepted the body has its id and Location names it: poll it, do not resubmit",
        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
    },
    504: {
        "model": ErrorBody,
        "description": "Not finished within ROBUSTDIFF_REQUEST_TIMEOUT_S; poll the Location",
        "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
    },
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retry safely: a request repeated with the same key (and body) answers the job the "
    "first one created instead of running it again, for as long as that job is kept.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra of a route that parses its JSON body by hand (to bound its size and time)."""
    return {
        "parameters": [IDEMPOTENCY_HEADER],
        "requestBody": {"required": True, "content": {"application/json": {"schema": model_schema(schema)}}},
    }


def json_or_multipart_body(schema: type[BaseModel], files_field: str) -> dict[str, Any]:
    """As ``json_body``, plus multipart/form-data with the images as binary ``files`` parts in place
    of ``files_field``."""
    extra = json_body(schema)
    properties = {k: v for k, v in model_schema(schema)["properties"].items() if k != files_field}
    extra["requestBody"]["content"]["multipart/form-data"] = {
        "schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
                **properties,
            },
        }
    }
    return extra


def describe_security(app: FastAPI, api_keys: list[str]) -> None:
    """Bearer auth in the OpenAPI document: required on every route but the public ones when API keys
    are set, optional otherwise (the same routes answer 401 only when keys are set)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "ROBUSTDIFF_API_KEYS"}
        }
        security: list[dict[str, list[str]]] = [{"bearer": []}] if api_keys else [{}, {"bearer": []}]
        # By reference: ErrorBody's own JSON schema names ErrorItem as "#/$defs/ErrorItem", which does
        # not resolve inside an OpenAPI document (schemathesis skipped the 401 answers for it).
        error_body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema["components"].setdefault("schemas", {})
        for name, sub in error_body.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault("ErrorBody", error_body)
        for path, item in schema["paths"].items():
            if path in PUBLIC_PATHS:
                continue
            for operation in item.values():
                operation["security"] = security
                operation.setdefault("responses", {}).setdefault(
                    "401",
                    {
                        "description": "Missing or wrong bearer token",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                        },
                    },
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
