"""Each service's GET /openapi.json is a valid OpenAPI 3.1 document, and real responses match it."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.response.exceptions import DataValidationError, InvalidData
from openapi_spec_validator import validate as validate_document

from backends import SQLITE_ONLY
from mock_services import SERVICES

SHARED_PATHS = {"/healthz", "/_meta", "/events", "/openapi.json"}
PATHS = {
    "customers": {"/customers", "/customers/{id}"},
    "catalog": {"/books", "/books/{id}", "/authors", "/authors/{id}"},
    "inventory": {"/stock", "/stock/{bookId}", "/reservations", "/reservations/{id}", "/reservations/{id}/confirm",
                  "/reservations/{id}/release"},
    "orders": {"/orders", "/orders/{id}", "/orders/{id}/cancel", "/checkouts", "/checkouts/{id}"},
    "payments": {"/payments", "/payments/{id}", "/payments/{id}/refund", "/payment-voids"},
    "shipping": {"/shipments", "/shipments/{id}", "/shipments/{id}/cancel"},
}
ITEM = {"bookId": 3, "quantity": 2, "unitPrice": {"amount": "4.50", "currency": "EUR"}, "titleAtPurchase": "A"}
# (method, path, JSON body, expected status)
EXCHANGES = {
    "customers": [
        ("GET", "/customers/3", None, 200), ("GET", "/customers?ids=3,4,999999", None, 200),
        ("PATCH", "/customers/3", {"tier": "gold"}, 200), ("PATCH", "/customers/3", {"tier": "x"}, 400),
        ("PATCH", "/customers/999999", {"tier": "gold"}, 404),
    ],
    "catalog": [
        ("GET", "/books/3", None, 200), ("GET", "/books?ids=3,4,999999", None, 200), ("GET", "/books/0", None, 400),
        ("GET", "/authors/3", None, 200), ("GET", "/authors?ids=3,999999", None, 200), ("GET", "/authors/999999", None, 404),
        ("PATCH", "/books/3", {"price": {"amount": "9", "currency": "EUR"}}, 200), ("PATCH", "/books/3", {"x": 1}, 400),
        ("GET", "/books?ids=" + ",".join(map(str, range(1, 102))), None, 400),
    ],
    "inventory": [
        ("GET", "/stock/3", None, 200), ("GET", "/stock?bookIds=3,999999", None, 200),
        ("PATCH", "/stock/3", {"available": 0}, 200), ("PATCH", "/stock/3", {"available": -2}, 400),
        ("PATCH", "/stock/4", {"available": 5}, 200),
        ("POST", "/reservations", {"items": [{"bookId": 4, "quantity": 2}]}, 201),
        ("POST", "/reservations", {"items": [{"bookId": 3, "quantity": 1}]}, 409),
        ("GET", "/reservations/1", None, 200), ("POST", "/reservations/1/confirm", None, 200),
        ("POST", "/reservations/1/release", None, 200), ("POST", "/reservations/99/confirm", None, 404),
    ],
    "orders": [
        ("GET", "/orders/3", None, 200), ("GET", "/orders?ids=3,999999", None, 200),
        ("GET", "/orders?customerId=25&limit=3", None, 200), ("GET", "/orders?customerId=25&after=bad", None, 400),
        ("GET", "/orders?customerIds=25,1,999999,25&limit=3", None, 200), ("GET", "/orders?customerIds=999999", None, 200),
        ("GET", "/orders?ids=999999", None, 200), ("GET", "/orders?customerIds=25&after=bad", None, 400),
        ("GET", "/orders?customerIds=25&ids=3", None, 400),
        ("POST", "/orders", {"customerId": 25, "items": [ITEM]}, 201), ("POST", "/orders", {"customerId": 25, "items": []}, 400),
        ("PATCH", "/orders/4994", {"status": "PAID"}, 200), ("PATCH", "/orders/3", {"status": "PLACED"}, 409),
        ("GET", "/orders/999999", None, 404),
    ],
    "payments": [
        ("GET", "/payments/3", None, 200), ("GET", "/payments?orderIds=3,4994", None, 200), ("GET", "/payments/x", None, 400),
        ("POST", "/payments", {"orderId": 7001, "amount": {"amount": "5", "currency": "EUR"}, "method": "card"}, 201),
        ("POST", "/payments", {"orderId": 7002, "amount": {"amount": "5", "currency": "EUR"}, "method": "card-declined"}, 402),
        ("POST", "/payments/3/refund", None, 200),
        ("POST", "/payment-voids", {"key": "k", "payment": {"orderId": 7003, "amount": {"amount": "5", "currency": "EUR"},
                                                             "method": "card"}}, 200),
    ],
    "shipping": [
        ("GET", "/shipments/3", None, 200), ("GET", "/shipments?orderIds=3,4994", None, 200),
        ("GET", "/shipments/999999", None, 404),
        ("POST", "/shipments", {"orderId": 7001, "address": {"name": "A", "street": "B", "city": "C", "postalCode": "1",
                                                             "country": "NL"}}, 201),
    ],
}
SHARED_EXCHANGES = [
    ("GET", "/healthz", None, 200), ("GET", "/_meta", None, 200), ("GET", "/events?after=0", None, 200),
    ("GET", "/events?after=0&limit=1", None, 200), ("GET", "/events?limit=0", None, 400),
]
SINGLE = {"customers": "/customers/3", "catalog": "/books/3", "inventory": "/stock/3", "orders": "/orders/3",
          "payments": "/payments/3", "shipping": "/shipments/3"}


def check_response(api: OpenAPI, response: httpx.Response) -> None:
    """Validate an httpx response against the document, as openapi-core sees a request/response pair."""
    request = response.request
    api.validate_response(
        MockRequest(f"{request.url.scheme}://{request.url.netloc.decode()}", request.method, request.url.path,
                    args=dict(request.url.params), data=request.content,
                    content_type=request.headers.get("content-type", "application/json")),
        MockResponse(response.content, response.status_code, dict(response.headers),
                     response.headers.get("content-type", "")),
    )


@pytest.mark.parametrize("name", sorted(SERVICES))
@SQLITE_ONLY  # the document is made from the models alone: the database behind it cannot change it
async def test_openapi_document_is_valid_and_lists_every_route(service, name):
    """The document passes the OpenAPI 3.1 validator and describes each route the service serves."""
    client = await service(name)
    document = (await client.get("/openapi.json")).json()
    validate_document(document)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == PATHS[name] | SHARED_PATHS


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_real_responses_match_the_openapi_document(service, name):
    """Single, batch, 304, errors, feed, orders page(s), 201: every answer is one the document allows."""
    client = await service(name)
    api = OpenAPI.from_dict((await client.get("/openapi.json")).json())
    for method, path, body, status in EXCHANGES[name] + SHARED_EXCHANGES:
        response = await client.request(method, path, json=body)
        assert response.status_code == status, (method, path, response.text)
        check_response(api, response)
    etag = (await client.get(SINGLE[name])).headers["etag"]
    not_modified = await client.get(SINGLE[name], headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    check_response(api, not_modified)


@SQLITE_ONLY  # checks the check itself, on responses it makes up
async def test_validation_rejects_a_response_that_breaks_the_document(catalog):
    """The check above can fail: a book without its version, or a body that is not JSON, is rejected."""
    api = OpenAPI.from_dict((await catalog.get("/openapi.json")).json())
    response = await catalog.get("/books/3")
    check_response(api, response)
    book = copy.deepcopy(response.json())
    del book["version"]
    broken = httpx.Response(200, json=book, request=response.request)
    with pytest.raises(InvalidData, match="version"):
        check_response(api, broken)
    truncated = httpx.Response(200, content=json.dumps(book)[:20].encode(), request=response.request,
                               headers={"content-type": "application/json"})
    with pytest.raises(DataValidationError, match="deserialize"):
        check_response(api, truncated)
