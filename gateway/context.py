"""What one GraphQL request carries through its execution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from .relations import Loaders
from .source import Reader

__all__ = ["RequestContext"]


@dataclass
class RequestContext:
    request: HTTPConnection  # an HTTP request, or the WebSocket that carried the operation
    reader: Reader  # the entity source, for this caller and deadline
    loaders: Loaders  # the reference execution's DataLoaders over `reader`
    # Facts for the response's top-level `extensions` (stale data served, completeness...),
    # gathered while executing and merged in by the view.
    extensions: dict[str, Any] = field(default_factory=dict)
