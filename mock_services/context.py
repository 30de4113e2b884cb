"""What a service's endpoints share, kept in the app's state rather than module globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from .db import Database

__all__ = ["Context", "context"]


@dataclass(frozen=True)
class Context:
    name: str
    db: Database
    max_batch: int
    options: dict[str, Any] = field(default_factory=dict)


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx
