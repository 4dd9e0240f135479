"""ASGI middleware that turns a request away before any of it is parsed: a missing or wrong API key
(401) and a body over the size limit (413). Both answer in OpenAI's error shape.

Order (outermost first): allowed Host names (Starlette's TrustedHostMiddleware, 400), CORS (with
`--allowed-origins`: Starlette's CORSMiddleware answers a browser's preflight, which carries no key),
the API key, the body size, then the app. So a client without the key never has its body read.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from argen.server.errors import APIError
from argen.server.page import PAGE_PATHS

# Exact paths (never prefixes): the web page's are its fixed files (server/page.py), so no other path
# under /static/ is open.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}) | PAGE_PATHS
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024

Rejected = Callable[[str, int], None]  # (path, status): counts the rejection


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class APIKey:
    """Every route but /health, the API's own description (/docs, /openapi.json) and the web page's
    files (`/`, `/static/NAME`: what anyone who can reach the port could read in the wheel) needs
    `Authorization: Bearer KEY`; the key is compared in constant time."""

    def __init__(self, app: ASGIApp, key: str, rejected: Rejected) -> None:
        self.app, self.key, self.rejected = app, key.encode(), rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, given = (_header(scope, b"authorization") or b"").partition(b" ")
        bearer = scheme.lower() == b"bearer" and given.strip()
        if bearer and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        self.rejected(scope["path"], 401)
        message = (
            "Incorrect API key provided"
            if bearer
            else "You didn't provide an API key; send it as the header 'Authorization: Bearer KEY'"
        )
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class BodyLimit:
    """Refuses a request body larger than `max_bytes` with 413, by its Content-Length before reading
    anything, or (chunked bodies) as soon as it is read past the limit. The body is read here, up
    to the limit, and handed on in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int, rejected: Rejected) -> None:
        self.app, self.max_bytes, self.rejected = app, max_bytes, rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.rejected(scope["path"], 413)
        error = APIError(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes; "
            "send less (a prompt that long would not fit the context anyway)",
            code="body_too_large",
            headers={"Connection": "close"},
        )
        await error.response()(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that returns `messages` first, then whatever the client sends (a disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
