"""What one GraphQL request carries through its resolvers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .loading import Loaders

__all__ = ["RequestContext"]


@dataclass
class RequestContext:
    request: Request
    response: Response
    loaders: Loaders
    media_type: str
    # Facts for the response's top-level `extensions` (stale data served, completeness,
    # trace id...), gathered while resolving and merged in by the view.
    extensions: dict[str, Any] = field(default_factory=dict)
