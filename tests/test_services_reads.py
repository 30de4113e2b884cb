"""Reads every service shares: single GET with ETag, batch GET with data/missing, maxBatch."""

from __future__ import annotations

import pytest

# service, batch path, batch parameter, the field the batch ids name, two ids that exist
BATCHES = [
    ("customers", "/customers", "ids", "id", (1, 2)),
    ("catalog", "/books", "ids", "id", (1, 2)),
    ("catalog", "/authors", "ids", "id", (1, 2)),
    ("inventory", "/stock", "bookIds", "bookId", (1, 2)),
    ("orders", "/orders", "ids", "id", (1, 2)),
    ("payments", "/payments", "orderIds", "orderId", (1, 2)),
    ("shipping", "/shipments", "orderIds", "orderId", (1, 2)),
]
SINGLES = [
    ("customers", "/customers/7"),
    ("catalog", "/books/7"),
    ("catalog", "/authors/7"),
    ("inventory", "/stock/7"),
    ("orders", "/orders/7"),
    ("payments", "/payments/7"),
    ("shipping", "/shipments/7"),
]
ABSENT = 999_999  # beyond the scale-1 demo data of every service


@pytest.mark.parametrize(("name", "path", "param", "key", "present"), BATCHES, ids=[b[1] for b in BATCHES])
async def test_batch_read_returns_found_and_lists_missing_once(service, name, path, param, key, present):
    """A batch answers the entities that exist and lists each missing id once."""
    client = await service(name)
    a, b = present
    response = await client.get(path, params={param: f"{b},{a},{b},{ABSENT},{a},{ABSENT}"})
    assert response.status_code == 200
    body = response.json()
    assert sorted(entity[key] for entity in body["data"]) == [a, b]
    assert body["missing"] == [ABSENT]
    # The batch answer is the same entity a single read gives.
    single = next(e for e in body["data"] if e[key] == a)
    if key == "orderId":  # payments and shipments are batched by order, read singly by own id
        assert (await client.get(f"{path}/{single['id']}")).json() == single
    else:
        assert (await client.get(f"{path}/{a}")).json() == single


@pytest.mark.parametrize(("name", "path", "param", "key", "present"), BATCHES, ids=[b[1] for b in BATCHES])
async def test_batch_over_advertised_max_batch_is_400(service, error_of, name, path, param, key, present):
    """GET /_meta advertises maxBatch 100; 100 ids are served, 101 are refused with 400."""
    client = await service(name)
    meta = (await client.get("/_meta")).json()
    assert meta["maxBatch"] == 100
    at_limit = await client.get(path, params={param: ",".join(str(i) for i in range(1, 101))})
    assert at_limit.status_code == 200
    assert len(at_limit.json()["data"]) + len(at_limit.json()["missing"]) == 100
    over = await client.get(path, params={param: ",".join(str(i) for i in range(1, 102))})
    assert error_of(over) == (400, "BAD_REQUEST")
    assert "100" in over.json()["error"]["message"]


async def test_max_batch_option_is_advertised_and_enforced(service, error_of):
    """A service started with max_batch=5 says so in /_meta and refuses a sixth id."""
    client = await service("catalog", max_batch=5)
    assert (await client.get("/_meta")).json() == {"service": "catalog", "maxBatch": 5, "entities": ["book", "author"]}
    assert (await client.get("/books?ids=1,2,3,4,5")).status_code == 200
    assert error_of(await client.get("/books?ids=1,2,3,4,5,6")) == (400, "BAD_REQUEST")


async def test_batch_of_only_missing_ids_is_200_with_empty_data(catalog):
    """Asking only for absent ids is not an error: data is empty, all are missing."""
    response = await catalog.get(f"/books?ids={ABSENT},{ABSENT + 1}")
    assert response.status_code == 200
    assert response.json() == {"data": [], "missing": [ABSENT, ABSENT + 1]}


@pytest.mark.parametrize(("name", "path"), SINGLES, ids=[s[1] for s in SINGLES])
async def test_single_read_sends_etag_and_honours_if_none_match(service, name, path):
    """A single read carries ETag W/"<version>"; sending it back gives 304 with no body."""
    client = await service(name)
    first = await client.get(path)
    assert first.status_code == 200
    assert first.headers["etag"] == f'W/"{first.json()["version"]}"'
    again = await client.get(path, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    # Weak comparison: the strong form of the same tag, or one of a list, matches too.
    strong = first.headers["etag"].removeprefix("W/")
    assert (await client.get(path, headers={"If-None-Match": strong})).status_code == 304
    assert (await client.get(path, headers={"If-None-Match": f'"nope", {strong}'})).status_code == 304
    assert (await client.get(path, headers={"If-None-Match": 'W/"999"'})).status_code == 200


async def test_etag_no_longer_matches_after_a_patch(catalog):
    """After a PATCH, the ETag a client cached gets a full 200 answer with the new ETag."""
    old = (await catalog.get("/books/3")).headers["etag"]
    patched = await catalog.patch("/books/3", json={"title": "Second Edition"})
    assert patched.headers["etag"] == 'W/"2"'
    response = await catalog.get("/books/3", headers={"If-None-Match": old})
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"' != old
    assert response.json()["title"] == "Second Edition"
    assert (await catalog.get("/books/3", headers={"If-None-Match": 'W/"2"'})).status_code == 304


@pytest.mark.parametrize(("name", "path"), SINGLES, ids=[s[1] for s in SINGLES])
async def test_single_read_of_absent_id_is_404(service, error_of, name, path):
    """An id that does not exist is a 404 NOT_FOUND with the error body."""
    client = await service(name)
    response = await client.get(path.rsplit("/", 1)[0] + f"/{ABSENT}")
    assert error_of(response) == (404, "NOT_FOUND")


async def test_books_come_with_their_authors_when_asked(service, error_of):
    """`/books?ids=…&include=author` carries each book's author under `included`, as `/authors` has it; a name it does not know is a 400."""
    client = await service("catalog")
    plain = (await client.get("/books", params={"ids": f"1,2,3,{ABSENT}"})).json()
    assert "included" not in plain
    body = (await client.get("/books", params={"ids": f"1,2,3,{ABSENT}", "include": "author"})).json()
    assert body["data"] == plain["data"] and body["missing"] == [ABSENT]
    author_ids = sorted({book["authorId"] for book in body["data"]})
    authors = (await client.get("/authors", params={"ids": ",".join(map(str, author_ids))})).json()["data"]
    assert sorted(body["included"]["author"], key=lambda a: a["id"]) == sorted(authors, key=lambda a: a["id"])
    assert error_of(await client.get("/books", params={"ids": "1", "include": "publisher"})) == (400, "BAD_REQUEST")
