"""Helpers for gateway tests: the six real service apps in process (on a copy of the
seeded data, conftest's `seeded_dir`), a gateway in front of them, and stand-ins for
upstream misbehaviour a real service cannot produce. conftest registers the fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from ports import free_port
from bookvault import create_app
from gateway import Settings
from gateway.auth import mint
from gateway.config import JwtConfig, ResilienceConfig, ServiceConfig
from gateway.serve import CoalescingHttp
from mock_services import SERVICES
from mock_services import create_app as create_service


class Shop:
    """The running services, with the client a test uses to read their stats."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps
        self.transports = {name: httpx.ASGITransport(app=app) for name, app in apps.items()}

    def client(self, name: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transports[name], base_url=f"http://{name}")

    async def stats(self, name: str) -> list[dict[str, Any]]:
        async with self.client(name) as client:
            return (await client.get("/_admin/stats")).json()["requests"]

    async def calls(self) -> dict[str, list[dict[str, Any]]]:
        """Every service's recorded requests, the gateway's housekeeping (feed polls, limits) left out."""
        return {name: [r for r in await self.stats(name) if r["route"] not in ("/events", "/_meta")] for name in self.apps}

    async def reset_stats(self) -> None:
        for name in self.apps:
            async with self.client(name) as client:
                await client.delete("/_admin/stats")

    async def faults(self, name: str, **faults: Any) -> None:
        async with self.client(name) as client:
            (await client.post("/_admin/faults", json=faults)).raise_for_status()


@contextlib.asynccontextmanager
async def running_shop(seeded_dir: Path, tmp_path: Path, **options: Any) -> AsyncIterator[Shop]:
    """The six services on a copy of the seeded data; `options` go to each service's app."""
    data = tmp_path / "data"
    shutil.copytree(seeded_dir, data)
    apps = {name: create_service(spec, data_dir=data, admin=True, **options) for name, spec in SERVICES.items()}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield Shop(apps)


# Tests' gateways verify HS256 tokens signed with this; their clients send a staff token
# unless a test says otherwise (`running_gateway(..., headers=...)`, `as_customer`).
TEST_SECRET = "bookvault-tests-" + "0123456789abcdef" * 2


def as_customer(customer: int | None, *, staff: bool = False, subject: str | None = None) -> dict[str, str]:
    """The Authorization header of a caller: customer `customer`, or staff."""
    subject = subject or ("staff" if staff else f"customer-{customer}")
    return {"authorization": f"Bearer {mint(TEST_SECRET, subject, customer=customer, scopes=['staff'] if staff else [])}"}


STAFF = as_customer(None, staff=True)


def settings_for(
    shop: Shop,
    *,
    urls: Mapping[str, str] | None = None,
    per_service: Mapping[str, Mapping[str, Any]] | None = None,
    gateway: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """`overrides` apply to every service, `per_service[name]` to one; `urls` send a
    service to a real address instead of its in-process app; `gateway` sets Settings fields."""
    urls, per_service = urls or {}, per_service or {}
    services = {
        name: ServiceConfig(name=name, url=urls.get(name, f"http://{name}"), **{**overrides, **per_service.get(name, {})})
        for name in shop.apps
    }
    # A Redis call may wait a second here, not the 50 ms default: a dozen apps share this one
    # loop on two loaded cores, and a late reply there is the loop's lag, not Redis trouble.
    # Tests about Redis trouble set `redis_timeout` themselves.
    return Settings(services=services,
                    **{"jwt": JwtConfig(secret=TEST_SECRET), "redis_timeout": 1.0, **(gateway or {})})


@contextlib.asynccontextmanager
async def running_gateway(
    shop: Shop,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    *,
    clock: Callable[[], float] | None = None,
    wall_clock: Callable[[], float] | None = None,
    tracer_provider: Any = None,
    wait_feeds: bool = True,
    urls: Mapping[str, str] | None = None,
    per_service: Mapping[str, Mapping[str, Any]] | None = None,
    service: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] = STAFF,
    **settings: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A gateway app over `shop` (lifespan running) and a client for it, sending `headers`
    (a staff token unless said otherwise). `settings` are Settings fields, `service`
    ServiceConfig fields for every service."""
    config = settings_for(shop, urls=urls, per_service=per_service, gateway=settings, **(service or {}))
    inner = {name: t for name, t in shop.transports.items() if name not in (urls or {})}
    options = {k: v for k, v in (("clock", clock), ("wall_clock", wall_clock), ("tracer_provider", tracer_provider))
               if v is not None}
    app = create_app(config, transports={**inner, **(transports or {})}, **options)
    async with app.router.lifespan_context(app):
        # The document worker (forked with the gateway) is up: its start is not part of a
        # test's first request, whose deadline may be short.
        await asyncio.wait_for(app.state.gateway.documents.ready(), 30)
        if wait_feeds and app.state.gateway.feeds is not None:
            # A follower that starts late may still drop entries another gateway wrote.
            await asyncio.wait_for(app.state.gateway.feeds.started(), 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers=dict(headers)) as client:
            yield client, app


@contextlib.asynccontextmanager
async def gateway_for(
    shop: Shop, *, clock: Callable[[], float] = time.monotonic, resilience: ResilienceConfig | None = None,
    urls: Mapping[str, str] | None = None, per_service: Mapping[str, Mapping[str, Any]] | None = None,
    **service: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway over `shop`; `service` fields apply to every service. No change
    feeds are followed and no limits learned: those calls would count as calls to the
    services under test."""
    async with running_gateway(shop, clock=clock, urls=urls, per_service=per_service, service=service,
                               resilience=resilience or ResilienceConfig(), follow_feeds=False,
                               learn_limits=False) as (client, _):
        yield client


@contextlib.asynccontextmanager
async def gateway_client(shop: Shop, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A started gateway in front of `shop`; `options` as for `running_gateway`."""
    async with running_gateway(shop, **options) as (client, _):
        yield client


REDIS = "redis://127.0.0.1:6379/0"  # the machine's shared Redis: tests use a namespace each, never flush it


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A Redis key namespace of this test's own, removed afterwards."""
    name = f"bvtest-{uuid.uuid4().hex[:12]}"
    yield name
    client = aioredis.from_url(REDIS)
    async for key in client.scan_iter(f"{name}:*"):
        await client.unlink(key)
    await client.aclose()


@pytest.fixture
async def shop(seeded_dir: Path, tmp_path: Path) -> AsyncIterator[Shop]:
    async with running_shop(seeded_dir, tmp_path) as shop:
        yield shop


@pytest.fixture
async def gateway(shop: Shop) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(shop) as (client, _):
        yield client


def closed_port_url() -> str:
    """An address where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def on_a_real_port(app: Any, lifespan: str = "off", send_buffer: int | None = None) -> AsyncIterator[str]:
    """Serve `app` on a real 127.0.0.1 socket, so httpx's own timeouts apply; yields its URL.
    `lifespan="on"` has uvicorn run the app's lifespan, "off" is for an app already started.
    `send_buffer`: the kernel's send buffer of each connection, in bytes (small: a client that
    does not read backs the server's writes up at once, not after megabytes)."""
    sock = socket.socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    # The gateway's own HTTP protocol (gateway/serve.py), as `bookvault gateway` serves it.
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_level="warning", timeout_graceful_shutdown=1,
                                           http=CoalescingHttp))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:  # uvicorn offers a flag, not an event
                if task.done():
                    task.result()  # raises why it could not start
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class RawServer:
    """A TCP server that answers each request with the next of `answers` (raw HTTP/1.1
    bytes; the last one repeats), then closes the connection, or with `cut` resets it:
    what a crashing proxy or a dying process sends, which a real service will not."""

    def __init__(self, *answers: bytes, cut: bool = False) -> None:
        self.answers = answers
        self.cut = cut
        self.requests: list[bytes] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        except (asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            return
        writer.write(self.answers[min(len(self.requests), len(self.answers)) - 1])
        await writer.drain()
        if self.cut:
            writer.transport.abort()  # RST: the body stops short
        else:
            writer.close()

    def serving(self) -> contextlib.AbstractAsyncContextManager[str]:
        return serving(self._handle)


@contextlib.asynccontextmanager
async def serving(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> AsyncIterator[str]:
    """A TCP server on a free 127.0.0.1 port, `handle` run for each connection; yields its URL."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def http_answer(status: str, content_type: str, body: bytes, headers: Mapping[str, str] | None = None,
                length: int | None = None) -> bytes:
    """Raw bytes of one HTTP/1.1 response (`length` may lie, for a body cut short)."""
    head = [f"HTTP/1.1 {status}", f"content-type: {content_type}", f"content-length: {length or len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own on a free port (its URL and process), stopped after:
    a test may pause (SIGSTOP) or stop it without disturbing anybody else's Redis."""
    port = free_port()  # outside the ephemeral range: nothing else takes it before redis binds
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            ping = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=2)
            if ping.stdout.strip() == b"PONG":
                break
            if process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {port}")
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.send_signal(signal.SIGCONT)  # a paused server cannot stop
        process.terminate()
        process.wait(5)


class SlowFeed(httpx.AsyncBaseTransport):
    """Delays every change-feed page by `delay` seconds after it arrived: an instance whose
    follower lags behind the others (a busy process, a slow network path)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/events":
            await response.aread()
            await asyncio.sleep(self.delay)  # the lag itself, not a wait for an event
        return response


async def health_latencies(client: httpx.AsyncClient, pending: asyncio.Future[Any]) -> list[float]:
    """/healthz asked again and again until `pending` is done (at least once): each answer's latency."""
    latencies: list[float] = []
    while not pending.done() or not latencies:
        started = time.perf_counter()
        assert (await client.get("/healthz")).status_code == 200
        latencies.append(time.perf_counter() - started)
    return latencies
