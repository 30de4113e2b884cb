"""The gateway's ASGI app: strawberry at /graphql on Starlette, shared clients made in
the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace

import httpx
from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from .cache import CachePolicy, EntityCache, MemoryLevel, RedisLevel
from .config import Settings
from .feed import FeedFollower
from .health import MEMORY_CACHE, ReadinessProbe, readyz
from .loading import Binding
from .metrics import BREAKER_STATES, CONTENT_TYPE, record_retry
from .resilience import BreakerState, Resilience
from .state import GatewayState, gateway_state
from .telemetry import Telemetry, TelemetryMiddleware, annotate, tracer_provider_from_env
from .upstream import Upstream
from .view import GatewayGraphQL

__all__ = ["create_app"]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def home(request: Request) -> Response:
    return RedirectResponse("/graphql")


def policies(settings: Settings, bindings: Iterable[Binding]) -> dict[str, CachePolicy]:
    out = {}
    for binding in bindings:
        if binding.policy is None:
            continue
        ttl, stale = settings.cache_overrides.get(binding.entity, (None, None))
        out[binding.entity] = replace(binding.policy, ttl=binding.policy.ttl if ttl is None else ttl,
                                      max_stale=binding.policy.max_stale if stale is None else stale)
    return out
async def metrics(request: Request) -> Response:
    return Response(gateway_state(request).telemetry.metrics.exposition(), media_type=CONTENT_TYPE)


def _telemetry(scope: Scope) -> Telemetry:
    return scope["app"].state.gateway.telemetry


def _observe(resilience: Resilience, telemetry: Telemetry) -> None:
    """Retries go on the batch span and /metrics; breaker changes move their gauge."""

    def retried(service: str, attempt: int, error: Exception) -> None:
        annotate(retries=attempt)
        record_retry(service)

    def moved(service: str, old: BreakerState, new: BreakerState) -> None:
        telemetry.metrics.breaker.labels(service).set(BREAKER_STATES[new.value])
        annotate(breaker_state=new.value)

    resilience.on_retry.append(retried)
    for breaker in resilience.breakers.values():
        breaker.listeners.append(moved)


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """`transports` replaces the network for some services (tests drive in-process apps);
    `clock` is the circuit breakers' and `wall_clock` the cache's (tests move them
    instead of sleeping through a cool-down or a TTL); `tracer_provider` replaces the one
    made from the OTEL_* variables (tests record spans)."""
    from schema import BINDINGS, schema  # the schema imports the machinery, not the other way round

    settings = settings or Settings.from_env()
    cache_policies = policies(settings, BINDINGS)
    owned: dict[str, list[str]] = {name: [] for name in settings.services}
    for binding in BINDINGS:
        owned.setdefault(binding.service, []).append(binding.entity)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        telemetry = Telemetry(settings.services, tracer_provider or tracer_provider_from_env())
        resilience = Resilience(settings.services, settings.resilience, clock=clock)
        _observe(resilience, telemetry)
        upstream = Upstream(settings.services, transports, resilience)
        limits = asyncio.create_task(upstream.learn_limits(), name="learn-limits") if settings.learn_limits else None
        redis = None
        if settings.redis_url:
            redis = RedisLevel(settings.redis_url, timeout=settings.redis_timeout, rest=settings.redis_rest)
        cache = EntityCache(MemoryLevel(settings.cache_max_keys), redis, wall_clock, settings.cache_namespace)
        feeds = None
        if settings.follow_feeds:
            keep = {entity: p.ttl + p.max_stale for entity, p in cache_policies.items()}
            feeds = FeedFollower(upstream, cache, owned, keep, wait=settings.feed_wait)
            feeds.start()
        readiness = [MEMORY_CACHE] + ([ReadinessProbe("caches", "redis", redis.ping)] if redis else [])
        if feeds is not None:
            # Informational: until a feed has its cursor, that service's entries may be dropped.
            readiness += [ReadinessProbe("feeds", name, feeds.following(name)) for name in owned]
        app.state.gateway = GatewayState(settings=settings, upstream=upstream, resilience=resilience, cache=cache,
                                         policies=cache_policies, feeds=feeds, telemetry=telemetry,
                                         readiness=readiness, limits=limits)
        try:
            yield
        finally:
            if limits is not None:
                limits.cancel()
            if feeds is not None:
                await feeds.stop()
            await upstream.aclose()
            if redis is not None:
                await redis.close()
            if tracer_provider is None:  # ours: export what is still buffered, off the event loop
                await asyncio.to_thread(telemetry.tracer_provider.shutdown)

    return Starlette(
        routes=[
            Route("/graphql", TelemetryMiddleware(GatewayGraphQL(schema), _telemetry)),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/", home),
        ],
        lifespan=lifespan,
    )
