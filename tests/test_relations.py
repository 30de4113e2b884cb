"""Relations are declarations the machinery follows for any schema: here a one-to-many
relation (the reviews of many books in one call) over a small schema and a stand-in
reviews service, through the real gateway app."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import strawberry

from gateway import Api, Binding, Relation, ServiceConfig, Settings, create_app, resolve

REVIEWS_OF = {1: [{"id": 10, "bookId": 1, "stars": 5}, {"id": 11, "bookId": 1, "stars": 3}], 2: [],
              3: [{"id": 12, "bookId": 3, "stars": 4}]}


@strawberry.type
class Review:
    id: strawberry.ID
    stars: int

    @classmethod
    def of(cls, p: dict[str, Any]) -> Review:
        return cls(id=strawberry.ID(str(p["id"])), stars=int(p["stars"]))


REVIEWS = Binding("review", "reviews", "/reviews", Review.of, param="bookIds", key="bookId", many=True, identity=None)


@strawberry.type
class Book:
    id: strawberry.ID

    @strawberry.field(metadata=Relation(REVIEWS, via="id").metadata())
    async def reviews(self, info: strawberry.Info) -> list[Review]:
        return await resolve(info, self)

    @classmethod
    def of(cls, p: dict[str, Any]) -> Book:
        return cls(id=strawberry.ID(str(p["id"])))


BOOK = Binding("book", "catalog", "/books", Book.of)


@strawberry.type
class Query:
    @strawberry.field(metadata=Relation(BOOK, arg="ids", many=True).metadata())
    def books(self, info: strawberry.Info, ids: list[strawberry.ID]) -> list[Book | None]:
        return resolve(info, ids=ids)


def _services(calls: list[str]) -> dict[str, httpx.MockTransport]:
    def catalog(request: httpx.Request) -> httpx.Response:
        ids = [int(i) for i in parse_qs(urlsplit(str(request.url)).query)["ids"][0].split(",")]
        return httpx.Response(200, json={"data": [{"id": i} for i in ids if i <= 3], "missing": []})

    def reviews(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        ids = [int(i) for i in parse_qs(urlsplit(str(request.url)).query)["bookIds"][0].split(",")]
        return httpx.Response(200, json={"data": [r for i in ids for r in REVIEWS_OF.get(i, [])], "missing": []})

    return {"catalog": httpx.MockTransport(catalog), "reviews": httpx.MockTransport(reviews)}


async def test_the_reviews_of_many_books_cost_one_call() -> None:
    """A one-to-many relation reads every book's reviews in one call, in the books' level; none is an empty list."""
    calls: list[str] = []
    services = {name: ServiceConfig(name=name, url=f"http://{name}") for name in ("catalog", "reviews")}
    app = create_app(Api(Query, (BOOK, REVIEWS)), Settings(services=services, follow_feeds=False, learn_limits=False),
                     transports=_services(calls))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            response = await client.post("/graphql", json={
                "query": '{ books(ids: ["1", "2", "3", "1"]) { id reviews { id stars } } }'})
    body = response.json()
    assert "errors" not in body, body
    assert [[r["stars"] for r in b["reviews"]] for b in body["data"]["books"]] == [[5, 3], [], [4], [5, 3]]
    (call,) = calls
    assert parse_qs(urlsplit(call).query)["bookIds"] == ["1,2,3"]
