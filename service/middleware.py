"""The API's ASGI middleware: bearer authentication and the request count and duration metrics."""

from __future__ import annotations

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics as m
from service.errors import error_response

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Answered without a bearer token even when ROBUSTDIFF_API_KEYS is set (probes and scrapes)."""


class Observe:
    """Pure ASGI middleware (no body buffering): bearer auth plus the request metrics, labelled by
    route template so job ids never become series."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if self.keys and scope["path"] not in PUBLIC_PATHS and not self._authorised(scope):
                status = 401
                resp = error_response(
                    401,
                    "unauthorized",
                    [("Authorization", "a valid 'Bearer <api key>' header is required")],
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unauthorized" if status == 401 else "unmatched")
            m.REQUESTS.labels(route=label, status=str(status)).inc()
            m.REQUEST_DURATION.labels(route=label).observe(time.perf_counter() - start)

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip(), key) for key in self.keys)
