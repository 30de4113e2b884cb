"""Remembered answers (gateway/memo.py): a warm query asked again by the same caller with the
same variables is answered from its kept answer, and only while each entity it was made of is
still the one in memory and fresh."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.consistency import TOKEN_HEADER
from shop import Shop, as_customer, running_gateway

HISTORY = """query($id: ID!) { customer(id: $id) { name orders(first: 20) { nodes { id
  items { book { title price { amount } author { name } stock { available } } } payment { status } shipment { status } } } } }"""
BOOK = "query($id: ID!) { book(id: $id) { id title version price { amount } } }"
SEVEN = as_customer(7)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def ask(client: httpx.AsyncClient, query: str, headers: dict[str, str], **variables: Any) -> httpx.Response:
    response = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert response.status_code == 200, response.text
    return response


async def calls(shop: Shop) -> int:
    made = sum(len(reqs) for reqs in (await shop.calls()).values())
    await shop.reset_stats()
    return made


def remembered(app: Any) -> int:
    """Answers the gateway keeps (white-box: that the way under test was taken at all)."""
    return len(app.state.gateway.source.memos)


def book_hits(text: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "bookvault_cache_requests_total" and s.labels == {"entity": "book", "level": "l1", "result": "hit"})


async def test_a_repeated_warm_history_is_the_same_answer_counted_as_the_same_reads(shop: Shop) -> None:
    """Asked again, a warm history is answered without a call, equal, with the same token and cache hits."""
    async with running_gateway(shop, headers={}) as (client, app):
        cold = await ask(client, HISTORY, SEVEN, id="7")
        await shop.reset_stats()
        answers, hits = [], [book_hits((await client.get("/metrics")).text)]
        for _ in range(3):  # warm (then kept), then twice from the kept answer
            answers.append(await ask(client, HISTORY, SEVEN, id="7"))
            hits.append(book_hits((await client.get("/metrics")).text))
        assert remembered(app) == 1
        assert await calls(shop) == 0
    assert all(a.json()["data"] == cold.json()["data"] for a in answers) and "errors" not in cold.json()
    # The kept JSON is the shaped answer's, byte for byte (the extensions, a trace id, differ).
    assert len({a.content.partition(b',"extensions":')[0] for a in answers}) == 1
    assert len({a.headers[TOKEN_HEADER] for a in answers}) == 1  # the same feed positions reflected
    per_answer = [after - before for before, after in zip(hits, hits[1:])]
    assert per_answer[0] > 0 and len(set(per_answer)) == 1  # a kept answer counts its books as hits too


async def test_a_change_event_shows_in_the_next_answer_of_a_kept_query(shop: Shop) -> None:
    """A price changed at the catalog is in the next answer, though the same query was kept before."""
    async with running_gateway(shop, headers={}) as (client, app):
        for _ in range(3):
            before = (await ask(client, BOOK, SEVEN, id="8")).json()["data"]["book"]
        assert remembered(app) == 1
        async with shop.client("catalog") as catalog:
            (await catalog.patch("/books/8", json={"price": {"amount": "12.34", "currency": "EUR"}})).raise_for_status()
            seq = (await catalog.get("/events?after=0&limit=1")).json()["latest"]
        await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 10)
        after = (await ask(client, BOOK, SEVEN, id="8")).json()["data"]["book"]
    assert after["price"] == {"amount": "12.34"} and after["version"] == before["version"] + 1


async def test_a_kept_answer_is_never_given_to_another_caller(shop: Shop) -> None:
    """Customer 7's kept history is not customer 8's answer (FORBIDDEN), nor an anonymous caller's."""
    async with running_gateway(shop, headers={}) as (client, app):
        for _ in range(3):
            mine = (await ask(client, HISTORY, SEVEN, id="7")).json()
        assert remembered(app) == 1
        theirs = (await ask(client, HISTORY, as_customer(8), id="7")).json()
        anonymous = (await ask(client, HISTORY, {}, id="7")).json()
    assert mine["data"]["customer"]["name"]
    assert theirs["data"]["customer"] is None and theirs["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert anonymous["data"]["customer"] is None and anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_kept_answer_lasts_no_longer_than_its_entities_ttl(shop: Shop) -> None:
    """Past a book's TTL, a kept answer is not given: the book is read again from the catalog."""
    clock = Clock()
    async with running_gateway(shop, headers={}, wall_clock=clock, cache_overrides={"book": (30.0, 600.0)}) as (client, app):
        for _ in range(3):
            first = (await ask(client, BOOK, SEVEN, id="9")).json()
        assert remembered(app) == 1
        await shop.reset_stats()
        clock.now += 29
        assert (await ask(client, BOOK, SEVEN, id="9")).json()["data"] == first["data"]
        assert await calls(shop) == 0
        clock.now += 2  # past the TTL
        assert (await ask(client, BOOK, SEVEN, id="9")).json()["data"] == first["data"]
        assert await calls(shop) == 1


async def test_other_variables_get_their_own_answers(shop: Shop) -> None:
    """The same query with another id is another answer, each kept for its own variables."""
    async with running_gateway(shop, headers={}) as (client, app):
        for _ in range(2):
            eight = (await ask(client, BOOK, SEVEN, id="8")).json()["data"]["book"]
            nine = (await ask(client, BOOK, SEVEN, id="9")).json()["data"]["book"]
        assert remembered(app) == 2
    assert (eight["id"], nine["id"]) == ("8", "9")


def test_kept_answers_are_bounded_in_number_and_in_entities() -> None:
    """Past either bound the least recently given answers go first: memory stays bounded."""
    from gateway.memo import Memos
    from gateway.plan import Plan
    from gateway.source import Peeked

    class Reader:
        traced, caller = False, None

        @staticmethod
        def again(reads: Any) -> bool:
            return True

    def reads(entities: int) -> list[Peeked]:
        return [Peeked(None, "public", None, list(range(entities)), [None] * entities, (entities,), 0)]  # type: ignore[arg-type]

    plan, memos = Plan((), ()), Memos(max_answers=2, max_entities=1000)
    for name in "ab":
        memos.remember(plan, name, {"answer": name}, reads(3))
    assert memos.recall(plan, "a", Reader()) is not None  # given: now the most recent
    memos.remember(plan, "c", {"answer": "c"}, reads(3))  # a third answer: "b" goes
    assert [k for k in "abc" if memos.recall(plan, k, Reader()) is not None] == ["a", "c"]
    assert memos.recall(Plan((), ()), "a", Reader()) is None  # another plan's key is not this one's

    memos = Memos(max_answers=10, max_entities=10)
    for name in "abc":  # 4 entities each: the third passes 10, and the first answer goes
        memos.remember(plan, name, {"answer": name}, reads(4))
    assert [k for k in "abc" if memos.recall(plan, k, Reader()) is not None] == ["b", "c"]
