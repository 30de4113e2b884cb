"""GraphiQL served by the gateway itself (README, "GraphiQL"): the page, its files with
their integrity and caching, the page when the files are missing, and the build-time fetch
from an npm registry (a local one here) that refuses a tarball not matching the lock."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import gateway.graphiql.assets as assets_module
from bookvault import create_app
from gateway import Settings
from gateway.graphiql.vendor import VendorError, fetch, is_current, registry_url
from shop import on_a_real_port

HTML = {"accept": "text/html,application/xhtml+xml"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A gateway that calls no service (no feeds, no limits): these tests are about its own pages."""
    settings = Settings.from_env({"BOOKVAULT_FOLLOW_FEEDS": "0"})
    app = create_app(Settings(services=settings.services, follow_feeds=False, learn_limits=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
            yield c


def _references(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<(?:script|link)[^>]*?(?:src|href)="([^"]+)"[^>]*?integrity="([^"]+)"', page)


async def test_a_browser_on_graphql_gets_graphiql_whose_files_all_come_from_the_gateway(client):
    """GET /graphql for a browser is GraphiQL, every script and stylesheet under /graphiql/assets/, nothing from a CDN."""
    response = await client.get("/graphql", headers=HTML)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    refs = _references(page)
    assert len(refs) == 6 and all(url.startswith("/graphiql/assets/") for url, _ in refs)
    assert "//" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', page))  # no absolute URL at all
    assert 'url: "/graphql"' in page and "isHeadersEditorEnabled: true" in page
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


async def test_graphiql_files_match_their_integrity_and_are_cached_for_good(client):
    """Each file the page names is served with the hash the page pins for it, immutable for a year, gzipped when accepted."""
    page = (await client.get("/graphql", headers=HTML)).text
    for url, integrity in _references(page):
        plain = await client.get(url, headers={"accept-encoding": "identity"})
        assert plain.status_code == 200, url
        digest = base64.b64encode(hashlib.sha384(plain.content).digest()).decode()
        assert integrity == f"sha384-{digest}"
        assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert plain.headers["content-type"].startswith(("text/javascript", "text/css"))
        zipped = await client.get(url, headers={"accept-encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip" and zipped.content == plain.content
        again = await client.get(url, headers={"accept-encoding": "gzip", "if-none-match": zipped.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["manifest.json", "graphiql-3.8.3/nope.js", "../page.html", "graphiql-3.8.3/graphiql.min.js.gz"])
async def test_only_the_listed_graphiql_files_are_served(client, path):
    """Anything under /graphiql/assets/ that is not one of the pinned files is a 404."""
    assert (await client.get(f"/graphiql/assets/{path}")).status_code == 404


async def test_without_its_files_graphiql_says_so_instead_of_loading_forever(client, monkeypatch, tmp_path):
    """An install without GraphiQL's files answers the browser with a 503 page that says what is missing and how to fix it."""
    monkeypatch.setattr(assets_module, "DIST", tmp_path / "dist")
    response = await client.get("/graphql", headers=HTML)
    assert response.status_code == 503
    assert "GraphiQL is not installed" in response.text and "pip install" in response.text
    assert "<script" not in response.text
    assert (await client.post("/graphql", json={"query": "{ __typename }"})).json()["data"] == {"__typename": "Query"}


def _tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    # mtime 0: the same files give the same bytes (gzip's header holds the time, and a
    # second passing between two builds of a tarball once broke its pinned sha512).
    return gzip.compress(out.getvalue(), mtime=0)


def _sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
async def registry() -> AsyncIterator[tuple[str, list[str]]]:
    """A local npm registry serving two tarballs; yields its URL and the paths asked for."""
    tarballs = {"/left-pad/-/left-pad-1.3.0.tgz": _tarball({"index.js": b"module.exports = 1;\n"}),
                "/@scope/thing/-/thing-2.0.0.tgz": _tarball({"dist/thing.css": b"a { color: red }\n"})}
    asked: list[str] = []

    async def tarball(request: Request) -> Response:
        asked.append(request.url.path)
        body = tarballs.get(request.url.path)
        return Response(body, media_type="application/octet-stream") if body else Response(status_code=404)

    async with on_a_real_port(Starlette(routes=[Route("/{path:path}", tarball)])) as url:
        yield url + "/", asked


def _lock(tmp_path: Path, pad_integrity: str) -> Path:
    lock = tmp_path / "assets.lock.json"
    lock.write_text(json.dumps({"packages": [
        {"name": "left-pad", "version": "1.3.0", "integrity": pad_integrity, "files": {"index.js": "pad.js"}},
        {"name": "@scope/thing", "version": "2.0.0",
         "integrity": _sha512(_tarball({"dist/thing.css": b"a { color: red }\n"})), "files": {"dist/thing.css": "thing.css"}},
    ]}))
    return lock


async def test_the_build_fetches_the_pinned_tarballs_and_extracts_their_files(registry, tmp_path):
    """vendor.fetch downloads each locked tarball from the registry, checks its sha512 and writes the files with gzip copies."""
    url, asked = registry
    lock = _lock(tmp_path, _sha512(_tarball({"index.js": b"module.exports = 1;\n"})))
    dist = tmp_path / "dist"
    manifest = await asyncio.to_thread(fetch, lock, dist, url)
    assert asked == ["/left-pad/-/left-pad-1.3.0.tgz", "/@scope/thing/-/thing-2.0.0.tgz"]
    assert set(manifest["files"]) == {"left-pad-1.3.0/pad.js", "scope-thing-2.0.0/thing.css"}
    assert (dist / "left-pad-1.3.0/pad.js").read_bytes() == b"module.exports = 1;\n"
    assert gzip.decompress((dist / "scope-thing-2.0.0/thing.css.gz").read_bytes()) == b"a { color: red }\n"
    assert is_current(lock, dist)
    (dist / "left-pad-1.3.0/pad.js").write_bytes(b"tampered")
    assert not is_current(lock, dist)


async def test_the_build_refuses_a_tarball_that_does_not_match_the_lock(registry, tmp_path):
    """A tarball whose sha512 differs from the lock's integrity fails the build and writes nothing."""
    url, _ = registry
    lock = _lock(tmp_path, _sha512(b"something else"))
    with pytest.raises(VendorError, match="does not match the integrity"):
        await asyncio.to_thread(fetch, lock, tmp_path / "dist", url)
    assert not (tmp_path / "dist").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["assets.lock.json"]  # no staging directory left behind


def test_the_registry_is_npms_own_setting():
    """NPM_CONFIG_REGISTRY names the registry the build fetches from (as npm itself reads it)."""
    assert registry_url({"NPM_CONFIG_REGISTRY": "http://127.0.0.1:4873"}) == "http://127.0.0.1:4873/"
