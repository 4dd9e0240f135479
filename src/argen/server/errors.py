"""Errors as the OpenAI API shapes them: `{"error": {"message", "type", "param", "code"}}`, with
a message that says what to fix."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from argen.server import protocol as p

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}

# The error statuses as the OpenAPI description documents them (each route lists those it answers).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": p.ErrorResponse, "description": text}
    for status, text in [
        (400, "a parameter is invalid or unsupported (the message says which)"),
        (401, "the API key is missing or wrong (only when the server has one)"),
        (404, "the model is not served here"),
        (413, "the body is larger than the server's limit"),
        (422, "the body does not match the schema"),
        (429, "the queue is full; retry after Retry-After seconds"),
        (503, "the server is shutting down"),
    ]
}


class ErrorJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message that quotes a client's string stays valid even if that
    string holds a lone surrogate (which UTF-8 cannot encode)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return ErrorJSON(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending parameter."""
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r} (see the request schema at /docs)")
        elif err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif err.get("type") == "missing":
            parts.append(f"{where} is required")
        else:
            parts.append(f"{where or 'body'}: {err.get('msg')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, param
