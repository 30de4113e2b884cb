"""The versioned entity cache: L1 memory, L2 Redis (a real one), change feeds, stale-if-error."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from gateway.cache import FORMAT, CachePolicy, EntityCache, Entry, MemoryLevel, RedisLevel
from gateway.config import RateLimit, ResilienceConfig, Settings
from gateway.persisted import QueryStore
from gateway.ratelimit import Limiter
from ports import free_port
from shop import Shop, as_customer, own_redis, running_gateway

REDIS = "redis://127.0.0.1:6379/0"
HISTORY = """query($id: ID!) { customer(id: $id) { name orders(first: 20) { nodes { id
  items { book { title price { amount } author { name } stock { available } } } payment { status } shipment { status } } } } }"""
BOOK = "query($id: ID!) { book(id: $id) { id title version price { amount } } }"




class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def ask(client: httpx.AsyncClient, query: str, headers: dict[str, str] | None = None, **variables: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


async def count_calls(shop: Shop) -> dict[str, int]:
    calls = {name: len(reqs) for name, reqs in (await shop.calls()).items()}
    await shop.reset_stats()
    return calls


async def patch_price(shop: Shop, book_id: int, amount: str) -> int:
    """Change a book's price at the catalog; returns the feed seq of the change."""
    async with shop.client("catalog") as client:
        (await client.patch(f"/books/{book_id}", json={"price": {"amount": amount, "currency": "EUR"}})).raise_for_status()
        return (await client.get("/events?after=0&limit=1")).json()["latest"]


@pytest.mark.parametrize("redis_url", [None, REDIS], ids=["l1", "l1+redis"])
async def test_repeated_history_makes_no_calls_for_cached_public_types(shop: Shop, namespace: str, redis_url: str | None) -> None:
    """The second order history costs no call at all (its page of orders included); private types are reused only by
    the same caller."""
    alice = as_customer(7)
    async with running_gateway(shop, redis_url=redis_url, cache_namespace=namespace) as (client, _):
        first = await ask(client, HISTORY, alice, id="7")
        assert (await count_calls(shop))["catalog"] == 1  # the books, their authors included (and cached)
        again = await ask(client, HISTORY, alice, id="7")
        assert again["data"] == first["data"]
        assert await count_calls(shop) == {"customers": 0, "catalog": 0, "inventory": 0, "orders": 0,
                                           "payments": 0, "shipping": 0}
        await ask(client, HISTORY, id="7")  # staff: public types from cache, private ones asked again
        assert await count_calls(shop) == {"customers": 1, "catalog": 0, "inventory": 0, "orders": 1,
                                           "payments": 1, "shipping": 1}


class Holding(httpx.AsyncBaseTransport):
    """Holds back the next /books answer, already read, until released: a slow response."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.gate: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.gate is not None and request.url.path == "/books":
            gate, self.gate = self.gate, None
            await response.aread()
            self.holding.set()
            await gate.wait()
        return response


@pytest.mark.parametrize("redis_url", [None, REDIS], ids=["l1", "l1+redis"])
async def test_a_late_older_response_never_replaces_a_newer_version(shop: Shop, namespace: str, redis_url: str | None) -> None:
    """Version 1 arriving after version 2 was cached leaves version 2 in place."""
    holding = Holding(shop.transports["catalog"])
    async with running_gateway(shop, {"catalog": holding}, redis_url=redis_url, cache_namespace=namespace) as (client, app):
        holding.gate = release = asyncio.Event()
        slow = asyncio.create_task(ask(client, BOOK, id="3"))
        await asyncio.wait_for(holding.holding.wait(), 10)  # version 1 is read and on its way, slowly
        seq = await patch_price(shop, 3, "99.00")
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        newer = await ask(client, BOOK, id="3")
        assert newer["data"]["book"]["version"] == 2
        release.set()
        assert (await slow)["data"]["book"]["version"] == 1  # what the service said when asked
        await shop.reset_stats()
        cached = await ask(client, BOOK, id="3")
        assert cached["data"]["book"] == newer["data"]["book"]
        assert (await count_calls(shop))["catalog"] == 0
    if redis_url:
        async with running_gateway(shop, redis_url=redis_url, cache_namespace=namespace) as (other, _):
            assert (await ask(other, BOOK, id="3"))["data"]["book"]["version"] == 2
            assert (await count_calls(shop))["catalog"] == 0  # from Redis, and it is version 2


async def test_a_price_change_is_served_within_one_feed_round_trip(shop: Shop) -> None:
    """After a PATCH at the catalog, the next query shows the new price and version, long before the TTL."""
    async with running_gateway(shop) as (client, app):
        before = (await ask(client, BOOK, id="8"))["data"]["book"]
        seq = await patch_price(shop, 8, "12.34")
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        after = (await ask(client, BOOK, id="8"))["data"]["book"]
    assert after["price"] == {"amount": "12.34"} and after["version"] == before["version"] + 1


async def test_two_gateways_sharing_redis_serve_a_change_fresh(shop: Shop, namespace: str) -> None:
    """A change fetched through one gateway is what the other serves, from Redis."""
    async with running_gateway(shop, redis_url=REDIS, cache_namespace=namespace) as (a, app_a), \
            running_gateway(shop, redis_url=REDIS, cache_namespace=namespace) as (b, app_b):
        await ask(a, BOOK, id="9")
        await count_calls(shop)
        assert (await ask(b, BOOK, id="9"))["data"]["book"]["version"] == 1
        assert (await count_calls(shop))["catalog"] == 0  # B's first read came from A's write to Redis
        seq = await patch_price(shop, 9, "7.77")
        await asyncio.wait_for(app_a.state.gateway.feeds.reached("catalog", seq), 10)
        await asyncio.wait_for(app_b.state.gateway.feeds.reached("catalog", seq), 10)
        assert (await ask(a, BOOK, id="9"))["data"]["book"]["price"] == {"amount": "7.77"}
        await count_calls(shop)
        seen_by_b = (await ask(b, BOOK, id="9"))["data"]["book"]
        assert seen_by_b["price"] == {"amount": "7.77"} and seen_by_b["version"] == 2
        assert (await count_calls(shop))["catalog"] == 0


async def test_stale_books_are_served_when_the_catalog_fails_until_max_stale(shop: Shop) -> None:
    """Past the TTL a failing catalog gets stale books marked in extensions; past max-stale, null and the error."""
    clock = Clock()
    async with running_gateway(shop, wall_clock=clock, cache_overrides={"book": (30.0, 600.0)}) as (client, _):
        fresh = await ask(client, '{ books(ids: ["1", "2"]) { id title } }')
        await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/books"])
        clock.now += 31
        stale = await ask(client, '{ books(ids: ["1", "2"]) { id title } }')
        assert stale["data"] == fresh["data"] and "errors" not in stale
        assert stale["extensions"]["stale"] == [
            {"path": ["books", i], "service": "catalog", "version": 1, "ageMs": 31_000} for i in (0, 1)]
        clock.now += 600
        gone = await ask(client, '{ books(ids: ["1", "2"]) { id title } }')
    assert gone["data"] == {"books": [None, None]}
    assert {(tuple(e["path"]), e["extensions"]["code"], e["extensions"]["service"]) for e in gone["errors"]} == {
        (("books", 0), "UPSTREAM_UNAVAILABLE", "catalog"), (("books", 1), "UPSTREAM_UNAVAILABLE", "catalog")}
    assert "stale" not in gone.get("extensions", {})


async def test_a_new_order_drops_the_customers_cached_pages(shop: Shop) -> None:
    """A warm history (any `first`) shows an order placed at the orders service once its event arrives, not a minute later."""
    query = "query($id: ID!, $n: Int!) { customer(id: $id) { orders(first: $n) { totalCount nodes { id } } } }"
    alice = as_customer(7)
    async with running_gateway(shop) as (client, app):
        before = {n: (await ask(client, query, alice, id="7", n=n))["data"]["customer"]["orders"] for n in (3, 5)}
        assert [len(before[n]["nodes"]) for n in (3, 5)] == [3, 5]  # one cached page per size
        async with shop.client("orders") as orders:
            line = {"bookId": 11, "quantity": 1, "unitPrice": {"amount": "3.00", "currency": "EUR"}, "titleAtPurchase": "X"}
            created = await orders.post("/orders", json={"customerId": 7, "items": [line]})
            assert created.status_code == 201, created.text
        await asyncio.wait_for(app.state.gateway.feeds.reached("orders", int(created.headers["x-feed-seq"])), 10)
        await shop.reset_stats()
        for n in (3, 5):
            after = (await ask(client, query, alice, id="7", n=n))["data"]["customer"]["orders"]
            assert after["totalCount"] == before[n]["totalCount"] + 1
            assert after["nodes"][0]["id"] == str(created.json()["id"])
        assert len((await shop.calls())["orders"]) == 2  # each size's page read again, once


async def test_a_ttl_of_0_in_the_environment_revalidates_pages_too(shop: Shop) -> None:
    """BOOKVAULT_CACHE_ORDERPAGE_TTL=0 (the type `orderPage`, upper-cased) reads a customer's page every time."""
    overrides = Settings.from_env({"BOOKVAULT_CACHE_ORDERPAGE_TTL": "0"}).cache_overrides
    query = "query($id: ID!) { customer(id: $id) { orders(first: 3) { nodes { id } } } }"
    async with running_gateway(shop, cache_overrides=overrides) as (client, _):
        for _ in range(3):
            assert len((await ask(client, query, as_customer(7), id="7"))["data"]["customer"]["orders"]["nodes"]) == 3
    assert (await count_calls(shop))["orders"] == 3


async def test_private_records_never_cross_callers(shop: Shop, namespace: str) -> None:
    """A customer cached for Alice is not served to Bob; an anonymous caller gets UNAUTHENTICATED without a call."""
    query = '{ customer(id: 11) { name email } }'
    alice, bob = as_customer(None, staff=True, subject="alice"), as_customer(None, staff=True, subject="bob")
    async with running_gateway(shop, redis_url=REDIS, cache_namespace=namespace, headers={}) as (client, _):
        await ask(client, query, alice)
        await ask(client, query, alice)
        assert (await count_calls(shop))["customers"] == 1
        await ask(client, query, bob)
        assert (await count_calls(shop))["customers"] == 1
        for _ in range(2):
            anonymous = (await client.post("/graphql", json={"query": query})).json()
            assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await count_calls(shop))["customers"] == 0
    store = aioredis.from_url(REDIS)
    scopes = await store.hkeys(f"{namespace}:{FORMAT}:customer:11")
    await store.aclose()
    assert len(scopes) == 2 and all(s.startswith(b"u:") for s in scopes)  # Alice's and Bob's; no public copy
    assert not any(b"alice" in s or b"bob" in s for s in scopes)  # the credential itself is never stored


def _free_port() -> int:
    return free_port()  # outside the ephemeral range: nothing else takes it before the child binds


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A Redis of this test's own, so stopping it disturbs nobody else."""
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(500):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=2).stdout.strip() == b"PONG":
            return process
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(5)


async def test_queries_survive_redis_stopping_and_use_it_again_when_it_returns(shop: Shop) -> None:
    """With Redis stopped mid-run every query still succeeds; once Redis is back, entries are written to it again."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    try:
        async with running_gateway(shop, redis_url=url, redis_rest=0.0) as (client, app):
            redis = app.state.gateway.cache.redis
            assert "errors" not in await ask(client, BOOK, id="21") and redis.up
            stop(server)
            for book in ("22", "23", "21"):
                body = await ask(client, BOOK, id=book)
                assert body["data"]["book"]["id"] == book and "errors" not in body
            assert redis.fallbacks > 0 and not redis.up
            server = start_redis(port)
            for _ in range(5):  # the first command after the restart may meet a dead pooled connection
                await ask(client, BOOK, id="24")
                if redis.up:
                    break
            store = aioredis.from_url(url)
            assert redis.up and await store.exists(f"bv:{FORMAT}:book:24")
            await store.aclose()
    finally:
        stop(server)


async def test_a_restarted_gateway_resumes_each_feed_from_its_cursor(shop: Shop, namespace: str) -> None:
    """A change made while no gateway ran is applied by the next one, which resumes from the saved cursor."""
    async with running_gateway(shop, redis_url=REDIS, cache_namespace=namespace) as (client, app):
        assert (await ask(client, BOOK, id="31"))["data"]["book"]["version"] == 1
        cursors = dict(app.state.gateway.feeds.cursors)
    seq = await patch_price(shop, 31, "31.31")
    assert seq == cursors["catalog"] + 1
    async with running_gateway(shop, redis_url=REDIS, cache_namespace=namespace) as (client, app):
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        await count_calls(shop)
        book = (await ask(client, BOOK, id="31"))["data"]["book"]
        assert (book["version"], book["price"]) == (2, {"amount": "31.31"})
        assert (await count_calls(shop))["catalog"] == 1  # the cached version 1 was not trusted


async def test_an_open_breaker_serves_stale_books_without_calling_the_catalog(shop: Shop) -> None:
    """Once the catalog's breaker is open, stale books come from the cache and the catalog sees no call at all."""
    clock = Clock()
    async with running_gateway(shop, wall_clock=clock, service={"retries": 0},
                               resilience=ResilienceConfig(breaker_threshold=1, breaker_cooldown=60)) as (client, _):
        await ask(client, BOOK, id="41")
        await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/books"])
        clock.now += 31
        opened = await ask(client, BOOK, id="41")  # this call fails and opens the breaker
        await count_calls(shop)
        served = await ask(client, BOOK, id="41")
        assert served["data"] == opened["data"] and served["data"]["book"]["id"] == "41"
        assert [s["service"] for s in served["extensions"]["stale"]] == ["catalog"]
        assert (await count_calls(shop))["catalog"] == 0
        assert (await client.get("/readyz")).json()["services"]["catalog"]["breaker"] == "open"


async def test_an_expired_local_entry_is_refreshed_from_redis_before_the_service(shop: Shop, namespace: str) -> None:
    """When another gateway has revalidated an entry, one whose own copy expired takes it from Redis, not the catalog."""
    clock = Clock()
    async with running_gateway(shop, wall_clock=clock, redis_url=REDIS, cache_namespace=namespace) as (a, _), \
            running_gateway(shop, wall_clock=clock, redis_url=REDIS, cache_namespace=namespace) as (b, _):
        await ask(b, BOOK, id="51")
        clock.now += 31  # both copies are past the book TTL (30 s)
        await ask(a, BOOK, id="51")  # A revalidates at the catalog and writes a fresh entry to Redis
        assert (await count_calls(shop))["catalog"] == 2
        assert (await ask(b, BOOK, id="51"))["data"]["book"]["id"] == "51"
        assert (await count_calls(shop))["catalog"] == 0


class HeldFeed(httpx.AsyncBaseTransport):
    """A service's change feed whose long-polls (all but the follower's first look at the head,
    `wait=0`) wait while `flowing` is clear, and whose pages leave out the seqs in `hide`: a
    slow catch-up, a lost event."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.held = asyncio.Event()  # a poll is waiting for `flowing`
        self.hide: set[int] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        following = request.url.path == "/events" and request.url.params.get("wait") != "0"
        if following and not self.flowing.is_set():
            self.held.set()
            await self.flowing.wait()
        response = await self.inner.handle_async_request(request)
        if not following or not self.hide:
            return response
        page = json.loads(await response.aread())
        page["events"] = [e for e in page["events"] if e["seq"] not in self.hide]
        return httpx.Response(response.status_code, json=page)


async def test_a_hole_in_the_middle_of_a_feed_page_drops_the_services_entries(shop: Shop) -> None:
    """A page whose first seq follows the cursor but which lacks one further on is a gap: the book it hid is read anew."""
    feed = HeldFeed(shop.transports["catalog"])
    async with running_gateway(shop, {"catalog": feed}) as (client, app):
        feeds = app.state.gateway.feeds
        assert (await ask(client, BOOK, id="5"))["data"]["book"]["version"] == 1
        feed.flowing.clear()
        await asyncio.wait_for(feeds.reached("catalog", await patch_price(shop, 6, "6.66")), 10)
        await asyncio.wait_for(feed.held.wait(), 10)  # the next poll waits: the next three events make one page
        await patch_price(shop, 8, "8.88")
        feed.hide = {await patch_price(shop, 5, "5.55")}  # the page's middle event is lost
        last = await patch_price(shop, 9, "9.99")
        feed.flowing.set()
        await asyncio.wait_for(feeds.reached("catalog", last), 10)
        await shop.reset_stats()
        book = (await ask(client, BOOK, id="5"))["data"]["book"]
    assert (book["version"], book["price"]) == (2, {"amount": "5.55"})
    assert (await count_calls(shop))["catalog"] == 1


async def test_a_restarted_gateway_is_ready_only_once_its_feeds_have_caught_up(shop: Shop, namespace: str) -> None:
    """A book changed while no gateway ran: the next one answers /readyz 503 until its feed has applied that change, then serves it."""
    async with running_gateway(shop, redis_url=REDIS, cache_namespace=namespace) as (client, _):
        assert (await ask(client, BOOK, id="33"))["data"]["book"]["version"] == 1  # now in Redis too
    async with shop.client("catalog") as catalog:
        changed = await catalog.patch("/books/33", json={"title": "Changed while every gateway was down"})
        seq = int(changed.headers["x-feed-seq"])
    feed = HeldFeed(shop.transports["catalog"])
    feed.flowing.clear()  # the catch-up from the saved cursor takes its time
    async with running_gateway(shop, {"catalog": feed}, redis_url=REDIS, cache_namespace=namespace) as (client, app):
        await asyncio.wait_for(feed.held.wait(), 10)
        catching_up = await client.get("/readyz")
        assert catching_up.status_code == 503, catching_up.text
        assert catching_up.json()["feeds"]["catalog"] == {"status": "failing"}
        feed.flowing.set()
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
        book = (await ask(client, BOOK, id="33"))["data"]["book"]
    assert (book["title"], book["version"]) == ("Changed while every gateway was down", 2)


# -- TTL 0: always revalidate (README, "The versioned cache") -----------------------------------


async def test_a_ttl_of_0_reads_every_time_yet_serves_stale_when_the_service_fails(shop: Shop) -> None:
    """BOOKVAULT_CACHE_BOOK_TTL=0: each query asks the catalog; with the catalog failing, the kept book is served
    marked stale until max-stale, then null with the error."""
    clock = Clock()
    overrides = Settings.from_env({"BOOKVAULT_CACHE_BOOK_TTL": "0", "BOOKVAULT_CACHE_BOOK_MAX_STALE": "600"}).cache_overrides
    async with running_gateway(shop, wall_clock=clock, cache_overrides=overrides, service={"retries": 0}) as (client, _):
        fresh = [await ask(client, BOOK, id="2") for _ in range(3)]
        assert (await count_calls(shop))["catalog"] == 3  # never served from memory while the catalog answers
        await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/books"])
        clock.now += 30
        stale = await ask(client, BOOK, id="2")
        assert stale["data"] == fresh[0]["data"] and "errors" not in stale
        assert stale["extensions"]["stale"] == [{"path": ["book"], "service": "catalog", "version": 1, "ageMs": 30_000}]
        clock.now += 600
        gone = await ask(client, BOOK, id="2")
    assert gone["data"] == {"book": None} and gone["errors"][0]["extensions"]["code"] == "UPSTREAM_UNAVAILABLE"


# -- a paused Redis (issue 25: a request once waited 5.1 s) --------------------------------------


@pytest.fixture
def lost_cancellations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Redis read goes on reading when its caller is cancelled, as one does when
    Python 3.11's `asyncio.wait_for` drops a cancellation that arrives as the command's
    write completes (CPython gh-86296): the rare race behind the 5.1 s request, made certain."""
    read = Connection.read_response

    async def stubborn(self: Connection, *args: Any, **kwargs: Any) -> Any:
        reading = asyncio.ensure_future(read(self, *args, **kwargs))
        while True:
            try:
                return await asyncio.shield(reading)
            except asyncio.CancelledError:
                continue

    monkeypatch.setattr(Connection, "read_response", stubborn)


async def timed(call: Any) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def test_each_redis_client_gives_up_on_a_paused_redis_within_its_limit(lost_cancellations: None) -> None:
    """Redis SIGSTOPped, cancellations lost: L2 reads and writes, floor raises, persisted queries and the rate limit
    each give up within a few times the 50 ms limit (redis-py's 5 s socket timeout before), and answer from memory."""
    with own_redis() as (url, server):
        redis = RedisLevel(url, timeout=0.05, rest=0.0)
        cache = EntityCache(MemoryLevel(100), redis)
        store = QueryStore(10, url, timeout=0.05, rest=0.0)
        limiter = Limiter(RateLimit(rate=100.0, burst=100), url, timeout=0.05)
        policy = CachePolicy(0.0, 60.0)
        entry = Entry({"id": 1, "version": 1}, 1, time.time(), "catalog")
        try:
            await cache.put_many("book", "public", {1: entry}, policy)  # the pools hold live connections
            await store.put("ab" * 32, "{ book(id: 1) { id } }")
            assert await limiter.wait("a:test") == 0
            server.send_signal(signal.SIGSTOP)
            calls = {"l2.get": lambda: cache.get_many("book", "public", [1], policy),
                     "l2.put": lambda: cache.put_many("book", "public", {1: entry}, policy),
                     "floors": lambda: cache.invalidate_many([("book", 9, 2, 60.0)]),
                     "apq.get": lambda: store.get("cd" * 32),
                     "ratelimit": lambda: limiter.wait("a:test")}
            worst = {name: max(await asyncio.gather(*(timed(call()) for _ in range(10)))) for name, call in calls.items()}
            assert all(seconds < 0.5 for seconds in worst.values()), worst
            found, fresh = await cache.get_many("book", "public", [1], policy)
            assert found == {1: entry} and not fresh  # from memory
        finally:
            server.send_signal(signal.SIGCONT)
            await asyncio.gather(redis.close(), store.close(), limiter.aclose())


async def test_with_redis_paused_no_query_waits_past_the_redis_limit(shop: Shop, lost_cancellations: None) -> None:
    """Anonymous book queries whose entries are past their TTL, Redis SIGSTOPped: each is answered (from the catalog)
    in well under the 2 s deadline, however its Redis lookups are cancelled."""
    clock = Clock()
    with own_redis() as (url, server):
        # No floor channel: its subscription reads without a limit on purpose (and would not stop here).
        async with running_gateway(shop, wall_clock=clock, headers={}, redis_url=url, redis_timeout=0.05,
                                   redis_rest=0.0, floor_channel=False) as (client, _):
            ids = [str(i) for i in range(1, 21)]
            for book in ids:
                assert (await ask(client, BOOK, id=book))["data"]["book"]["id"] == book
            clock.now += 31  # past the books' TTL: each query looks in Redis before the catalog
            server.send_signal(signal.SIGSTOP)
            try:
                started = time.perf_counter()
                bodies = await asyncio.gather(*(ask(client, BOOK, id=book) for book in ids))
                elapsed = time.perf_counter() - started
            finally:
                server.send_signal(signal.SIGCONT)
    assert [body["data"]["book"]["id"] for body in bodies] == ids and not any("errors" in b for b in bodies)
    assert elapsed < 1.0, f"20 queries took {elapsed * 1000:.0f} ms with Redis paused"


async def test_a_feed_that_cannot_be_read_does_not_keep_the_gateway_unready(shop: Shop) -> None:
    """The catalog's feed failing from the start: /readyz still answers 200 (its entries are revalidated instead), and books are served."""
    await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/events"])
    async with running_gateway(shop, wait_feeds=False) as (client, _):
        async with asyncio.timeout(10):
            while (ready := await client.get("/readyz")).status_code != 200:  # what a load balancer does: ask again
                await asyncio.sleep(0.02)
        assert ready.json()["feeds"]["catalog"] == {"status": "ok"}
        assert (await ask(client, BOOK, id="34"))["data"]["book"]["version"] == 1
