"""Serving GraphiQL's files from `dist/` (written at build time by vendor.py): only the
files the manifest lists, under versioned URLs, so they are cached for good."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

__all__ = ["Assets", "load_assets", "serve_asset", "ASSET_PREFIX"]

ASSET_PREFIX = "/graphiql/assets/"
DIST = Path(__file__).resolve().parent / "dist"
# The URL names the package version, whose bytes the lock pins: it never changes (RFC 8246).
IMMUTABLE = "public, max-age=31536000, immutable"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Assets:
    directory: Path
    files: dict[str, dict[str, str]]  # "graphiql-3.8.3/graphiql.min.js" -> {"sha256", "integrity"}

    def url(self, path: str) -> str:
        return ASSET_PREFIX + path

    def find(self, suffix: str) -> str | None:
        """The served path ending in `/suffix`, e.g. "graphiql.min.js"."""
        return next((path for path in self.files if path.endswith("/" + suffix)), None)


def load_assets() -> Assets | None:
    """What was installed, or None when the files are missing or incomplete."""
    return _load(DIST)


@functools.cache
def _load(directory: Path) -> Assets | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not files or not all((directory / path).is_file() for path in files):
        return None
    return Assets(directory, files)


def _accepts_gzip(request: Request) -> bool:
    for part in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() == "gzip" and params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            return True
    return False


async def serve_asset(request: Request) -> Response:
    assets = load_assets()
    path = request.path_params["path"]
    meta = assets.files.get(path) if assets else None
    if assets is None or meta is None:
        return PlainTextResponse("not found", status_code=404)
    file = assets.directory / path
    gzipped = file.with_name(file.name + ".gz")
    use_gzip = _accepts_gzip(request) and gzipped.is_file()
    # One strong validator per representation (RFC 9110 §8.8.3): the gzip copy has its own.
    tag = meta["sha256"][:32] + ("-gz" if use_gzip else "")
    headers = {"cache-control": IMMUTABLE, "etag": f'"{tag}"', "vary": "accept-encoding",
               "x-content-type-options": "nosniff"}
    if f'"{tag}"' in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media_type = MEDIA_TYPES.get(Path(path).suffix, "text/plain; charset=utf-8")
    if use_gzip:
        # Compressed once at build time (vendor.py), not on every request.
        return FileResponse(gzipped, media_type=media_type, headers={**headers, "content-encoding": "gzip"})
    return FileResponse(file, media_type=media_type, headers=headers)
