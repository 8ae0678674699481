"""One error envelope for every failure the service answers:

.. code-block:: json

    {"error": {"code": "insufficient_scope", "message": "...", "details": {...}},
     "request_id": "3f9c..."}

``code`` is a stable snake_case identifier a client can switch on, ``message`` a sentence
saying what was wrong and what to do, ``details`` structured extras (per-image reasons,
validation errors) or ``null``. The same ``request_id`` is in the ``X-Request-ID`` header
of every response and in the server's log line for the request. No response ever carries
a traceback: unexpected exceptions are logged with their request id and answered with a
500 ``internal_error`` that says only that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from facemetric.gallery import (
    AlreadyExistsError,
    ConcurrentChangeError,
    ContractMismatchError,
    GalleryBusyError,
    GalleryError,
    InvalidInputError,
    NotFoundError,
)

logger = logging.getLogger("facemetric.service")

REQUEST_ID_KEY = "facemetric.request_id"
"""Where the request id lives in the ASGI scope."""


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, stable ``code``, a ``message`` for
    people, optional ``details`` and extra response ``headers``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})


class RequestTooLarge(StarletteHTTPException):
    """Raised while reading a chunked body that passes the byte limit (an
    ``HTTPException``, so framework body parsing lets it through unchanged)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit:,} bytes; "
                              "send fewer or smaller images")


def envelope(code: str, message: str, details: Any, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details},
            "request_id": request_id}


def request_id_of(scope: Mapping[str, Any]) -> str:
    return str(scope.get(REQUEST_ID_KEY, ""))


def error_response(scope: Mapping[str, Any], status: int, code: str, message: str,
                   details: Any = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    rid = request_id_of(scope)
    return JSONResponse(envelope(code, message, details, rid), status_code=status,
                        headers={**(headers or {}), "X-Request-ID": rid})


def error_body(status: int, code: str, message: str, request_id: str) -> bytes:
    """The envelope as bytes, for answers sent below the framework (middleware)."""
    return json.dumps(envelope(code, message, None, request_id)).encode()


_HTTP_CODES = {
    400: "bad_request",
    401: "missing_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}

_HTTP_MESSAGES = {
    404: "no such endpoint; see /docs for the API",
    405: "this endpoint does not take that method; see /docs for the API",
}


def gallery_error(err: GalleryError) -> ApiError:
    """The HTTP answer to a gallery error (its message already says what to do)."""
    if isinstance(err, NotFoundError):
        return ApiError(404, "not_found", str(err))
    if isinstance(err, AlreadyExistsError):
        return ApiError(409, "already_exists", str(err))
    if isinstance(err, ContractMismatchError):
        return ApiError(409, "contract_mismatch", str(err))
    if isinstance(err, ConcurrentChangeError):
        return ApiError(409, "concurrent_change", str(err))
    if isinstance(err, InvalidInputError):
        return ApiError(422, "invalid_input", str(err))
    if isinstance(err, GalleryBusyError):
        return ApiError(503, "gallery_busy", str(err), headers={"Retry-After": "1"})
    return ApiError(500, "gallery_error", "the gallery failed; the server log has the details "
                    "under this request id")


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (it may be megabytes of base64)."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        out.append({"field": ".".join(loc), "message": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the framework or the service raises into the envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("request %s: %s: %s", request_id_of(request.scope), exc.code,
                         exc.__cause__ or exc.message)
        return error_response(request.scope, exc.status, exc.code, exc.message, exc.details,
                              exc.headers)

    @app.exception_handler(GalleryError)
    async def _gallery_error(request: Request, exc: GalleryError) -> JSONResponse:
        api = gallery_error(exc)
        if api.status >= 500:
            logger.error("request %s: gallery error: %s", request_id_of(request.scope), exc)
        return error_response(request.scope, api.status, api.code, api.message, None,
                              api.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        if any(d["type"] == "json_invalid" for d in details):
            return error_response(request.scope, 400, "invalid_json",
                                  "the body is not valid JSON", details)
        fields = ", ".join(d["field"] or "body" for d in details[:5])
        return error_response(request.scope, 422, "invalid_request",
                              f"the request does not match the API ({fields}); see details "
                              f"and /docs", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = _HTTP_CODES.get(status, "error" if status < 500 else "internal_error")
        message = _HTTP_MESSAGES.get(status, str(exc.detail))
        return error_response(request.scope, status, code, message, None,
                              dict(exc.headers or {}))


__all__ = [
    "REQUEST_ID_KEY",
    "ApiError",
    "RequestTooLarge",
    "envelope",
    "error_body",
    "error_response",
    "gallery_error",
    "install_error_handlers",
    "request_id_of",
    "validation_details",
]
