"""GraphiQL served by the gateway itself, working offline: the page (page.py) and its
files (assets.py), fetched from the npm registry at build time (vendor.py, hatch_build.py)."""

from __future__ import annotations

from .assets import ASSET_PREFIX, serve_asset
from .page import graphiql_response

__all__ = ["graphiql_response", "serve_asset", "ASSET_PREFIX"]
