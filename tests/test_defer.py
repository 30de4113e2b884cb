"""@defer and @stream: the answer in parts over multipart/mixed (the deferSpec=20220824 format
Apollo Client and GraphiQL read), the initial part not waiting for what only deferred fields
need, a failing deferred part carrying its error at its path, @stream's first items."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shop import Shop, on_a_real_port, running_gateway

ACCEPT = "multipart/mixed;deferSpec=20220824, application/json"  # what Apollo Client 3 sends
ORDER_PAGE = """query($id: ID!) { order(id: $id) { id status customer { name }
  ... @defer(label: "later") { shipment { carrier trackingNumber } items { book { stock { available } } } } } }"""


@contextlib.asynccontextmanager
async def gateway_url(shop: Shop) -> AsyncIterator[str]:
    """A gateway on a real port (httpx's ASGI transport would hand over the body only whole)."""
    async with running_gateway(shop, follow_feeds=False, learn_limits=False) as (_, app), on_a_real_port(app) as url:
        yield f"{url}/graphql"


async def parts(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON parts of a multipart/mixed answer, each as soon as its delimiter has arrived."""
    assert response.headers["content-type"].startswith('multipart/mixed; boundary="-"')
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        while (end := buffer.find(b"\r\n---", 1)) != -1:
            part, buffer = buffer[:end], buffer[end + 5:]
            head, _, body = part.partition(b"\r\n\r\n")
            if body:
                assert b"content-type: application/json; charset=utf-8" in head.lower()
                yield json.loads(body)
    assert buffer == b"--\r\n"  # the closing delimiter, and nothing after it


def merged(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts put together as a client does: data merged in at each path, items appended."""
    result = {"data": payloads[0]["data"], "errors": list(payloads[0].get("errors", ()))}
    for payload in payloads[1:]:
        for entry in payload["incremental"]:
            *path, last = entry["path"] if "items" in entry else [*entry["path"], None]
            node = result["data"]
            for key in path:
                node = node[key]
            if "items" in entry:
                node[last:last + len(entry["items"])] = entry["items"]
            else:
                _merge(node, entry["data"])
            result["errors"] += entry.get("errors", [])
    return result


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            for a, b in zip(into[key], value):
                if isinstance(a, dict) and isinstance(b, dict):
                    _merge(a, b)
        else:
            into[key] = value


async def test_the_first_part_arrives_while_the_slowed_shipping_call_is_still_in_flight(shop: Shop) -> None:
    """With shipping slowed by 500 ms, the initial part is received while the shipments call is in flight; the deferred part brings it."""
    await shop.faults("shipping", latencyMs=500)
    async with gateway_url(shop) as url, httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url, json={"query": ORDER_PAGE, "variables": {"id": "4850"}},
                                 headers={"accept": ACCEPT}) as response:
            received = []
            async for payload in parts(response):
                if not received:
                    shipping = [r for r in await shop.stats("shipping") if r["route"] == "/shipments"]
                    assert len(shipping) == 1 and shipping[0]["end"] is None  # still in flight
                received.append(payload)
    first, *rest = received
    assert first["hasNext"] is True and "errors" not in first
    assert set(first["data"]["order"]) == {"id", "status", "customer"}
    assert [p["hasNext"] for p in rest] == [False]
    (entry,) = rest[0]["incremental"]
    assert entry["path"] == ["order"] and entry["label"] == "later"
    assert entry["data"]["shipment"]["carrier"]
    assert all("available" in item["book"]["stock"] for item in entry["data"]["items"])
