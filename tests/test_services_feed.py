"""The change feed: long-poll wakes on a write, pages by seq, and survives a restart."""

from __future__ import annotations

import asyncio
import time

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
