"""Consistency across gateway instances: tokens (monotonic reads, read-your-writes), floor raises
shared over Redis pub/sub, no old version after a Redis pause, payments following their events.

Two gateway instances in one test share a redis-server the test starts itself (own port), so
pausing it disturbs nobody; one instance's change feed lags (`SlowFeed`) where a lagging
instance is the point."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx
import redis.asyncio as aioredis

from gateway.cache import FORMAT, CachePolicy, Entry, EntityCache, MemoryLevel, RedisLevel
from gateway.config import ResilienceConfig
from gateway.consistency import TOKEN_COOKIE, TOKEN_HEADER
from shop import Shop, SlowFeed, as_customer, own_redis, running_gateway

BOOK = 'query($id: ID!) { book(id: $id) { id version price { amount } } }'


async def read_book(client: httpx.AsyncClient, book: int, token: str | None = None) -> tuple[int, str]:
    """The book's version as the gateway answers it, and the token of the answer."""
    headers = {TOKEN_HEADER: token} if token else {}
    response = await client.post("/graphql", json={"query": BOOK, "variables": {"id": str(book)}}, headers=headers)
    client.cookies.clear()  # the jar would echo the token by itself: each test says what it sends
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]["book"]["version"], response.headers[TOKEN_HEADER]


async def patch_book(shop: Shop, book: int, amount: str) -> tuple[int, int]:
    """Change a book's price at the catalog: its new version, and the feed position of the write."""
    async with shop.client("catalog") as client:
        response = await client.patch(f"/books/{book}", json={"price": {"amount": amount, "currency": "EUR"}})
        response.raise_for_status()
        return response.json()["version"], int(response.headers["x-feed-seq"])


async def test_readers_echoing_the_token_never_see_a_version_go_back(shop: Shop) -> None:
    """Thousands of reads through two instances (one with a lagging feed) during random writes: 0 regressions with the token."""
    books = [1, 2, 3, 4]
    written: dict[tuple[int, int], float] = {}  # (book, version) -> when the write returned
    stop = asyncio.Event()
    with own_redis() as (url, _):
        # A generous deadline: everything here shares one event loop, and this test is about
        # versions, not about answering in time on a loaded machine.
        slack, patient = ResilienceConfig(deadline=10.0), {"read_timeout": 8.0}
        async with running_gateway(shop, redis_url=url, resilience=slack, service=patient) as (a, _), \
                running_gateway(shop, {"catalog": SlowFeed(shop.transports["catalog"], 0.2)}, redis_url=url,
                                floor_channel=False, resilience=slack, service=patient) as (b, app_b):
            instances = [a, b]

            async def writer(seed: int) -> None:
                rng = random.Random(seed)
                for n in range(40):
                    book = rng.choice(books)
                    version, _ = await patch_book(shop, book, f"{rng.randint(1, 99)}.{n:02d}")
                    written[(book, version)] = time.monotonic()
                    await asyncio.sleep(rng.uniform(0.01, 0.06))  # pacing the load, not waiting for anything

            async def reader(seed: int, echo: bool) -> tuple[int, int, list[float]]:
                rng = random.Random(seed)
                seen: dict[int, int] = {}
                token: str | None = None
                reads, regressions, lags = 0, 0, []
                while not stop.is_set():
                    book = rng.choice(books)
                    started = time.monotonic()
                    version, answered = await read_book(rng.choice(instances), book, token if echo else None)
                    reads += 1
                    token = answered
                    if version < seen.get(book, 0):
                        regressions += 1
                        # How long the version served had been superseded when the read began (a read
                        # that began before the write may answer either version, however long it takes).
                        lags.append(max(0.0, started - written.get((book, version + 1), started)))
                    seen[book] = max(seen.get(book, 0), version)
                    # Pacing: eight readers that never pause starve this loop's feed followers,
                    # and the lag measured below would be the test's, not the gateway's.
                    await asyncio.sleep(0.003)
                return reads, regressions, lags

            readers = [asyncio.create_task(reader(i, echo=i % 2 == 0)) for i in range(8)]
            await asyncio.gather(*(writer(100 + i) for i in range(3)))
            stop.set()
            results = await asyncio.gather(*readers)
            counts = dict(app_b.state.gateway.consistency.counts)
    echoing = [r for i, r in enumerate(results) if i % 2 == 0]
    others = [r for i, r in enumerate(results) if i % 2 == 1]
    assert sum(r[0] for r in results) >= 1000
    assert sum(r[1] for r in echoing) == 0
    # Without the token, an older version is served only while the lagging feed is behind.
    assert max((lag for r in others for lag in r[2]), default=0.0) < 3.0  # 0.2 s of lag, on a loaded machine
    assert counts["waited"] + counts["bypassed"] > 0  # the lagging instance did catch up for tokens


async def test_a_read_with_the_token_of_a_write_sees_the_write_on_a_lagging_instance(shop: Shop) -> None:
    """After a PATCH, a read naming the write's feed position through an instance whose feed lags 1 s shows the new version."""
    with own_redis() as (url, _):
        async with running_gateway(shop, {"catalog": SlowFeed(shop.transports["catalog"], 1.0)}, redis_url=url,
                                   floor_channel=False, consistency_wait=1.9) as (b, app):
            consistency = app.state.gateway.consistency
            before, _ = await read_book(b, 7)
            version, seq = await patch_book(shop, 7, "17.00")
            assert version == before + 1
            assert (await read_book(b, 7))[0] == before  # no token: the lagging instance still serves its entry
            seen, token = await read_book(b, 7, consistency.encode({"catalog": seq}))
            assert seen == version and consistency.counts["waited"] == 1
            assert consistency.decode(token)["catalog"] >= seq


async def test_a_token_the_instance_has_reached_is_answered_from_its_cache(shop: Shop) -> None:
    """Echoing the token (header or cookie) of what the instance already applied costs no call: the cached entry answers."""
    async with running_gateway(shop) as (client, app):
        consistency = app.state.gateway.consistency
        _, seq = await patch_book(shop, 6, "16.00")  # the catalog's feed has a position to name
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        version, token = await read_book(client, 5)
        assert consistency.decode(token)["catalog"] >= seq
        await shop.reset_stats()
        assert await read_book(client, 5, token) == (version, token)
        client.cookies.set(TOKEN_COOKIE, token, path="/graphql")
        response = await client.post("/graphql", json={"query": BOOK, "variables": {"id": "5"}})
        assert response.json()["data"]["book"]["version"] == version
        assert (await shop.calls())["catalog"] == []
        assert consistency.counts["current"] == 2 and consistency.counts["bypassed"] == 0


async def test_an_instance_that_cannot_catch_up_in_time_reads_past_its_caches(shop: Shop) -> None:
    """With no time to wait for its feed, a lagging instance asks the catalog, and answers the written version."""
    with own_redis() as (url, _):
        async with running_gateway(shop, {"catalog": SlowFeed(shop.transports["catalog"], 1.0)}, redis_url=url,
                                   floor_channel=False, consistency_wait=0.0) as (b, app):
            consistency = app.state.gateway.consistency
            await read_book(b, 8)
            version, seq = await patch_book(shop, 8, "18.00")
            await shop.reset_stats()
            seen, _ = await read_book(b, 8, consistency.encode({"catalog": seq}))
            assert seen == version and consistency.counts["bypassed"] == 1
            assert [c["route"] for c in (await shop.calls())["catalog"]] == ["/books"]


async def test_tampered_and_malformed_tokens_are_ignored(shop: Shop) -> None:
    """A token that is not the deployment's (bad MAC, garbage, other services, an oversized cookie) is ignored, never an error."""
    async with running_gateway(shop) as (client, app):
        consistency = app.state.gateway.consistency
        good = consistency.encode({"catalog": 1})
        flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
        for token in (flipped, "!!!not-base64!!!", "", "x" * 5000, good[:5]):
            client.cookies.set(TOKEN_COOKIE, token or "%%%")
            response = await client.post("/graphql", json={"query": BOOK, "variables": {"id": "3"}},
                                         headers={TOKEN_HEADER: token} if token else {})
            client.cookies.clear()
            assert response.status_code == 200 and response.json()["data"]["book"]["id"] == "3"
            assert consistency.decode(response.headers[TOKEN_HEADER]) is not None
        assert consistency.counts["ignored"] >= 4 and consistency.counts["bypassed"] == 0


async def test_a_position_beyond_the_services_feed_is_dropped_from_the_token(shop: Shop) -> None:
    """A validly signed token naming a seq the catalog never wrote costs one read past the cache, then is forgotten."""
    async with running_gateway(shop, consistency_wait=0.0) as (client, app):
        consistency = app.state.gateway.consistency
        _, answered = await read_book(client, 3, consistency.encode({"catalog": 10**9}))
        assert consistency.counts["refuted"] == 1
        assert consistency.decode(answered).get("catalog", 0) < 10**9


async def test_the_token_comes_back_as_an_httponly_cookie_for_browsers(shop: Shop) -> None:
    """Every answer sets the token as a cookie (HttpOnly, SameSite=Lax, Path=/graphql), and a cookie is honoured like the header."""
    async with running_gateway(shop, consistency_wait=0.0) as (client, app):
        response = await client.post("/graphql", json={"query": BOOK, "variables": {"id": "5"}})
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{TOKEN_COOKIE}={response.headers[TOKEN_HEADER]};")
        assert {"HttpOnly", "SameSite=lax", "Path=/graphql"} <= {p.strip() for p in cookie.split(";")}
        client.cookies.clear()
        forged = app.state.gateway.consistency.encode({"catalog": 10**9})
        client.cookies.set(TOKEN_COOKIE, forged)
        await client.post("/graphql", json={"query": BOOK, "variables": {"id": "5"}})
        assert app.state.gateway.consistency.counts["refuted"] == 1  # read from the cookie


async def test_floor_raises_reach_an_instance_whose_own_feed_lags(shop: Shop) -> None:
    """Through Redis pub/sub, an instance whose own feed lags 6 s serves a change well before its feed has it."""
    with own_redis() as (url, _):
        async with running_gateway(shop, redis_url=url) as (_, app_a), \
                running_gateway(shop, {"catalog": SlowFeed(shop.transports["catalog"], 6.0)},
                                redis_url=url) as (b, app_b):
            await read_book(b, 9)
            version, seq = await patch_book(shop, 9, "19.00")
            written = time.monotonic()
            await asyncio.wait_for(app_a.state.gateway.feeds.reached("catalog", seq), 5)
            seen = 0
            while seen < version and time.monotonic() - written < 5:
                seen, _ = await read_book(b, 9)  # no token: only the published floor can tell B
            assert seen == version and time.monotonic() - written < 3.0  # B's own feed needs 6 s
            assert app_b.state.gateway.feeds.cursors["catalog"] < seq and app_b.state.gateway.cache.heard >= 1


async def test_after_a_redis_pause_no_instance_serves_a_version_older_than_its_feed_announced(shop: Shop) -> None:
    """Books changed while Redis was paused: after it resumes, neither instance nor a new one serves the old versions."""
    books = [61, 62, 63, 64, 65]
    namespace = f"bvtest-{uuid.uuid4().hex[:8]}"
    with own_redis() as (url, server):
        # Feed pages every 0.5 s at most: each one tries the repair (`FeedFollower.settled`).
        with_redis = {"redis_url": url, "redis_rest": 0.1, "redis_timeout": 0.2, "cache_namespace": namespace,
                      "feed_wait": 0.5}
        async with running_gateway(shop, **with_redis) as (a, app_a), running_gateway(shop, **with_redis) as (b, app_b):
            for client in (a, b):
                for book in books:
                    assert (await read_book(client, book))[0] == 1  # in both L1s and in Redis
            server.send_signal(signal.SIGSTOP)
            try:
                announced: dict[int, int] = {}
                for book in books:
                    announced[book], seq = await patch_book(shop, book, "6.50")
                for app in (app_a, app_b):
                    await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
                assert not app_b.state.gateway.cache.settled  # its floor raises wait for Redis
            finally:
                server.send_signal(signal.SIGCONT)
            for _ in range(20):
                for book in books:
                    for client in (b, a):
                        assert (await read_book(client, book))[0] == announced[book]
            for app in (app_b, app_a):
                await asyncio.wait_for(app.state.gateway.feeds.settled(), 10)
        store = aioredis.from_url(url)
        floors = [await store.hget(f"{namespace}:{FORMAT}:book:{book}", "_floor") for book in books]
        await store.aclose()
        assert floors == [b"2"] * len(books)  # Redis was told of every raise it missed
        async with running_gateway(shop, redis_url=url, cache_namespace=namespace) as (c, _):
            for book in books:
                assert (await read_book(c, book))[0] == announced[book]


async def test_a_feed_gap_drops_the_entries_in_redis_but_keeps_their_floors() -> None:
    """After a gap drops the books, Redis still refuses a book older than the version announced
    before it: a read in flight cannot write the old version back for other instances."""
    with own_redis() as (url, _):
        redis = RedisLevel(url, timeout=2.0)
        cache = EntityCache(MemoryLevel(100), redis)
        key, keep = cache.key("book", 7), 3600.0
        await cache.put_many("book", "", {7: Entry({"id": 7}, 2, time.time(), "catalog")}, CachePolicy(30.0, keep))
        await cache.invalidate("book", 7, 3, keep)
        await cache.drop("catalog", ["book"])
        late = Entry({"id": 7}, 2, time.time(), "catalog")
        assert await redis.put_many({key: late}, "", keep) == 0
        assert await redis.put_many({key: replace(late, version=3)}, "", keep) == 1
        assert [e.version if e else None for e in await redis.get_many([key], "")] == [3]
        await redis.close()


async def captured_payment(shop: Shop) -> dict[str, Any]:
    async with shop.client("payments") as client:
        payments = (await client.get("/payments", params={"orderIds": ",".join(map(str, range(1, 101)))})).json()
    return next(p for p in payments["data"] if p["status"] == "CAPTURED")


async def test_a_refund_is_served_through_a_warm_cache_within_one_feed_round_trip(shop: Shop) -> None:
    """A payment cached under its order's id is refetched once its refund event arrives, long before its 15 s TTL."""
    payment = await captured_payment(shop)
    query = '{ order(id: %d) { payment { status } } }' % payment["orderId"]
    alice = as_customer(None, staff=True, subject="alice")
    async with running_gateway(shop) as (client, app):
        for _ in range(2):
            body = (await client.post("/graphql", json={"query": query}, headers=alice)).json()
            assert body["data"]["order"]["payment"]["status"] == "CAPTURED"
        await shop.reset_stats()
        async with shop.client("payments") as payments:
            refund = await payments.post(f"/payments/{payment['id']}/refund", headers={"Idempotency-Key": uuid.uuid4().hex})
            assert refund.status_code == 200
        await asyncio.wait_for(app.state.gateway.feeds.reached("payments", int(refund.headers["x-feed-seq"])), 10)
        body = (await client.post("/graphql", json={"query": query}, headers=alice)).json()
        assert body["data"]["order"]["payment"]["status"] == "REFUNDED"
        assert [c["route"] for c in (await shop.calls())["payments"]] == ["/payments/{id}/refund", "/payments"]
