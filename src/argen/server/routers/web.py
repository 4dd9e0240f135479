"""The web page (an argen extension): `/` and its files under `/static/` (server/page.py), which
load without an API key; every API call the page then makes needs the key like any other client's."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from argen.server.errors import APIError
from argen.server.page import ASSETS, IMMUTABLE, INDEX, NO_CACHE, SECURITY_HEADERS, File

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: HTTPRequest) -> Response:
    return _send(request, INDEX, NO_CACHE)


@router.get("/static/{name}")
async def asset(name: str, request: HTTPRequest) -> Response:
    file = ASSETS.get(name)
    if file is None:
        raise APIError(404, "no such file; the page is at /", code="not_found")
    # Cached for good only at the URL index.html names (its content hash); any other ?v= revalidates.
    cache = IMMUTABLE if request.query_params.get("v") == file.version else NO_CACHE
    return _send(request, file, cache)


def _send(request: HTTPRequest, file: File, cache: str) -> Response:
    headers = {"Cache-Control": cache, "ETag": file.etag, **SECURITY_HEADERS}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.content_type, headers=headers)
