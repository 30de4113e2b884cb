"""The gateway serving the BookVault schema: what `bookvault gateway` runs (a uvicorn factory)."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette

import gateway
from gateway import Settings
from schema import API

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, **options: Any) -> Starlette:
    """`gateway.create_app` over the BookVault schema; `options` as there."""
    return gateway.create_app(API, settings, **options)
