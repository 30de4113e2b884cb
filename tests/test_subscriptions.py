"""Subscriptions (README, "Subscriptions"): real clients over real sockets, a WebSocket client
(graphql-transport-ws, the `websockets` package) and an SSE client (graphql-sse, httpx
streaming), against a gateway on uvicorn fed by the services' change feeds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from gateway.auth import mint
from shop import Shop, on_a_real_port, running_gateway
from live_auth import SECRET, authenticated

ORDER = "subscription($id: ID!) { orderUpdated(id: $id) { id status version customer { name } } }"


async def order_of(shop: Shop, status: str) -> dict[str, Any]:
    """An order in `status` from the seeded data."""
    async with shop.client("orders") as client:
        for start in range(1, 5000, 100):
            found = (await client.get("/orders", params={"ids": ",".join(map(str, range(start, start + 100)))})).json()
            for order in found["data"]:
                if order["status"] == status:
                    return order
    raise AssertionError(f"no {status} order in the seeded data")


async def patch(shop: Shop, order_id: int, status: str) -> int:
    """Change an order's status at the orders service; its new version."""
    async with shop.client("orders") as client:
        answer = await client.patch(f"/orders/{order_id}", json={"status": status})
        answer.raise_for_status()
        return int(answer.json()["version"])


def token(customer: int | None = None, staff: bool = False) -> str:
    return mint(SECRET, f"user-{customer or 'staff'}", customer=customer, scopes=["staff"] if staff else [])


@contextlib.asynccontextmanager
async def live(shop: Shop, **settings: Any) -> AsyncIterator[tuple[str, Any]]:
    """A gateway over `shop` on a real port (its URL and app), authenticating bearer tokens."""
    async with running_gateway(shop, **settings) as (_, app), authenticated(app) as served, \
            on_a_real_port(served) as url:
        yield url, app


class WsClient:
    """A graphql-transport-ws client on one connection."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, bearer: str | None = None, **options: Any) -> AsyncIterator[WsClient]:
        async with websockets.connect(url.replace("http", "ws") + "/graphql", subprotocols=["graphql-transport-ws"],
                                      **options) as connection:
            client = cls(connection)
            await client.send({"type": "connection_init", "payload": {"Authorization": f"Bearer {bearer}"} if bearer else {}})
            assert await client.receive() == {"type": "connection_ack"}
            yield client

    async def send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await self.connection.recv())
                if message["type"] == "ping":
                    await self.send({"type": "pong"})
                    continue
                return message

    async def subscribe(self, sid: str, query: str, **variables: Any) -> None:
        await self.send({"id": sid, "type": "subscribe", "payload": {"query": query, "variables": variables}})


@contextlib.asynccontextmanager
async def sse(url: str, query: str, bearer: str | None = None, **variables: Any) -> AsyncIterator[AsyncIterator[tuple[str, Any]]]:
    """An SSE stream (graphql-sse, distinct connections): yields its (event, data) pairs."""
    headers = {"accept": "text/event-stream"} | ({"authorization": f"Bearer {bearer}"} if bearer else {})
    async with httpx.AsyncClient(timeout=10) as client, client.stream(
            "POST", f"{url}/graphql", json={"query": query, "variables": variables}, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")

        async def events() -> AsyncIterator[tuple[str, Any]]:
            event, data = None, []
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    continue
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").strip())
                elif line == "" and event is not None:
                    yield event, json.loads("".join(data)) if "".join(data) else None
                    event, data = None, []

        yield events()


async def next_event(events: AsyncIterator[tuple[str, Any]]) -> tuple[str, Any]:
    async with asyncio.timeout(10):
        return await anext(events)  # noqa: F821 (a builtin since 3.10)


async def test_a_status_change_reaches_websocket_and_sse_subscribers_once_with_its_version(shop: Shop) -> None:
    """Both clients get the current order first, then the PATCHed status once, with the new version."""
    order = await order_of(shop, "PLACED")
    bearer = token(order["customerId"])
    async with live(shop) as (url, _), WsClient.connect(url, bearer) as ws, \
            sse(url, ORDER, bearer, id=str(order["id"])) as events:
        await ws.subscribe("1", ORDER, id=str(order["id"]))
        first_ws = await ws.receive()
        first_sse = await next_event(events)
        now = {"id": str(order["id"]), "status": "PLACED", "version": order["version"]}
        assert {k: first_ws["payload"]["data"]["orderUpdated"][k] for k in now} == now
        assert first_sse[0] == "next" and first_sse[1]["data"] == first_ws["payload"]["data"]
        version = await patch(shop, order["id"], "PAID")
        changed_ws, changed_sse = await ws.receive(), await next_event(events)
        for payload in (changed_ws["payload"], changed_sse[1]):
            assert payload["data"]["orderUpdated"]["status"] == "PAID"
            assert payload["data"]["orderUpdated"]["version"] == version == order["version"] + 1
        with pytest.raises(TimeoutError):  # once: nothing else follows
            async with asyncio.timeout(0.5):
                await ws.connection.recv()
