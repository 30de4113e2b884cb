"""The change feed: long-poll wakes on a write, pages by seq, and survives a restart; its seqs are
dense and in commit order, with two writers on one database and after a writer is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest


async def test_long_poll_returns_as_soon_as_an_event_is_written(catalog):
    """A poll with wait=10 parks while nothing changes and answers right after a PATCH."""
    latest = (await catalog.get("/events")).json()["latest"]
    poll = asyncio.create_task(catalog.get("/events", params={"after": latest, "wait": 10}))
    # Nothing has changed, so the poll must still be waiting rather than answering empty.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(poll), 0.3)

    patched_at = time.monotonic()
    patched = await catalog.patch("/books/4", json={"title": "Woken"})
    response = await asyncio.wait_for(poll, 5)
    answered_after = time.monotonic() - patched_at

    assert answered_after < 2, f"the poll answered {answered_after:.2f}s after the write"
    body = response.json()
    assert [(e["entity"], e["id"], e["version"]) for e in body["events"]] == [("book", 4, patched.json()["version"])]
    assert body["next"] == body["latest"] == latest + 1


async def test_long_poll_with_nothing_new_answers_empty_after_the_wait(catalog):
    """With no change, a poll answers an empty page once its wait is over, next unchanged."""
    latest = (await catalog.get("/events")).json()["latest"]
    started = time.monotonic()
    body = (await catalog.get("/events", params={"after": latest, "wait": 0.3})).json()
    assert time.monotonic() - started >= 0.3
    assert body["events"] == []
    assert body["next"] == latest


async def test_feed_pages_by_seq_with_limit_and_next(catalog):
    """Reading on from `next` with a limit walks every event once, in seq order."""
    for n in range(5):
        await catalog.patch(f"/books/{n + 10}", json={"title": f"Paged {n}"})
    seen, after = [], 0
    while True:
        page = (await catalog.get("/events", params={"after": after, "limit": 2})).json()
        if not page["events"]:
            break
        assert len(page["events"]) <= 2
        seen += page["events"]
        after = page["next"]
    assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5]
    assert [e["id"] for e in seen] == [10, 11, 12, 13, 14]


async def test_data_and_feed_survive_a_restart(serve):
    """A new app on the same data dir serves the changed data and the same feed, and numbers on."""
    async with serve("catalog") as first:
        changed = (await first.patch("/books/6", json={"price": {"amount": "3.00", "currency": "EUR"}})).json()
        feed_before = (await first.get("/events", params={"after": 0})).json()

    async with serve("catalog") as second:
        assert (await second.get("/books/6")).json() == changed
        assert (await second.get("/events", params={"after": 0})).json() == feed_before
        # Not re-seeded: an untouched book is still at version 1 from the first start.
        assert (await second.get("/books/7")).json()["version"] == 1
        again = (await second.patch("/books/6", json={"title": "After restart"})).json()
        assert again["version"] == changed["version"] + 1
        events = (await second.get("/events", params={"after": 0})).json()["events"]
    assert [(e["seq"], e["version"]) for e in events] == [(1, 2), (2, 3)]


async def test_feed_accepts_any_seq_a_client_can_hold(catalog, error_of):
    """`after` takes any seq up to 2**53 (a client may be far ahead); past that it is a 400."""
    response = await catalog.get("/events", params={"after": 10**12})
    assert response.status_code == 200
    assert response.json()["events"] == [] and response.json()["next"] == 10**12
    assert error_of(await catalog.get("/events", params={"after": 2**53 + 1})) == (400, "BAD_REQUEST")


RESERVATIONS = 1600  # 200 per writer


# PostgreSQL only: a SQLite file has one writer, so its seqs are in commit order by nature;
# several apps on one PostgreSQL database are what a replicated service runs (issue 24).
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_two_writers_on_one_database_never_let_a_follower_skip_an_event(service):
    """Two inventory apps commit 3,200 events to one database while a follower reads `after=cursor`: it sees every one, no hole."""
    apps = [await service("inventory"), await service("inventory")]
    books = [range(1, 21), range(21, 41)]  # each app its own books: no row lock orders the two apps' writes
    for book in (*books[0], *books[1]):
        assert (await apps[0].patch(f"/stock/{book}", json={"available": 1_000_000})).status_code == 200
    start = (await apps[0].get("/events")).json()["latest"]
    reserved: list[int] = []
    writers = 4  # per app: each app's write lock is always wanted, so the two apps' commits interleave

    async def writer(app, mine: range, n: int) -> None:
        # A reservation commits two events (stock, reservation) and its key after them: the
        # longest write transaction a service has, the widest window for commits to cross.
        for k in range(RESERVATIONS // (2 * writers)):
            response = await app.post("/reservations", json={"items": [{"bookId": mine[k % len(mine)], "quantity": 1}]},
                                      headers={"Idempotency-Key": f"w{n}-{k}"})
            assert response.status_code == 201, response.text
            reserved.append(response.json()["id"])

    seen: list[dict] = []
    holes: list[tuple[int, list[int]]] = []
    written = asyncio.Event()

    async def follower() -> None:
        """As the gateway follows a feed: `after` its cursor, which moves to the page's `next`."""
        cursor, polls = start, 0
        while True:
            last_round = written.is_set()  # every write committed before this poll started
            page = (await apps[polls % 2].get("/events", params={"after": cursor, "limit": 20,
                                                                 "wait": 0 if last_round else 1})).json()
            polls += 1
            seqs = [e["seq"] for e in page["events"]]
            if seqs != list(range(cursor + 1, cursor + 1 + len(seqs))):
                holes.append((cursor, seqs))
            seen.extend(page["events"])
            cursor = page["next"]
            if last_round and not seqs:
                return

    following = asyncio.create_task(follower())
    try:
        await asyncio.gather(*(writer(apps[n % 2], books[n % 2], n) for n in range(2 * writers)))
        written.set()
        await asyncio.wait_for(following, 30)
    finally:
        following.cancel()

    committed, after = [], start
    while page := (await apps[0].get("/events", params={"after": after, "limit": 1000})).json()["events"]:
        committed += page
        after = page[-1]["seq"]
    missed = sorted({e["seq"] for e in committed} - {e["seq"] for e in seen})
    print(f"two writers: {len(committed)} events committed ({len(reserved)} reservations), "
          f"{len(seen)} seen by the follower, {len(missed)} missed, {len(holes)} pages with a hole")
    assert (len(reserved), len(committed), missed, holes) == (RESERVATIONS, 2 * RESERVATIONS, [], [])
    assert [e["seq"] for e in committed] == list(range(start + 1, start + 1 + 2 * RESERVATIONS))
    created = sorted(e["id"] for e in committed if e["type"] == "reservation.created")
    assert created == sorted(reserved)  # every acknowledged write's event, exactly once



@contextlib.asynccontextmanager
async def service_process(name: str, database: str, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m mock_services NAME` in a session of its own, killed with its group at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mock_services", name, "--port", str(port), "--database", database,
        stdout=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        async with httpx.AsyncClient(timeout=1) as client, asyncio.timeout(30):
            while True:  # uvicorn in another process offers nothing to await but its socket
                assert process.returncode is None, f"{name} exited while starting"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)


async def backend_waiting_for_a_lock(conn: asyncpg.Connection) -> int:
    """The pid of the backend of this database that waits for a row lock (a short bounded poll:
    another process's transaction offers nothing to await)."""
    async with asyncio.timeout(10):
        while (pid := await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")) is None:
            await asyncio.sleep(0.02)
    return int(pid)


# PostgreSQL only: the row lock that holds the writer mid-transaction is PostgreSQL's; a SQLite
# transaction cut short rolls its AUTOINCREMENT back with everything else.
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_writer_killed_mid_transaction_leaves_no_hole_in_the_feed(service, databases, unused_ports):
    """An inventory process SIGKILLed inside a reservation, after its first event: the feed goes on from the same seq, no false gap."""
    url = await databases.url("inventory")
    survivor = await service("inventory")  # a second app on the same database, writing on after the kill
    for book in (3, 4, 5):
        assert (await survivor.patch(f"/stock/{book}", json={"available": 10})).status_code == 200
    start = (await survivor.get("/events")).json()["latest"]
    blocker = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=5)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT 1 FROM stock WHERE book_id = 4 FOR UPDATE")
        port = unused_ports(1)[0]
        async with service_process("inventory", url, port) as process, httpx.AsyncClient(timeout=30) as client:
            # Books 3 then 4: book 3 is taken and its event emitted, then the writer waits for book 4's row.
            reserving = asyncio.create_task(client.post(f"http://127.0.0.1:{port}/reservations", json={
                "items": [{"bookId": 3, "quantity": 1}, {"bookId": 4, "quantity": 1}]}))
            killed_backend = await backend_waiting_for_a_lock(blocker)
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 10)
            with pytest.raises(httpx.TransportError):
                await reserving
        await holding.rollback()
        async with asyncio.timeout(10):  # PostgreSQL ends the dead client's backend, rolling it back
            while await blocker.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", killed_backend):
                await asyncio.sleep(0.02)
    finally:
        await blocker.close()
    held = [await survivor.post("/reservations", json={"items": [{"bookId": 5, "quantity": 1}]}) for _ in range(3)]
    assert [r.status_code for r in held] == [201] * 3
    events = (await survivor.get("/events", params={"after": start})).json()["events"]
    assert [e["seq"] for e in events] == list(range(start + 1, start + 7))  # no seq lost to the killed writer
    assert [(e["type"], e["id"]) for e in events[1::2]] == [("reservation.created", r.json()["id"]) for r in held]
    stock = (await survivor.get("/stock", params={"bookIds": "3,4,5"})).json()["data"]
    assert sorted((s["bookId"], s["available"]) for s in stock) == [(3, 10), (4, 10), (5, 7)]
