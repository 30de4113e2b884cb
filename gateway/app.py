"""The gateway's ASGI app: the GraphQL view at /graphql on Starlette, shared clients made
in the lifespan. What it serves (types and bindings) is given to `create_app`: the gateway
never imports the schema (ARCHITECTURE.md, "Modules")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from dataclasses import dataclass, replace

import httpx
import strawberry
from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute, websocket_session
from starlette.types import ASGIApp, Scope
from strawberry.schema.config import StrawberryConfig

from .auth import Authenticator, authentication
from .cache import CachePolicy, EntityCache, MemoryLevel, RedisLevel
from .config import Settings
from .consistency import Consistency
from .cors import cors_middleware
from .events import StreamFollower
from .feed import FeedFollower
from .graphiql import ASSET_PREFIX, serve_asset
from .health import MEMORY_CACHE, ReadinessProbe, instance_headers, readyz, watch_loop
from .flights import SingleFlight
from .hub import LiveHub
from .live import declared
from .live_ws import serve_websocket
from .outbox import heartbeats
from .metrics import BREAKER_STATES, CONTENT_TYPE, LiveCollector, record_retry
from .persisted import QueryStore, TrustedDocuments
from .pipeline import Pipeline
from .ratelimit import Limiter
from .resilience import BreakerState, Resilience
from .source import Binding, EntitySource
from .state import GatewayState, gateway_state
from .telemetry import Telemetry, TelemetryMiddleware, annotate, tracer_provider_from_env
from .upstream import Upstream
from .view import GraphQLView
from .workers import worker_headers

__all__ = ["Api", "create_app", "executable_schema"]


@dataclass(frozen=True)
class Api:
    """What a gateway serves: the root Query type, the entity bindings it reads through, and
    the root Mutation type if it writes (ARCHITECTURE.md, "Writes")."""

    query: type
    bindings: tuple[Binding, ...]
    mutation: type | None = None
    subscription: type | None = None  # its fields declare `Live` (ARCHITECTURE.md, "Live updates")


class _Schema(strawberry.Schema):
    def process_errors(self, errors: list[Any], execution_context: Any = None) -> None:
        # strawberry logs every error with its traceback; client and upstream errors are
        # expected, and internal ones are logged where the view masks them.
        return None


def executable_schema(query: type, mutation: type | None = None, subscription: type | None = None) -> strawberry.Schema:
    # @defer and @stream are declared (graphql-core's definitions); queries the planner
    # covers are delivered incrementally (ARCHITECTURE.md, "Incremental delivery").
    return _Schema(query=query, mutation=mutation, subscription=subscription,
                   config=StrawberryConfig(enable_experimental_incremental_execution=True))


def _checked(app: ASGIApp) -> ASGIApp:
    """Who is asking (gateway/auth.py): a bad token is answered before the request is read.
    Whether they may ask again so soon is the pipeline's, per operation (gateway/pipeline.py)."""
    return authentication(app, _authenticator)


async def sdl(request: Request) -> Response:
    """The schema as SDL, for tools that read a file rather than introspect; it follows the
    introspection setting (off: 404, as if there were none)."""
    state = gateway_state(request)
    if not state.settings.introspection:
        return PlainTextResponse("introspection is disabled on this gateway", status_code=404)
    return PlainTextResponse(request.app.state.sdl, media_type="application/graphql; charset=utf-8",
                             headers={"cache-control": "no-cache"})


async def healthz(request: Request) -> Response:
    # The header lets `bookvault demo` tell this gateway's answer from another's (gateway/health.py).
    # Under `--workers N`, also which worker answered (gateway/workers.py).
    return JSONResponse({"status": "ok"}, headers=instance_headers() | worker_headers())


async def home(request: Request) -> Response:
    return RedirectResponse("/graphql")


def policies(settings: Settings, bindings: Iterable[Binding]) -> dict[str, CachePolicy]:
    out = {}
    for binding in bindings:
        if binding.policy is None:
            continue
        # BOOKVAULT_CACHE_<ENTITY>_TTL is upper case: `orderPage` is ORDERPAGE (config.py lowers it).
        ttl, stale = settings.cache_overrides.get(binding.entity.lower(), (None, None))
        out[binding.entity] = replace(binding.policy, ttl=binding.policy.ttl if ttl is None else ttl,
                                      max_stale=binding.policy.max_stale if stale is None else stale)
    return out
async def metrics(request: Request) -> Response:
    own = gateway_state(request).telemetry.metrics.exposition()
    # One of `--workers N`: every worker's series, whichever worker the scrape reached (gateway/workers.py).
    worker = getattr(request.app.state, "worker", None)
    return Response(own if worker is None else await worker.exposition(own), media_type=CONTENT_TYPE)


def _telemetry(scope: Scope) -> Telemetry:
    return scope["app"].state.gateway.telemetry


def _authenticator(conn: HTTPConnection) -> Authenticator:
    return gateway_state(conn).authenticator  # type: ignore[return-value]


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
    api: Api,
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
    settings = settings or Settings.from_env()
    schema = executable_schema(api.query, api.mutation, api.subscription)
    live_fields = declared(schema._schema)
    cache_policies = policies(settings, api.bindings)
    owned: dict[str, list[str]] = {name: [] for name in settings.services}
    feed_keys = {b.entity: b.feed_key for b in api.bindings if b.feed_key is not None and b.follows is None}
    derived: dict[str, list[tuple[str, str]]] = {}  # event entity -> entities cached from its events
    for binding in api.bindings:
        if binding.follows is not None and binding.feed_key is not None:
            derived.setdefault(binding.follows, []).append((binding.entity, binding.feed_key))
    for binding in api.bindings:
        if binding.policy is not None:
            owned.setdefault(binding.service, []).append(binding.entity)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        telemetry = Telemetry(settings.services, tracer_provider or tracer_provider_from_env())
        watching = asyncio.create_task(watch_loop(telemetry.metrics.loop_lag.observe), name="loop-lag")
        if settings.document_workers:
            pipeline.documents.start()  # the document worker, started before the first query needs it
        resilience = Resilience(settings.services, settings.resilience, clock=clock)
        _observe(resilience, telemetry)
        upstream = Upstream(settings.services, transports, resilience)
        limits = asyncio.create_task(upstream.learn_limits(), name="learn-limits") if settings.learn_limits else None
        redis = None
        if settings.redis_url:
            redis = RedisLevel(settings.redis_url, timeout=settings.redis_timeout, rest=settings.redis_rest)
        cache = EntityCache(MemoryLevel(settings.cache_max_keys), redis, wall_clock, settings.cache_namespace)
        source = EntitySource(upstream, cache, cache_policies, SingleFlight())
        live = LiveHub(schema._schema, source, live_fields, limit=settings.live_max, deadline=settings.resilience.deadline)
        live.start()
        telemetry.metrics.registry.register(LiveCollector(live))
        beating = asyncio.create_task(heartbeats(settings.live_heartbeat), name="live-heartbeats")
        feeds = None
        if settings.follow_feeds:
            keep = {entity: p.ttl + p.max_stale for entity, p in cache_policies.items()}
            # With a broker, from its stream (gateway/events.py): no /events long-poll per instance.
            feeds = FeedFollower(upstream, cache, owned, keep, wait=settings.feed_wait, feed_keys=feed_keys,
                                 derived=derived, listeners=[live]) if not settings.events_url else \
                StreamFollower(settings.events_url, upstream, cache, owned, keep, wait=settings.feed_wait,
                               feed_keys=feed_keys, derived=derived, listeners=[live])
            feeds.start()
        # Floor raises other instances publish reach this one's L1 without waiting for its follower.
        listening = asyncio.create_task(cache.listen(), name="floor-channel") if redis and settings.floor_channel else None
        consistency = Consistency(settings.services, settings.token_secret(), feeds, settings.consistency_wait)
        readiness = [MEMORY_CACHE] + ([ReadinessProbe("caches", "redis", redis.ping)] if redis else [])
        if feeds is not None:
            # Not ready until each feed has caught up with the head it had at start (or cannot
            # be read, its entries then distrusted): Redis may hold entries of changes made
            # while no instance followed (FeedFollower.following, issue 24).
            readiness += [ReadinessProbe("feeds", name, feeds.following(name), required=True) for name in owned]
        jwks = httpx.AsyncClient(timeout=settings.jwt.jwks_timeout, transport=(transports or {}).get("jwks")) \
            if settings.jwt.jwks_url else None
        authenticator = Authenticator(settings.jwt, jwks, clock=clock)
        limiter = Limiter(settings.rate_limit, settings.redis_url, namespace=settings.cache_namespace,
                          timeout=settings.redis_timeout)
        app.state.gateway = GatewayState(settings=settings, upstream=upstream, resilience=resilience, cache=cache,
                                         policies=cache_policies, feeds=feeds, telemetry=telemetry, source=source,
                                         readiness=readiness, limits=limits, consistency=consistency,
                                         authenticator=authenticator, limiter=limiter, live=live,
                                         documents=pipeline.documents)
        # What is here now (modules, the schema, strawberry's types) lives as long as the app:
        # out of the cyclic collector's way, a full collection walks only what was made since.
        # It alone held the event loop 70-90 ms per full collection (issue 25).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again once the app stops (tests run many in one process)
            await live.close()  # first: subscribers are told (1001, complete) while the services still answer
            beating.cancel()
            watching.cancel()
            if limits is not None:
                limits.cancel()
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)
            if feeds is not None:
                await feeds.stop()
            await upstream.aclose()
            await authenticator.aclose()
            await limiter.aclose()
            if redis is not None:
                await redis.close()
            await store.close()
            await pipeline.documents.aclose()
            if tracer_provider is None:  # ours: export what is still buffered, off the event loop
                await asyncio.to_thread(telemetry.tracer_provider.shutdown)

    # Persisted queries: memory, and Redis when there is one (shared by every instance).
    store = QueryStore(settings.apq_max_entries, settings.redis_url, namespace=settings.cache_namespace,
                       timeout=settings.redis_timeout, rest=settings.redis_rest, ttl=settings.apq_ttl)
    trusted = TrustedDocuments.load(settings.trusted_documents) if settings.trusted_documents else None
    pipeline = Pipeline(schema, settings, store, trusted, live_fields)
    view = GraphQLView(pipeline)
    app = Starlette(
        routes=[
            # One endpoint, two adapters over one pipeline (gateway/pipeline.py): HTTP (POST,
            # GET, SSE, multipart, GraphiQL for browsers) and graphql-transport-ws.
            Route("/graphql", TelemetryMiddleware(_checked(view), _telemetry)),
            WebSocketRoute("/graphql", _checked(websocket_session(serve_websocket))),
            Route("/graphql/schema.graphql", sdl, methods=["GET", "HEAD"]),
            Route(ASSET_PREFIX + "{path:path}", serve_asset, methods=["GET", "HEAD"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/", home),
        ],
        middleware=cors_middleware(settings.cors_origins),
        lifespan=lifespan,
    )
    app.state.graphql = pipeline  # its document cache and planner, for tests and benches
    app.state.sdl = schema.as_str() + "\n"
    return app
