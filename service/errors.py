"""How the API refuses: every 4xx/5xx answer is an ``ErrorBody`` naming each offending field.

``ApiError`` is what request handling raises; ``install_handlers`` maps it, pydantic's validation
errors, Starlette's HTTP errors, a busy or unreachable Redis and anything unexpected to that body,
and counts the failures the API sees.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from service import images as imgs
from service import metrics as m
from service.queue import REDIS_ERRORS, PoolBusy

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # counted in robustdiff_requests_total{status="499"}
_CODES = {
    401: "unauthorized",
    404: "not_found",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    422: "invalid",
    429: "queue_full",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """A request the API refuses: status, offending field, and why."""

    def __init__(
        self, status: int, field: str, reason: str, *, code: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason
        self.code = code or _CODES.get(status, "error")
        self.headers = headers


class ClientGone(Exception):
    """The client closed the connection before its request was read: its doing, not a server error."""


class InvalidBody(Exception):
    """A body that failed its schema; answered 422 with one reason per field."""

    def __init__(self, err: ValidationError) -> None:
        super().__init__(str(err))
        self.err = err


def error_response(
    status: int, code: str, errors: list[tuple[str, str]], headers: dict[str, str] | None = None
) -> JSONResponse:
    items = [{"field": f, "reason": r} for f, r in errors]
    detail = "; ".join(f"{f}: {r}" for f, r in errors)
    return JSONResponse(
        {"error": code, "detail": detail, "errors": items}, status_code=status, headers=headers
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _is_union_tag(part: int | str) -> bool:
    """Pydantic puts the tried union member ('list[constrained-int]', 'str'...) in an error's loc."""
    return isinstance(part, str) and (
        any(c in part for c in "[-") or part in ("int", "str", "float", "bool", "list", "dict")
    )


def _is_type_mismatch(error_type: str) -> bool:
    return error_type.endswith("_type") or error_type in ("none_required", "is_instance_of")


def validation_errors(err: ValidationError | RequestValidationError) -> list[tuple[str, str]]:
    """One reason per field. A value tried against each member of a union (``seeds``: a list or one
    seed) fails once per member; keep the member that says what is wrong with the value (``seeds[0]``
    is below 0, or not an integer) over those that only say the whole value is of another type."""
    errors = []
    for e in err.errors():
        loc = tuple(x for x in e.get("loc", ()) if not _is_union_tag(x))
        reason = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            reason = f"malformed JSON ({e.get('ctx', {}).get('error', reason)})"
        errors.append((loc, str(e.get("type", "")), reason))
    informative = {loc[:1] for loc, kind, _ in errors if not _is_type_mismatch(kind)}
    deeper = {loc[:i] for loc, _, _ in errors for i in range(1, len(loc))}
    out: dict[str, str] = {}
    for loc, kind, reason in errors:
        if _is_type_mismatch(kind) and (loc in deeper or (len(loc) == 1 and loc in informative)):
            continue
        out.setdefault(_loc(loc), reason)
    return list(out.items()) or [("body", "invalid")]


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of this path answers."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    Handler = Callable[[Request, Any], Awaitable[Response]]

    def handle(exc_type: type[Exception]) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            app.add_exception_handler(exc_type, fn)
            return fn

        return deco

    @handle(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        if exc.status in (413, 415, 422):
            m.API_FAILURES.labels(reason="validation").inc()
        return error_response(exc.status, exc.code, [(exc.field, exc.reason)], exc.headers)

    @handle(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        # Nobody reads this answer; 499 (nginx's "client closed request") keeps it out of the 5xx alert.
        log.info("client disconnected during %s", exc)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @handle(imgs.ImageError)
    async def image_error(_: Request, exc: imgs.ImageError) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", [(exc.field, exc.reason)])

    @handle(InvalidBody)
    async def invalid(_: Request, exc: InvalidBody) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", validation_errors(exc.err))

    @handle(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", validation_errors(exc))

    @handle(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        field = "path" if exc.status_code in (404, 405) else "request"
        reason = f"{request.method} {request.url.path}: {exc.detail}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route's methods only (GET, not DELETE)
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return error_response(exc.status_code, "http_error", [(field, reason)], headers)

    @handle(PoolBusy)
    async def pool_busy(_: Request, exc: PoolBusy) -> Response:
        m.API_FAILURES.labels(reason="busy").inc()
        log.warning("busy: %s", exc)
        return error_response(
            503,
            "busy",
            [("server", f"every connection to the job queue is in use ({exc}); retry shortly")],
            headers={"Retry-After": str(1 + secrets.randbelow(5))},
        )

    for redis_exc in REDIS_ERRORS:

        @handle(redis_exc)
        async def redis_down(_: Request, exc: Exception) -> Response:
            m.API_FAILURES.labels(reason="redis_unavailable").inc()
            log.warning("redis unavailable: %s", exc)
            return error_response(
                503,
                "unavailable",
                [("redis", "the job queue is unreachable; retry shortly")],
                headers={"Retry-After": "2"},
            )

    @handle(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal", [("server", "unexpected error; it has been logged")])
