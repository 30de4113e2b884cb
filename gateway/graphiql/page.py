"""The GraphiQL page: our own template, every script and stylesheet from this gateway
(assets.py), with Subresource Integrity and a Content-Security-Policy that lets the page
talk to nothing but its own origin."""

from __future__ import annotations

import functools
import html
import secrets
import string
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from .assets import Assets, load_assets

__all__ = ["graphiql_response", "ENDPOINT"]

ENDPOINT = "/graphql"
TEMPLATE = Path(__file__).resolve().parent / "page.html"
# name in the template -> file it names (the served path ends with it)
FILES = {
    "react_js": "react.production.min.js",
    "react_dom_js": "react-dom.production.min.js",
    "graphiql_js": "graphiql.min.js",
    "graphiql_css": "graphiql.min.css",
    "explorer_js": "index.umd.js",
    "explorer_css": "style.css",
}

MISSING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GraphiQL is not installed</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>GraphiQL is not installed</h1>
<p>This gateway was installed without GraphiQL's browser files (React, GraphiQL and its
explorer are fetched from the npm registry when the package is built or installed, and
were not: {reason}).</p>
<p>Reinstall with access to an npm registry (<code>pip install .</code>; set
<code>NPM_CONFIG_REGISTRY</code> for a mirror), or in a source checkout run
<code>python gateway/graphiql/vendor.py</code>, then restart the gateway.</p>
<p>The GraphQL API itself works: <code>POST {endpoint}</code> with
<code>{{"query": "..."}}</code>.</p>
</body></html>
"""


@functools.cache
def _template() -> string.Template:
    return string.Template(TEMPLATE.read_text())


def _csp(nonce: str) -> str:
    # Only this origin: a page that cannot load or send anything elsewhere (CSP Level 3).
    return "; ".join([
        "default-src 'none'",
        f"script-src 'self' 'nonce-{nonce}'",
        # Not a nonce: that would disable 'unsafe-inline', and the bundle injects <style> elements.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",  # graphiql.min.css embeds its fonts
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def _render(assets: Assets, nonce: str) -> str | None:
    values = {"nonce": nonce, "endpoint": ENDPOINT}
    for name, suffix in FILES.items():
        path = assets.find(suffix)
        if path is None:
            return None
        values[name] = html.escape(assets.url(path))
        values[f"{name}_sri"] = assets.files[path]["integrity"]
    return _template().substitute(values)


def graphiql_response(request: Request) -> Response:
    """GraphiQL for a browser's GET of /graphql; a plain page saying what is missing when
    the files were not installed (instead of a page stuck on "Loading")."""
    assets = load_assets()
    nonce = secrets.token_urlsafe(16)
    page = _render(assets, nonce) if assets is not None else None
    if page is None:
        reason = "gateway/graphiql/dist/ is missing or incomplete"
        body = MISSING.format(reason=reason, endpoint=ENDPOINT)
        return HTMLResponse(body, status_code=503, headers={"cache-control": "no-store"})
    # The page names versioned asset URLs; revalidate it so an upgrade is picked up.
    return HTMLResponse(page, headers={"cache-control": "no-cache", "content-security-policy": _csp(nonce),
                                       "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"})
