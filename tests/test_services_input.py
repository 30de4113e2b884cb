"""Bad input: a clear {"error": {"code", "message"}} with a 4xx, nothing written, never a 500."""

from __future__ import annotations

import itertools
import json
from urllib.parse import quote

import pytest

ITEM = {"bookId": 3, "quantity": 1, "unitPrice": {"amount": "9.99", "currency": "EUR"}, "titleAtPurchase": "A"}
ONE_HUNDRED_AND_ONE = ",".join(str(i) for i in range(1, 102))


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


# (service, method, path, body, status, code); a str body is sent as is, anything else as JSON.
BAD = [
    ("catalog", "GET", "/books/abc", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books/0", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books/-3", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books/1.5", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books?ids=1,x", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books?ids=2,-1", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books?ids=", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/books?ids=1,,2", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", f"/books?ids={ONE_HUNDRED_AND_ONE}", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/authors?ids=1.0", None, 400, "BAD_REQUEST"),
    ("inventory", "GET", "/stock?bookIds=0", None, 400, "BAD_REQUEST"),
    ("payments", "GET", "/payments?orderIds=one", None, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", "this is not json", 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", "[1, 2]", 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", "", 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"subtitle": "x"}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"title": "ok", "isbn": "123"}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"title": 5}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"title": None}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"price": None}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"title": "Nul\u0000Byte"}, 400, "BAD_REQUEST"),  # PostgreSQL text cannot hold it
    ("catalog", "PATCH", "/books/1", {"price": {"amount": "-1.00", "currency": "EUR"}}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"price": {"amount": 12.5, "currency": "EUR"}}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/1", {"price": {"amount": "1.999", "currency": "EUR"}}, 400, "BAD_REQUEST"),
    ("catalog", "PATCH", "/books/999999", {"title": "x"}, 404, "NOT_FOUND"),
    ("catalog", "PATCH", "/books/abc", {"title": "x"}, 400, "BAD_REQUEST"),
    ("inventory", "PATCH", "/stock/1", {"available": -1}, 400, "BAD_REQUEST"),
    ("inventory", "PATCH", "/stock/1", {"available": "3"}, 400, "BAD_REQUEST"),
    ("inventory", "PATCH", "/stock/1", {"available": 3.5}, 400, "BAD_REQUEST"),
    ("inventory", "PATCH", "/stock/1", {"available": True}, 400, "BAD_REQUEST"),
    ("inventory", "PATCH", "/stock/1", {"available": None}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"email": "not-an-address"}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"tier": "platinum"}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"name": "Ada\u0000"}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"email": "ada\u0000@example.com"}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"version": 7}, 400, "BAD_REQUEST"),
    ("customers", "PATCH", "/customers/1", {"name": "Ok", "id": 2}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", "{not json", 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": []}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [_without(ITEM, "titleAtPurchase")]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [_without(ITEM, "unitPrice")]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [{**ITEM, "quantity": -1}]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [{**ITEM, "quantity": 0}]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [
        {**ITEM, "unitPrice": {"amount": "-5", "currency": "EUR"}}]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [
        ITEM, {**ITEM, "unitPrice": {"amount": "5", "currency": "USD"}}]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 0, "items": [ITEM]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 10**30, "items": [ITEM]}, 400, "BAD_REQUEST"),
    ("orders", "POST", "/orders", {"customerId": 1, "items": [ITEM], "status": "PAID"}, 400, "BAD_REQUEST"),
    ("orders", "PATCH", "/orders/1", {"status": "CANCELLED"}, 409, "CONFLICT"),  # 1 is DELIVERED
    ("orders", "PATCH", "/orders/4994", {"status": "DELIVERED"}, 409, "CONFLICT"),  # PLACED skips ahead
    ("orders", "PATCH", "/orders/4994", {"status": "PLACED"}, 409, "CONFLICT"),
    ("orders", "PATCH", "/orders/4994", {"status": "LOST"}, 400, "BAD_REQUEST"),
    ("orders", "PATCH", "/orders/999999", {"status": "PAID"}, 404, "NOT_FOUND"),
    ("orders", "GET", "/orders?customerId=1&after=not-a-cursor", None, 400, "BAD_REQUEST"),
    ("orders", "GET", "/orders?customerId=1&ids=2", None, 400, "BAD_REQUEST"),
    ("orders", "GET", "/orders?customerId=1&limit=0", None, 400, "BAD_REQUEST"),
    ("orders", "GET", "/orders?customerIds=1,2&customerId=1", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/events?after=-1", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/events?wait=forever", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/events?limit=5000", None, 400, "BAD_REQUEST"),
    ("catalog", "GET", "/nowhere", None, 404, "NOT_FOUND"),
    ("catalog", "DELETE", "/books/1", None, 405, "METHOD_NOT_ALLOWED"),
]


def _send(client, method: str, path: str, body):
    if body is None:
        return client.request(method, path)
    content = body if isinstance(body, str) else json.dumps(body)
    return client.request(method, path, content=content, headers={"content-type": "application/json"})


async def _state(client, path: str, method: str):
    """What a bad request must not change: the feed's head and the entity it named."""
    latest = (await client.get("/events")).json()["latest"]
    witness = path if method == "PATCH" else "/orders?customerId=1" if method == "POST" else None
    return latest, (await client.get(witness)).text if witness else None


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "code"), BAD,
                         ids=[f"{m} {p[:40]} {json.dumps(b)[:60] if b is not None else ''}" for _, m, p, b, *_ in BAD])
async def test_bad_input_gets_error_body_and_writes_nothing(service, error_of, name, method, path, body, status, code):
    """Each bad request is refused with its 4xx and the error body, and changes nothing."""
    client = await service(name)
    before = await _state(client, path, method)
    response = await _send(client, method, path, body)
    assert error_of(response) == (status, code)
    assert await _state(client, path, method) == before


GARBAGE = ["", " ", "0", "-1", "0.0", "1e3", "0x1F", "١", "１", "99999999999999999999999", "9" * 400, "%00",
           "a", "null", "[]", "{}", "1;DROP TABLE books", "'", '"', "%ff", "1,", ",1", "1, 2", "😀", "\u0000", "1\n"]
JSON_GARBAGE = [None, -1, 0, 1.5, -0.0, "", "x", "😀" * 300, "\u0000", [], {}, [1], True, 10**30, -(10**30), 1e308,
                {"amount": "1", "currency": "EUR"}, {"amount": "-1", "currency": "EUR"}]
RAW_BODIES = ["", "null", "1", '"s"', "[]", "{", "}", '{"a":', "\ufeff{}", '{"title": NaN}', '{"a":1}' * 3, "[" * 2000]
FIELDS = {
    "customers": ("/customers", "ids", ["name", "email", "tier"], "/customers/{}", None),
    "catalog": ("/books", "ids", ["title", "price"], "/books/{}", None),
    "inventory": ("/stock", "bookIds", ["available"], "/stock/{}", None),
    "orders": ("/orders", "ids", ["status"], "/orders/{}", "/orders"),
    "payments": ("/payments", "orderIds", [], "/payments/{}", None),
    "shipping": ("/shipments", "orderIds", [], "/shipments/{}", None),
}


def _garbage_requests(name: str):
    collection, param, fields, single, create = FIELDS[name]
    for g in GARBAGE:
        yield "GET", single.format(quote(g, safe="")), None
        yield "GET", collection, {param: g}
        for key in ("after", "limit", "wait"):
            yield "GET", "/events", {key: g}
        if create:
            for key in ("customerId", "limit", "after"):
                yield "GET", collection, {"customerId": "1", key: g} if key != "customerId" else {key: g}
            yield "GET", collection, {"customerIds": g}
            yield "GET", collection, {"customerIds": "1,2", "limit": g}
    for raw in RAW_BODIES:
        if fields:
            yield "PATCH", single.format(1), raw
        if create:
            yield "POST", create, raw
    for field, value in itertools.product(fields, JSON_GARBAGE):
        yield "PATCH", single.format(4994 if name == "orders" else 1), json.dumps({field: value})
    if create:
        for value in JSON_GARBAGE:
            yield "POST", create, json.dumps({"customerId": value, "items": [ITEM]})
            yield "POST", create, json.dumps({"customerId": 1, "items": value})
            for field in ITEM:
                yield "POST", create, json.dumps({"customerId": 1, "items": [{**ITEM, field: value}]})


@pytest.mark.parametrize("name", sorted(FIELDS))
async def test_no_garbage_input_gives_a_500(service, error_of, name):
    """A sweep of garbage ids, parameters and bodies never gets a 500; every refusal has the error body."""
    client = await service(name, raise_app_exceptions=False)
    failures = []
    count = 0
    for method, path, data in _garbage_requests(name):
        count += 1
        if isinstance(data, dict):
            response = await client.request(method, path, params=data)
        else:
            response = await client.request(method, path, content=data)
        if response.status_code >= 500:
            failures.append((method, path, data, response.status_code))
        elif response.status_code >= 400:
            error_of(response)
    assert count > 100
    assert failures == []


async def test_documented_findings_hold(catalog):
    """Allow lists every method of a path; any documented `wait` is accepted; 19-digit ids and null titles are refused as documented."""
    options = await catalog.options("/books/1")
    assert options.status_code == 405
    assert {m.strip() for m in options.headers["allow"].split(",")} == {"GET", "HEAD", "PATCH"}
    assert (await catalog.get("/events", params={"after": "0", "limit": "1", "wait": "1e-3"})).status_code == 200
    document = (await catalog.get("/openapi.json")).json()
    assert document["paths"]["/books/{id}"]["get"]["parameters"][0]["schema"]["pattern"] == "^[1-9][0-9]{0,17}$"
    assert (await catalog.get("/books/" + "1" * 19)).status_code == 400
    assert document["components"]["schemas"]["BookPatch"]["properties"]["title"]["type"] == "string"
    assert (await catalog.patch("/books/1", json={"title": None})).status_code == 400
