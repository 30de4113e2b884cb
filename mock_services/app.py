"""Build one service's ASGI app from its spec: its own database, its routes, the shared
endpoints (health, meta, feed, OpenAPI) and, with ``admin``, faults and stats."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.trace import TracerProvider
from sqlalchemy import MetaData, Table, insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request

from .admin import AdminMiddleware, AdminState, admin_routes
from .api import Api, query_param
from .context import Context
from .db import Database, EventKey, now_iso
from .demo_data import Shop, shop
from .errors import BadRequest, StartupError, exception_handlers
from .models import EventPage, Meta
from .params import parse_int
from .position import FeedPosition
from .relay import EVENTS_ENV, relaying
from .responses import JSONResponse
from .runner import instance_headers
from .telemetry import ServerSpans, trace_queries, tracer_provider_from_env

__all__ = ["ServiceSpec", "configured_database", "create_app", "database_env", "database_url", "prepare_database"]

VERSION = "0.1.0"
MAX_WAIT_S = 30.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    port: int
    entities: tuple[str, ...]
    metadata: MetaData
    routes: Callable[[Api], None]
    seed: Callable[[Shop], dict[Table, list[dict[str, Any]]]]
    # Work a service runs beside its requests while it lives (the inventory's expiry
    # sweep, the orders service's saga resumer), entered once its database is ready.
    background: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None
    # Keys its events carry besides the entity's id (payments and shipments: their order's).
    event_keys: tuple[EventKey, ...] = ()


def database_url(name: str, data_dir: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir) / f'{name}.db'}"


TEMPLATE_ENV = "BOOKVAULT_DATABASE_URL"
SERVICE_PLACEHOLDER = "{service}"


def database_env(name: str) -> str:
    """The variable naming one service's own database URL."""
    return f"BOOKVAULT_{name.upper()}_DATABASE_URL"


def configured_database(name: str, env: Mapping[str, str], template: str | None = None) -> str | None:
    """The database URL configured for service `name` (README, "The services"): its own
    BOOKVAULT_<NAME>_DATABASE_URL, else the template (`template`, else BOOKVAULT_DATABASE_URL)
    with `{service}` replaced by its name; None: a SQLite file in the data directory. A URL
    that SQLAlchemy cannot read, or a template without `{service}` (every service on one
    database), is a StartupError."""
    template = template or env.get(TEMPLATE_ENV) or None
    if own := env.get(database_env(name)):
        url, source = own, database_env(name)
    elif template:
        if SERVICE_PLACEHOLDER not in template:
            raise StartupError(f"the database URL template must contain {SERVICE_PLACEHOLDER}: one database per "
                               f"service (e.g. postgresql+asyncpg://bv_{{service}}@127.0.0.1/bv_{{service}})")
        url, source = template.replace(SERVICE_PLACEHOLDER, name), "the database URL template"
    else:
        return None
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise StartupError(f"{source} is not a database URL SQLAlchemy can use (e.g. "
                           f"postgresql+asyncpg://user@host/{name} or sqlite+aiosqlite:///{name}.db)") from None
    return url


async def prepare_database(spec: ServiceSpec, url: str, scale: int = 1) -> str:
    """Create, migrate or refuse the service's database (as its app's start-up does), then let
    it go: what was done. A database that cannot be opened is a StartupError naming it."""
    db = Database(url, spec.metadata, spec.event_keys)
    try:
        return await db.create(spec.name, _seeder(spec, scale))
    except (OSError, SQLAlchemyError) as exc:
        where = make_url(url).render_as_string(hide_password=True)
        detail = getattr(exc, "orig", None) or exc  # the driver's own words, not SQLAlchemy's wrapping
        reason = (str(detail).strip().splitlines() or [type(detail).__name__])[0]
        raise StartupError(f"{spec.name} cannot open its database {where}: {reason}") from None
    finally:
        await db.dispose()


def _wait_seconds(raw: str | None) -> float:
    if raw is None:
        return 0.0
    try:  # any JSON number the document allows: 5, 0.25, 1e1
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT_S:  # NaN fails this too
        raise BadRequest(f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    return seconds


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """Returns once the client has gone (its `http.disconnect`): a long-poll nobody is
    waiting for ends, instead of holding the process's shutdown for its full wait."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


def _shared_routes(api: Api, spec: ServiceSpec) -> None:
    async def healthz(request: Request) -> JSONResponse:
        # The header lets the supervisor tell this process's answer from another's (runner.py).
        return JSONResponse({"status": "ok", "service": spec.name}, headers=instance_headers())

    async def meta(request: Request) -> JSONResponse:
        ctx: Context = request.app.state.ctx
        return JSONResponse({"service": spec.name, "maxBatch": ctx.max_batch, "entities": list(spec.entities)})

    async def events(request: Request) -> JSONResponse:
        q = request.query_params
        after = parse_int(q.get("after"), "after", 0, 0, 2**53)
        limit = parse_int(q.get("limit"), "limit", 100, 1, 1000)
        wait = _wait_seconds(q.get("wait"))
        ctx: Context = request.app.state.ctx
        rows, latest = await ctx.db.events_after(after, limit, wait, gone=_disconnected(request))
        return JSONResponse({"events": rows, "next": rows[-1]["seq"] if rows else after, "latest": latest})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.state.openapi)

    api.add("GET", "/healthz", healthz, summary="Liveness", errors=())
    api.add("GET", "/_meta", meta, summary="Service limits", ok=(200, Meta), errors=())
    api.add("GET", "/events", events, summary="Change feed (long-poll)", ok=(200, EventPage), params=[
        query_param("after", "Return events with seq greater than this", {"type": "integer", "minimum": 0}),
        query_param("limit", "At most this many events", {"type": "integer", "minimum": 1, "maximum": 1000}),
        query_param("wait", "Seconds to wait for a first event", {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}),
    ])
    api.add("GET", "/openapi.json", openapi, summary="This document", errors=())


def _seeder(spec: ServiceSpec, scale: int) -> Callable[[AsyncConnection], Awaitable[None]]:
    async def seed(conn: AsyncConnection) -> None:
        stamp = now_iso()
        for table, rows in spec.seed(shop(scale)).items():
            await conn.execute(insert(table), [{**row, "version": 1, "updated_at": stamp} for row in rows])

    return seed


def create_app(
    spec: ServiceSpec,
    *,
    database: str | None = None,
    data_dir: str | Path = "data",
    scale: int = 1,
    admin: bool = False,
    max_batch: int = 100,
    tracer_provider: TracerProvider | None = None,
    options: Mapping[str, Any] | None = None,
    events_url: str | None = None,
) -> Starlette:
    """`tracer_provider` replaces the one made from the OTEL_* variables (tests record spans);
    `options` are a service's own settings (see its module), over its BOOKVAULT_* variables;
    `events_url` (default: BOOKVAULT_EVENTS_URL) a NATS server its outbox relay publishes to
    (mock_services/relay.py)."""
    url = database or database_url(spec.name, data_dir)
    events_url = events_url if events_url is not None else os.environ.get(EVENTS_ENV) or None
    api = Api(spec.name)
    spec.routes(api)
    _shared_routes(api, spec)
    state = AdminState()
    provider = tracer_provider or tracer_provider_from_env(spec.name)  # None: no tracing, no cost
    tracer = provider.get_tracer("bookvault.services") if provider else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if database is None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        db = Database(url, spec.metadata, spec.event_keys)
        try:
            await db.create(spec.name, _seeder(spec, scale))
        except BaseException:
            await db.dispose()
            raise
        if tracer:  # after seeding: a first start's inserts belong to no request
            for engine in db.sync_engines:
                trace_queries(engine, tracer, spec.name)
        app.state.ctx = Context(spec.name, db, max_batch, dict(options or {}))
        try:
            async with spec.background(app) if spec.background else contextlib.nullcontext(), \
                    relaying(spec.name, db, events_url) as relay:
                app.state.relay = relay
                yield
        finally:
            await db.dispose()
            if provider and tracer_provider is None:  # ours: export what is buffered, off the loop
                await asyncio.to_thread(provider.shutdown)

    app = Starlette(
        routes=api.routes + (admin_routes(state) if admin else []),
        exception_handlers=exception_handlers,
        # The server span outermost, so injected latency and faults show in it.
        middleware=([Middleware(ServerSpans, tracer=tracer)] if tracer else [])
        + ([Middleware(AdminMiddleware, state=state)] if admin else [])
        + [Middleware(FeedPosition)],
        lifespan=lifespan,
    )
    app.state.openapi = api.document(VERSION)
    app.state.admin = state
    return app
