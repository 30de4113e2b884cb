"""What one GraphQL request carries through its resolvers."""

from __future__ import annotations

from dataclasses import dataclass

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
