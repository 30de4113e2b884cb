"""The gateway's ASGI app: strawberry at /graphql on Starlette, shared clients made in
the lifespan."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .cache import CachePolicy, EntityCache, MemoryLevel, RedisLevel
from .config import Settings
from .feed import FeedFollower
from .health import MEMORY_CACHE, ReadinessProbe, readyz
from .loading import Binding
from .resilience import Resilience
from .state import GatewayState
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


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> Starlette:
    """`transports` replaces the network for some services (tests drive in-process apps);
    `clock` is the circuit breakers' and `wall_clock` the cache's (tests move them
    instead of sleeping through a cool-down or a TTL)."""
    from schema import BINDINGS, schema  # the schema imports the machinery, not the other way round

    settings = settings or Settings.from_env()
    cache_policies = policies(settings, BINDINGS)
    owned: dict[str, list[str]] = {name: [] for name in settings.services}
    for binding in BINDINGS:
        owned.setdefault(binding.service, []).append(binding.entity)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        resilience = Resilience(settings.services, settings.resilience, clock=clock)
        upstream = Upstream(settings.services, transports, resilience)
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
        app.state.gateway = GatewayState(settings, upstream, resilience, cache, cache_policies, feeds, readiness)
        try:
            yield
        finally:
            if feeds is not None:
                await feeds.stop()
            await upstream.aclose()
            if redis is not None:
                await redis.close()

    return Starlette(
        routes=[
            Route("/graphql", GatewayGraphQL(schema)),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/", home),
        ],
        lifespan=lifespan,
    )
