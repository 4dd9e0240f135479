"""The web page's routes (`/`, `/static/NAME`) and GET /v1/argen/strategies: content types, caching
and security headers, the API key (the page loads without it, the API needs it), paths that try to
reach other files, and the strategies' caps as the server enforces them."""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

import httpx
import pytest
from server_helpers import running_server

from argen.server import page
from argen.server.limits import Limits
from argen.strategies import REGISTRY

KEY = "web-secret"
# Paths an attacker might try to read a file outside server/static/ with (sent byte for byte).
HOSTILE_PATHS = [
    "/static/../page.py",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/page.py",
    "/static/%2E%2E%2Fpage.py",
    "/static/..%2f..%2fpage.py",
    "/static/..%5cpage.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/app.js/../../page.py",
    "/static/app.js%00.py",
    "/static/",
    "/static/index.html",
    "/static/page.py",
    "/static/__init__.py",
    "/%2e%2e/page.py",
    "//etc/passwd",
]


@pytest.fixture(scope="module")
def server(looping):
    with running_server(looping, limits=Limits.parse(["max_draft=5", "n=3"])) as (url, _):
        yield url


@pytest.fixture(scope="module")
def keyed(looping):
    with running_server(looping, api_key=KEY) as (url, _):
        yield url


def _raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET `path` exactly as written (httpx would normalise `..` away before sending it)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/static/[^"]+)"', html)


def test_the_page_and_its_files_have_their_types_caching_and_csp(server):
    index = httpx.get(f"{server}/")
    assert index.status_code == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["cache-control"] == "no-cache"
    assert index.headers["content-security-policy"] == page.CSP
    assert "default-src 'none'" in page.CSP and "http" not in page.CSP  # nothing from elsewhere
    assert index.headers["x-content-type-options"] == "nosniff"
    urls = _assets(index.text)
    assert sorted(u.split("?")[0] for u in urls) == ["/static/app.css", "/static/app.js"]
    assert "http://" not in index.text and "https://" not in index.text
    total = len(index.content)
    for url in urls:
        versioned = httpx.get(server + url)
        kind = "text/javascript" if ".js" in url else "text/css"
        assert versioned.headers["content-type"] == f"{kind}; charset=utf-8"
        assert versioned.headers["cache-control"] == page.IMMUTABLE  # the URL changes with the content
        assert url.endswith("?v=" + versioned.headers["etag"].strip('"'))
        unversioned = httpx.get(server + url.split("?")[0])
        assert unversioned.headers["cache-control"] == "no-cache" and unversioned.content == versioned.content
        stale = httpx.get(server + url.split("?")[0] + "?v=000000000000")
        assert stale.headers["cache-control"] == "no-cache"
        again = httpx.get(server + url, headers={"If-None-Match": versioned.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        total += len(versioned.content)
        assert b"http://" not in versioned.content and b"https://" not in versioned.content  # no request leaves
    assert total < 40_000, f"the page's files are {total} bytes; keep them small"


def test_the_page_is_not_in_the_api_description(server):
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    assert "/v1/argen/strategies" in paths


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_no_path_reaches_another_file(server, path):
    """A path built to escape server/static/ gets a 404 (or 400 from the HTTP parser), never a file."""
    status, body = _raw_get(server, path)
    assert status in (400, 404), (path, status)
    assert b"import" not in body and b"root:" not in body and b"<!doctype" not in body


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_with_a_key_only_the_page_s_exact_paths_are_open(keyed, path):
    """Bug guarded: an open *prefix* (/static/) in guards.py would let `/static/../v1/...` tricks or
    unknown files past the key check; every path but the page's own files needs the key."""
    status, body = _raw_get(keyed, path)
    assert status in (400, 401), (path, status)
    assert b"import" not in body and b"root:" not in body


def test_with_a_key_the_page_loads_and_the_api_needs_the_key(keyed):
    index = httpx.get(f"{keyed}/")
    assert index.status_code == 200
    for url in _assets(index.text):
        assert httpx.get(keyed + url).status_code == 200
    assert httpx.get(f"{keyed}/v1/argen/strategies").status_code == 401
    assert httpx.get(f"{keyed}/static/../v1/models").status_code == 401  # httpx sends /v1/models
    assert _raw_get(keyed, "/static/../v1/models")[0] == 401
    ok = httpx.get(f"{keyed}/v1/argen/strategies", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_a_symlink_in_the_folder_is_not_served(tmp_path):
    (tmp_path / "index.html").write_text('<script src="{{app.js}}"></script>')
    (tmp_path / "app.js").write_text("1;")
    secret = tmp_path.parent / "secret.js"
    secret.write_text("secret")
    (tmp_path / "evil.js").symlink_to(secret)
    (tmp_path / "page.py").write_text("import os")
    index, assets = page.load(tmp_path)
    assert sorted(assets) == ["app.js"]
    assert index.body == f'<script src="/static/app.js?v={assets["app.js"].version}"></script>'.encode()


def test_strategies_describe_what_the_server_allows(server):
    """Every strategy and press with its defaults; the caps are this server's (--limit max_draft=5,
    n=3), and a request at a cap is accepted while one over it is refused."""
    info = httpx.get(f"{server}/v1/argen/strategies").json()
    assert [s["name"] for s in info["strategies"]] == list(REGISTRY)
    by_name = {s["name"]: s for s in info["strategies"]}
    assert by_name["plain"]["exact"] and not by_name["beam"]["exact"]
    lookup = {o["name"]: o for o in by_name["prompt-lookup"]["options"]}
    assert lookup["max_draft"] == {
        "name": "max_draft",
        "type": "integer",
        "default": 10,
        "maximum": 5,
        "max_length": None,
        "choices": None,
    }
    assert lookup["max_ngram"]["maximum"] == 8 and lookup["adaptive"]["type"] == "boolean"
    assert lookup["min_ngram"]["maximum"] is None  # not a capped option
    draft = {o["name"]: o for o in by_name["draft-model"]["options"]}
    assert draft["draft"]["type"] == "model" and draft["draft"]["choices"] == ["tiny-looping"]
    presses = {p["name"]: {o["name"]: o for o in p["options"]} for p in info["presses"]}
    assert presses["snapkv"]["window_size"]["maximum"] == 128 and presses["snapkv"]["budget"]["default"] == 0.5
    assert info["max_n"] == 3 and info["model"] == "tiny-looping" and "draft" in info["origins"]
    body = {"model": "tiny-looping", "prompt": "hi", "max_tokens": 4}
    at_cap = {"name": "prompt-lookup", "max_draft": lookup["max_draft"]["maximum"]}
    assert httpx.post(f"{server}/v1/completions", json=body | {"strategy": at_cap}).status_code == 200
    over = httpx.post(f"{server}/v1/completions", json=body | {"strategy": at_cap | {"max_draft": 6}})
    assert over.status_code == 400 and "at most 5" in over.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/completions", json=body | {"n": 4}).status_code == 400


def test_default_caps_are_reported(looping):
    with running_server(looping) as (url, _):
        info = httpx.get(f"{url}/v1/argen/strategies").json()
    lookup = {o["name"]: o for o in info["strategies"][1]["options"]}
    assert lookup["max_draft"]["maximum"] == 16 and info["max_n"] == 16
