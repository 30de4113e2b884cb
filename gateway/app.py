"""The gateway's ASGI app: strawberry at /graphql on Starlette, shared clients made in
the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .config import Settings
from .state import GatewayState
from .upstream import Upstream
from .view import GatewayGraphQL

__all__ = ["create_app"]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def home(request: Request) -> Response:
    return RedirectResponse("/graphql")


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> Starlette:
    """`transports` replaces the network for some services (tests drive in-process apps)."""
    from schema import schema  # the schema imports the machinery, not the other way round

    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        upstream = Upstream(settings.services, transports)
        app.state.gateway = GatewayState(settings, upstream)
        try:
            yield
        finally:
            await upstream.aclose()

    return Starlette(
        routes=[
            Route("/graphql", GatewayGraphQL(schema)),
            Route("/healthz", healthz),
            Route("/", home),
        ],
        lifespan=lifespan,
    )
