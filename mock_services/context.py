"""What a service's endpoints share, kept in the app's state rather than module globals."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from .db import Database

__all__ = ["Context", "context"]


@dataclass(frozen=True)
class Context:
    name: str
    db: Database
    max_batch: int


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx
