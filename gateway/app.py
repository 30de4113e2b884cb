"""The gateway's ASGI app: strawberry at /graphql on Starlette, shared clients made in
the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import httpx
from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from .config import Settings
from .metrics import CONTENT_TYPE
from .state import GatewayState, gateway_state
from .telemetry import Telemetry, TelemetryMiddleware, tracer_provider_from_env
from .upstream import Upstream
from .view import GatewayGraphQL

__all__ = ["create_app"]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def home(request: Request) -> Response:
    return RedirectResponse("/graphql")


async def metrics(request: Request) -> Response:
    return Response(gateway_state(request).telemetry.metrics.exposition(), media_type=CONTENT_TYPE)


def _telemetry(scope: Scope) -> Telemetry:
    return scope["app"].state.gateway.telemetry


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """`transports` replaces the network for some services (tests drive in-process apps);
    `tracer_provider` replaces the one made from the OTEL_* variables (tests record spans)."""
    from schema import schema  # the schema imports the machinery, not the other way round

    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        telemetry = Telemetry(settings.services, tracer_provider or tracer_provider_from_env())
        upstream = Upstream(settings.services, transports)
        app.state.gateway = GatewayState(settings, upstream, telemetry)
        try:
            yield
        finally:
            await upstream.aclose()
            if tracer_provider is None:  # ours: export what is still buffered, off the event loop
                await asyncio.to_thread(telemetry.tracer_provider.shutdown)

    return Starlette(
        routes=[
            Route("/graphql", TelemetryMiddleware(GatewayGraphQL(schema), _telemetry)),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            Route("/", home),
        ],
        lifespan=lifespan,
    )
