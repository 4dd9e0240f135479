"""The web page's files (server/static/: index.html, app.js, app.css), read once from the package.

The page is served from this fixed table, never by a path a client sends: a name is either one of
these files or a 404, so no `..`, encoded or absolute path, or symlink can reach another file.
index.html names each asset with its content hash (`/static/app.js?v=HASH`), so an asset fetched at
its current hash can be cached for good while index.html itself is revalidated every time."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# By extension, spelled out: `mimetypes` reads the machine's own tables (a .js served as text/plain
# on some systems, which the page's nosniff header would then refuse to run).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only this page's own files, scripts and styles; its API calls go to this server (connect-src).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
NO_CACHE = "no-cache"  # may be stored, but revalidated (ETag) before each use
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class File:
    body: bytes
    content_type: str
    version: str  # the first 12 hex digits of the body's SHA-256: the ETag and the ?v= of its URL

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


def _file(body: bytes, suffix: str) -> File:
    return File(body, CONTENT_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])


def _served(entry) -> bool:
    """A plain file of a served type (a symlink is not served, whatever it points to)."""
    suffix = "." + entry.name.rsplit(".", 1)[-1]
    link = isinstance(entry, Path) and entry.is_symlink()
    return entry.is_file() and not link and entry.name != "index.html" and suffix in CONTENT_TYPES


def load(folder) -> tuple[File, dict[str, File]]:
    """index.html (its asset names replaced by their versioned URLs) and the assets, by name."""
    assets = {
        entry.name: _file(entry.read_bytes(), "." + entry.name.rsplit(".", 1)[-1])
        for entry in folder.iterdir()
        if _served(entry)
    }
    html = (folder / "index.html").read_text(encoding="utf-8")
    # {{app.js}} -> /static/app.js?v=HASH: a new version of a file is a new URL
    html = re.sub(r"\{\{([\w.-]+)\}\}", lambda m: f"/static/{m[1]}?v={assets[m[1]].version}", html)
    return _file(html.encode(), ".html"), assets


INDEX, ASSETS = load(resources.files("argen.server") / "static")
# The paths that need no API key (server/guards.py): the page and its files, as served.
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in ASSETS)})
