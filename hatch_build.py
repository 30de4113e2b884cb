"""Hatchling build hook: GraphiQL's browser files are fetched from the npm registry when
the package is built or installed (wheel, sdist-to-wheel, `pip install -e .`), checked
against gateway/graphiql/assets.lock.json, and shipped in the wheel; they are never
committed. README, "GraphiQL", says how; BOOKVAULT_GRAPHIQL_ASSETS=skip builds without
them (the page then says they are missing)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
VENDOR = ROOT / "gateway" / "graphiql" / "vendor.py"


def _vendor() -> Any:
    # By path: the package's own imports (starlette, ...) are not installed in the build env.
    spec = importlib.util.spec_from_file_location("_bookvault_graphiql_vendor", VENDOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GraphiQLAssetsHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return  # the sdist ships the lock and this hook; its wheel build fetches
        if os.environ.get("BOOKVAULT_GRAPHIQL_ASSETS", "").lower() == "skip":
            self.app.display_warning("BOOKVAULT_GRAPHIQL_ASSETS=skip: building without GraphiQL's files")
            return
        vendor = _vendor()
        if vendor.is_current():
            self.app.display_info("GraphiQL assets: already fetched and verified")
        else:
            try:
                manifest = vendor.fetch()
            except vendor.VendorError as exc:
                raise RuntimeError(
                    f"GraphiQL assets: {exc}. Point NPM_CONFIG_REGISTRY at a reachable npm registry, "
                    "or set BOOKVAULT_GRAPHIQL_ASSETS=skip to build without GraphiQL"
                ) from exc
            self.app.display_info(f"GraphiQL assets: {len(manifest['files'])} files from {manifest['registry']}")
        # gitignored, so hatchling would leave them out of the wheel unless told
        build_data["artifacts"].append("gateway/graphiql/dist/")
