"""Exception handlers: every error, however it arises, answered in OpenAI's error shape (errors.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from argen.server.errors import APIError, validation_message
from argen.server.state import endpoint_of

log = logging.getLogger("argen.server")


async def api_error(request: HTTPRequest, exc: APIError):
    return exc.response()


async def invalid_body(request: HTTPRequest, exc: RequestValidationError):
    message, param = validation_message(jsonable_encoder(exc.errors()))
    request.app.state.served.metrics.requests.labels(endpoint_of(request.url.path), "rejected_422").inc()
    return APIError(422, message, param=param, code="invalid_body").response()


async def http_error(request: HTTPRequest, exc: StarletteHTTPException):
    message = {
        404: f"no route {request.method} {request.url.path}; see /docs for the API",
        405: f"{request.method} is not allowed on {request.url.path}; see /docs",
    }.get(exc.status_code, str(exc.detail))
    return APIError(
        exc.status_code,
        message,
        code="not_found" if exc.status_code == 404 else None,
        headers=getattr(exc, "headers", None),
    ).response()


async def internal_error(request: HTTPRequest, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return APIError(500, f"internal error: {exc!r}", code="internal_error").response()


# Each handler takes the request and an exception of its key's class.
HANDLERS: dict[type[Exception], Callable[..., Awaitable[Response]]] = {
    APIError: api_error,
    RequestValidationError: invalid_body,
    StarletteHTTPException: http_error,
    Exception: internal_error,
}
