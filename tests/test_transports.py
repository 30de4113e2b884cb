"""One way in (gateway/pipeline.py): every transport a client may use — POST, GET, a browser's
GET, urql's Accept, graphql-sse, Apollo's multipart subscriptions, multipart @defer, a
graphql-transport-ws WebSocket — against every rule of the front door. Each refusal has the
same code whatever carried it, and nothing reaches a service. A new transport goes into
TRANSPORTS, and gets every rule's test."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from gateway.config import RateLimit
from shop import Shop, as_customer, on_a_real_port, running_gateway
from test_front_door import no_upstream_calls

URQL_ACCEPT = ("application/graphql-response+json, application/graphql+json, application/json, "
               "text/event-stream, multipart/mixed")  # @urql/core 6's default
APOLLO_SUBSCRIPTION = 'multipart/mixed;boundary="graphql";subscriptionSpec=1.0,application/json'
APOLLO_DEFER = "multipart/mixed;deferSpec=20220824,application/json"
Codes = list[str]


def _codes(body: Any) -> Codes:
    errors = body if isinstance(body, list) else (body.get("errors") or (body.get("payload") or {}).get("errors") or [])
    return [e.get("extensions", {}).get("code") for e in errors]


async def _http(url: str, params: dict[str, Any], headers: dict[str, str], accept: str, get: bool = False) -> Codes:
    async with httpx.AsyncClient(timeout=10, headers=headers | {"accept": accept}) as client:
        if get:
            answer = await client.get(f"{url}/graphql", params={k: v if isinstance(v, str) else json.dumps(v)
                                                                  for k, v in params.items()})
        else:
            answer = await client.post(f"{url}/graphql", json=params)
    media = answer.headers.get("content-type", "")
    if media.startswith("text/event-stream"):  # the refusal as graphql-sse's `next`, then `complete`
        events = re.findall(r"event: (\w+)\ndata: ?(.*)\n", answer.text)
        assert [e for e, _ in events] == ["next", "complete"], answer.text
        return _codes(json.loads(events[0][1]))
    assert media.startswith(("application/json", "application/graphql-response+json")), (media, answer.text[:300])
    return _codes(answer.json())


async def _websocket(url: str, params: dict[str, Any], headers: dict[str, str], accept: str) -> Codes:
    async with websockets.connect(url.replace("http", "ws") + "/graphql", subprotocols=["graphql-transport-ws"],
                                  open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": headers["authorization"]}}))
        assert json.loads(await ws.recv()) == {"type": "connection_ack"}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": params}))
        message = json.loads(await ws.recv())
        assert message["type"] == "error", message
        return _codes(message["payload"])


Transport = Callable[[str, dict[str, Any], dict[str, str]], Awaitable[Codes]]
TRANSPORTS: dict[str, Transport] = {
    "POST json": lambda u, p, h: _http(u, p, h, "application/json"),
    "POST graphql-response": lambda u, p, h: _http(u, p, h, "application/graphql-response+json"),
    "GET json": lambda u, p, h: _http(u, p, h, "application/json", get=True),
    "POST urql": lambda u, p, h: _http(u, p, h, URQL_ACCEPT),
    "POST graphql-sse": lambda u, p, h: _http(u, p, h, "text/event-stream"),
    "GET graphql-sse": lambda u, p, h: _http(u, p, h, "text/event-stream", get=True),
    "POST apollo multipart subscription": lambda u, p, h: _http(u, p, h, APOLLO_SUBSCRIPTION),
    "POST apollo @defer": lambda u, p, h: _http(u, p, h, APOLLO_DEFER),
    "WebSocket": lambda u, p, h: _websocket(u, p, h, ""),
}

SUBSCRIPTION = "subscription($id: ID!) { orderUpdated(id: $id) { id status } }"
DEEP = "{ customer(id: 7) { " + "orders { nodes { customer { " * 5 + "name" + " } } }" * 5 + " } }"  # 17 deep
# Each rule: the request, the code every transport must answer with, and the gateway's settings.
RULES: dict[str, tuple[dict[str, Any], str]] = {
    "introspection off": ({"query": "{ __schema { queryType { name } } }"}, "INTROSPECTION_DISABLED"),
    "introspection off (__type)": ({"query": '{ __type(name: "Book") { name } }'}, "INTROSPECTION_DISABLED"),
    "depth": ({"query": DEEP}, "DEPTH_LIMIT_EXCEEDED"),
    "validation": ({"query": "{ book(id: 1) { titel } }"}, "GRAPHQL_VALIDATION_FAILED"),
    "syntax": ({"query": "{ book(id: 1) { title }"}, "GRAPHQL_PARSE_FAILED"),
    "cost": ({"query": "query($ids: [ID!]!) { books(ids: $ids) { title } }",
              "variables": {"ids": [str(i) for i in range(1, 60)]}}, "COST_LIMIT_EXCEEDED"),
    "variables": ({"query": "query($id: ID!) { book(id: $id) { title } }", "variables": {}}, "BAD_USER_INPUT"),
    "subscription variables": ({"query": SUBSCRIPTION, "variables": {"id": []}}, "BAD_USER_INPUT"),
    "persisted query not found": ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "0" * 64}}},
                                  "PERSISTED_QUERY_NOT_FOUND"),
}
TRUSTED_RULES: dict[str, tuple[dict[str, Any], str]] = {
    "unlisted query": ({"query": "{ book(id: 1) { title } }"}, "PERSISTED_QUERY_NOT_LISTED"),
    "unlisted introspection": ({"query": "{ __schema { queryType { name } } }"}, "PERSISTED_QUERY_NOT_LISTED"),
    "unlisted subscription": ({"query": SUBSCRIPTION, "variables": {"id": "1"}}, "PERSISTED_QUERY_NOT_LISTED"),
    "unknown document id": ({"documentId": "f" * 64}, "PERSISTED_QUERY_NOT_LISTED"),
}


@contextlib.asynccontextmanager
async def gateway_on_a_port(shop: Shop, **settings: Any) -> AsyncIterator[str]:
    async with running_gateway(shop, follow_feeds=False, learn_limits=False, **settings) as (_, app), \
            on_a_real_port(app) as url:
        await shop.reset_stats()
        yield url


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A trusted-documents manifest listing one query (Apollo's persisted-query manifest)."""
    path = tmp_path / "manifest.json"
    body = "query Title { book(id: 1) { title } }"
    import hashlib

    path.write_text(json.dumps({"format": "apollo-persisted-query-manifest", "version": 1, "operations": [
        {"id": hashlib.sha256(body.encode()).hexdigest(), "name": "Title", "type": "query", "body": body}]}))
    return path


async def test_every_transport_refuses_what_the_rules_refuse_with_the_same_code(shop: Shop) -> None:
    """Introspection off, limits, validation, cost, variables, persisted queries: each transport answers the rule's code, and no service is called."""
    async with gateway_on_a_port(shop, introspection=False, max_cost=40) as url:
        seen = {}
        for transport, send in TRANSPORTS.items():
            for rule, (params, code) in RULES.items():
                seen[transport, rule] = await send(url, params, as_customer(7))
        assert await no_upstream_calls(shop)
    wrong = {key: codes for key, codes in seen.items() if RULES[key[1]][1] not in codes}
    assert not wrong, wrong


async def test_with_trusted_documents_every_transport_runs_only_listed_documents(shop: Shop, manifest: Path) -> None:
    """Trusted documents on, introspection off: an unlisted query, introspection or subscription is PERSISTED_QUERY_NOT_LISTED on every transport, with no upstream call."""
    async with gateway_on_a_port(shop, introspection=False, trusted_documents=str(manifest)) as url:
        seen = {}
        for transport, send in TRANSPORTS.items():
            for rule, (params, code) in TRUSTED_RULES.items():
                seen[transport, rule] = await send(url, params, as_customer(7))
        assert await no_upstream_calls(shop)
        # A browser's link opens GraphiQL and runs nothing, listed or not.
        async with httpx.AsyncClient(timeout=10) as client:
            page = await client.get(f"{url}/graphql", params={"query": "{ book(id: 1) { title } }"},
                                    headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code in (200, 503) and page.headers["content-type"].startswith("text/html")
        assert await no_upstream_calls(shop)
    wrong = {key: codes for key, codes in seen.items() if TRUSTED_RULES[key[1]][1] not in codes}
    assert not wrong, wrong


async def test_every_transport_counts_against_the_callers_rate_limit(shop: Shop) -> None:
    """With a burst of one, each transport's second operation from one caller is RATE_LIMITED, WebSocket messages included."""
    query = {"query": "{ book(id: 1) { title } }"}
    async with gateway_on_a_port(shop, rate_limit=RateLimit(rate=0.001, burst=1)) as url:
        refused = {}
        for index, (transport, send) in enumerate(TRANSPORTS.items()):
            caller = as_customer(100 + index)  # a budget of its own
            async with httpx.AsyncClient(timeout=10, headers=caller) as client:
                assert (await client.post(f"{url}/graphql", json=query)).json()["data"]["book"]["title"]
            refused[transport] = await send(url, query, caller)
    assert {t: codes for t, codes in refused.items() if codes != ["RATE_LIMITED"]} == {}


async def test_urqls_default_accept_gets_json_for_a_query(shop: Shop) -> None:
    """urql lists five types, event streams and multipart included: a query is answered as application/graphql-response+json."""
    async with gateway_on_a_port(shop) as url, httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{url}/graphql", json={"query": "{ book(id: 1) { title } }"},
                                   headers={"accept": URQL_ACCEPT})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/graphql-response+json")
    assert answer.json()["data"]["book"]["title"]
