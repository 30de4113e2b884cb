"""The gateway's ASGI app: strawberry at /graphql on Starlette, shared clients made in
the lifespan."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .config import Settings
from .health import MEMORY_CACHE, readyz
from .resilience import Resilience
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
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """`transports` replaces the network for some services (tests drive in-process apps);
    `clock` is the circuit breakers' (tests move it instead of sleeping through a cool-down)."""
    from schema import schema  # the schema imports the machinery, not the other way round

    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        resilience = Resilience(settings.services, settings.resilience, clock=clock)
        upstream = Upstream(settings.services, transports, resilience)
        app.state.gateway = GatewayState(settings, upstream, resilience, readiness=[MEMORY_CACHE])
        try:
            yield
        finally:
            await upstream.aclose()

    return Starlette(
        routes=[
            Route("/graphql", GatewayGraphQL(schema)),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/", home),
        ],
        lifespan=lifespan,
    )
