"""Change events through NATS JetStream (issue 27): the services' outbox relays publish to a
stream, the gateways consume it instead of long-polling /events. Each test runs a
nats-server of its own on a free port (never the machine's on 4222), ended in a finally."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from ports import free_port
from shop import REDIS, Shop, on_a_real_port, running_gateway, running_shop
from test_subscriptions import ORDER, next_event, order_of, patch, sse, token

from gateway.events import STREAM, subject_of
from mock_services import SERVICES
from mock_services.relay import Relay

BOOK = "query($id: ID!) { book(id: $id) { id title version price { amount } } }"
ORDER_QUERY = "query($id: ID!) { order(id: $id) { id status version } }"
pytestmark = pytest.mark.skipif(not any(Path(d, "nats-server").exists() for d in ("/usr/sbin", "/usr/bin", "/usr/local/bin")),
                                reason="nats-server is not installed (.ci/run installs it)")


def _nats_binary() -> str:
    return next(str(Path(d, "nats-server")) for d in ("/usr/sbin", "/usr/bin", "/usr/local/bin")
                if Path(d, "nats-server").exists())


class OwnNats:
    """A nats-server with JetStream of the test's own, which it may stop and start again on
    the same port and store."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([_nats_binary(), "-js", "-sd", str(self.store), "-a", "127.0.0.1",
                                         "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server offers no readiness signal but its port
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"nats-server did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None


@contextlib.contextmanager
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    server = OwnNats(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def ask(client: httpx.AsyncClient, query: str, **variables: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def patch_price(shop: Shop, book_id: int, amount: str) -> int:
    """Change a book's price at the catalog; the seq of its event."""
    async with shop.client("catalog") as client:
        (await client.patch(f"/books/{book_id}", json={"price": {"amount": amount, "currency": "EUR"}})).raise_for_status()
        return int((await client.get("/books", params={"ids": str(book_id)})).headers["x-feed-seq"])


async def stream_seqs(url: str, service: str) -> list[int]:
    """The seq of every message of `service`'s subject in the stream, in stream order."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(STREAM, subjects_filter=subject_of(service))
        seqs, at = [], info.state.first_seq
        for _ in range((info.state.subjects or {}).get(subject_of(service), 0)):
            msg = await js.get_msg(STREAM, seq=at, subject=subject_of(service), next=True)
            seqs.append(orjson.loads(msg.data or b"{}")["seq"])
            at = (msg.seq or at) + 1
        return seqs
    finally:
        await nc.close()


async def published(url: str, service: str, seq: int) -> None:
    """Wait until the stream holds `service`'s event `seq` (a core subscription sees each message)."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        seen = asyncio.Event()

        async def look(msg: Any) -> None:
            if orjson.loads(msg.data)["seq"] >= seq:
                seen.set()

        await nc.subscribe(subject_of(service), cb=look)
        js = nc.jetstream(timeout=5)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            if orjson.loads((await js.get_last_msg(STREAM, subject_of(service))).data or b"{}")["seq"] >= seq:
                return
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        await nc.close()


async def test_a_write_reaches_three_gateways_through_jetstream_without_any_long_poll(seeded_dir: Path, tmp_path: Path) -> None:
    """A PATCH is seen by three gateway instances (fresh read, subscription message) and no service answers /events."""
    with own_nats(tmp_path) as server:
        async with running_shop(seeded_dir, tmp_path, events_url=server.url) as shop:
            order = await order_of(shop, "PLACED")
            bearer = token(order["customerId"])
            async with contextlib.AsyncExitStack() as stack:
                instances = []
                for _ in range(3):
                    client, app = await stack.enter_async_context(running_gateway(shop, events_url=server.url))
                    url = await stack.enter_async_context(on_a_real_port(app))
                    events = await stack.enter_async_context(sse(url, ORDER, bearer, id=str(order["id"])))
                    assert (await next_event(events))[1]["data"]["orderUpdated"]["status"] == "PLACED"
                    assert (await ask(client, ORDER_QUERY, id=str(order["id"])))["order"]["status"] == "PLACED"
                    instances.append((client, app, events))
                version = await patch(shop, order["id"], "PAID")
                for client, app, events in instances:
                    event, data = await next_event(events)
                    assert event == "next" and data["data"]["orderUpdated"]["status"] == "PAID"
                    read = (await ask(client, ORDER_QUERY, id=str(order["id"])))["order"]
                    assert (read["status"], read["version"]) == ("PAID", version)
                long_polls = {name: [r for r in await shop.stats(name) if r["route"] == "/events"] for name in SERVICES}
                assert long_polls == {name: [] for name in SERVICES}


async def test_a_relay_killed_mid_publish_and_restarted_publishes_every_event_once(
        seeded_dir: Path, tmp_path: Path) -> None:
    """The catalog's process is SIGKILLed while publishing 300 events; after its restart the stream holds seqs 1..300 once each."""
    # No broker yet: the events wait in the outbox.
    async with running_shop(seeded_dir, tmp_path) as shop, shop.client("catalog") as client:
        for n in range(300):
            (await client.patch(f"/books/{n % 50 + 1}", json={"title": f"Edition {n}"})).raise_for_status()
        head = int((await client.get("/events?after=0&limit=1")).json()["latest"])
    data = tmp_path / "data"
    with own_nats(tmp_path) as server:
        def catalog() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-m", "mock_services", "catalog", "--port", str(free_port()),
                                     "--data-dir", str(data)], env=os.environ | {"BOOKVAULT_EVENTS_URL": server.url},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        process = catalog()
        try:
            await published(server.url, "catalog", 30)
            os.killpg(process.pid, signal.SIGKILL)  # mid-batch: the relay publishes one at a time
            process.wait(5)
            assert len(await stream_seqs(server.url, "catalog")) < head
            process = catalog()
            await published(server.url, "catalog", head)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        assert await stream_seqs(server.url, "catalog") == list(range(1, head + 1))


async def test_two_relays_of_one_service_publish_each_event_once(seeded_dir: Path, tmp_path: Path) -> None:
    """Two relays on one outbox, both starting from nothing, leave one message per event: the broker drops the repeats by id."""
    async with running_shop(seeded_dir, tmp_path) as shop:
        async with shop.client("catalog") as client:
            for n in range(40):
                (await client.patch(f"/books/{n + 1}", json={"title": f"Twice {n}"})).raise_for_status()
            head = int((await client.get("/events?after=0&limit=1")).json()["latest"])
        with own_nats(tmp_path) as server:
            relays = [Relay("catalog", shop.apps["catalog"].state.ctx.db, server.url) for _ in range(2)]
            tasks = [asyncio.create_task(relay.run()) for relay in relays]
            try:
                await published(server.url, "catalog", head)
                async with asyncio.timeout(30):
                    while any(relay.published < head for relay in relays):  # no event says "the other one is done"
                        await asyncio.sleep(0.05)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert await stream_seqs(server.url, "catalog") == list(range(1, head + 1))


async def test_a_restarted_gateway_resumes_from_its_cursor_and_serves_nothing_older(
        seeded_dir: Path, tmp_path: Path, namespace: str) -> None:
    """Changes made while no gateway ran are applied from the stream by the next one: it serves the new version, never version 1."""
    with own_nats(tmp_path) as server:
        async with running_shop(seeded_dir, tmp_path, events_url=server.url) as shop:
            options: dict[str, Any] = {"events_url": server.url, "redis_url": REDIS, "cache_namespace": namespace}
            async with running_gateway(shop, **options) as (client, app):
                assert (await ask(client, BOOK, id="31"))["book"]["version"] == 1
                cursor = app.state.gateway.feeds.cursors["catalog"]
            seqs = [await patch_price(shop, 31, f"31.{n:02d}") for n in range(5)]
            assert seqs[0] == cursor + 1
            await published(server.url, "catalog", seqs[-1])
            async with running_gateway(shop, **options) as (client, app):
                assert app.state.gateway.feeds.heads["catalog"] == seqs[-1]
                await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seqs[-1]), 10)
                book = (await ask(client, BOOK, id="31"))["book"]
                assert (book["version"], book["price"]) == (6, {"amount": "31.04"})
                long_polls = [r for r in await shop.stats("catalog") if r["route"] == "/events"]
                assert long_polls == []


async def test_a_nats_restart_mid_stream_loses_no_invalidation(
        seeded_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Writes made while the broker is down reach the gateway once it is back: cursor exact, new price served, no gap."""
    with own_nats(tmp_path) as server:
        async with running_shop(seeded_dir, tmp_path, events_url=server.url) as shop, \
                running_gateway(shop, events_url=server.url) as (client, app):
            feeds = app.state.gateway.feeds
            first = await patch_price(shop, 12, "1.00")
            await asyncio.wait_for(feeds.reached("catalog", first), 10)
            assert (await ask(client, BOOK, id="12"))["book"]["price"] == {"amount": "1.00"}
            server.stop()
            during = [await patch_price(shop, 12, f"2.{n:02d}") for n in range(3)]
            server.start()
            await asyncio.wait_for(feeds.reached("catalog", during[-1]), 30)
            assert feeds.cursors["catalog"] == during[-1]
            assert (await ask(client, BOOK, id="12"))["book"]["price"] == {"amount": "2.02"}
            assert "gap in the catalog change feed" not in caplog.text


def test_an_events_url_that_is_not_nats_is_refused_at_start() -> None:
    """BOOKVAULT_EVENTS_URL=http://... is a configuration error naming the variable, not a follower that never connects."""
    from gateway.config import Settings

    with pytest.raises(ValueError, match="BOOKVAULT_EVENTS_URL must be a NATS URL"):
        Settings.from_env({"BOOKVAULT_EVENTS_URL": "http://127.0.0.1:4222"})
    assert Settings.from_env({"BOOKVAULT_EVENTS_URL": "nats://127.0.0.1:4222"}).events_url == "nats://127.0.0.1:4222"
