"""The guard every HTTP request passes first (a pure ASGI middleware, below the framework's
routing and above its error handling):

1. gives the request an id — the client's ``X-Request-ID`` when it is a short token of
   ``[A-Za-z0-9._:-]``, else a new random one — echoed in the ``X-Request-ID`` header of
   every response;
2. refuses (400 ``key_in_url``) a request whose URL carries an API key — a query parameter
   named like a credential (``api_key``, ``key``, ``token``, ...) or anything shaped like a
   facemetric key — *without* logging the URL: URLs end up in proxy logs, browser histories
   and referrers, so keys travel only in headers;
3. refuses (413 ``request_too_large``) a body whose ``Content-Length`` is above the limit
   before reading any of it, and a chunked body as soon as it passes the limit, so an
   oversized upload never sits in memory;
4. answers any exception that escapes the app with a 500 ``internal_error`` envelope (the
   traceback goes to the log, under the request id, never to the client);
5. adds ``Server-Timing`` (milliseconds of ``admit``, ``engine``, ``queue``, ``detect``,
   ``embed``, ``search`` — see :meth:`ServiceEngine.run_images` — and ``total``) and writes
   one access-log line per request: method, path (never the query string), status,
   milliseconds, request id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import MutableHeaders

from facemetric.service.errors import REQUEST_ID_KEY, RequestTooLarge, error_body
from facemetric.service.keys import looks_like_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TIMING_KEY = "facemetric.timings"
"""Where a handler leaves its phase timings (seconds) for the ``Server-Timing`` header."""

CREDENTIAL_PARAMS = frozenset({
    "api_key", "apikey", "api-key", "key", "x-api-key", "x_api_key", "access_token",
    "token", "auth", "authorization", "bearer", "secret", "password",
})
"""Query parameter names refused whatever their value (case-insensitive)."""

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("facemetric.service.access")
logger = logging.getLogger("facemetric.service")


def _key_in_url(scope: Scope) -> bool:
    raw_query = scope.get("query_string", b"").decode("latin-1")
    if looks_like_key(scope.get("path", "")) or looks_like_key(raw_query):
        return True
    try:
        names = [name for name, _ in parse_qsl(raw_query, keep_blank_values=True)]
    except ValueError:
        return False
    return any(name.strip().lower() in CREDENTIAL_PARAMS for name in names)


class GuardMiddleware:
    """See the module docstring.

    Args:
        app: the ASGI app behind the guard.
        max_request_bytes: the body limit.
    """

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid
        state = {"status": 0, "started": False}
        redact = False

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = int(message["status"])
                out = MutableHeaders(scope=message)
                out["X-Request-ID"] = rid
                timings = dict(scope.get(TIMING_KEY) or {})
                timings["total"] = time.perf_counter() - start
                out["Server-Timing"] = ", ".join(
                    f"{name};dur={1000 * sec:.2f}" for name, sec in timings.items())
            await send(message)

        async def answer(status: int, code: str, message: str) -> None:
            body = error_body(status, code, message, rid)
            await guarded_send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        try:
            if _key_in_url(scope):
                redact = True
                await answer(400, "key_in_url",
                             "API keys must not be sent in the URL (URLs are logged and "
                             "cached); send it in the 'Authorization: Bearer' or 'X-API-Key' "
                             "header, and revoke this key: it may have leaked")
                return
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    await answer(400, "bad_request", "the Content-Length header is not a number")
                    return
                if int(length) > self.max_request_bytes:
                    await answer(413, "request_too_large",
                                 f"the request body ({int(length):,} bytes) is larger than the "
                                 f"limit of {self.max_request_bytes:,} bytes; send fewer or "
                                 f"smaller images")
                    return
            received = 0

            async def counting_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_request_bytes:
                        raise RequestTooLarge(self.max_request_bytes)
                return message

            try:
                await self.app(scope, counting_receive, guarded_send)
            except Exception:
                logger.exception("request %s (%s %s) failed", rid, scope.get("method"),
                                 scope.get("path"))
                if not state["started"]:
                    await answer(500, "internal_error",
                                 f"the server failed on this request; report request id {rid}")
        finally:
            path = "<redacted: key in URL>" if redact else scope.get("path", "")
            access_log.info("%s %s %s %.1fms id=%s", scope.get("method"), path,
                            state["status"] or "-", 1000 * (time.perf_counter() - start), rid)


__all__ = ["CREDENTIAL_PARAMS", "TIMING_KEY", "GuardMiddleware"]
