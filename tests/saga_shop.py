"""Helpers for the checkout tests: the five services a checkout touches, on the test's
backend (conftest's `databases`), the orders service calling the others in process; and the
invariant every saga test checks after its scenario (`assert_consistent`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from backends import ServiceDatabases
from mock_services import SERVICES, create_app
from shop import on_a_real_port

__all__ = ["ADDRESS", "SAGA_SERVICES", "CheckoutShop", "Read", "assert_consistent", "checkout_body", "checkout_shop",
           "database_urls", "reader", "running_checkout_shop"]

SAGA_SERVICES = ("catalog", "inventory", "payments", "shipping", "orders")
ADDRESS = {"name": "Ada Okafor", "street": "Keizersgracht 1", "city": "Amsterdam", "postalCode": "1015", "country": "NL"}


class CheckoutShop:
    """The running services; `client(name)` talks to one in process."""

    def __init__(self, apps: dict[str, Any], served: dict[str, ASGIApp] | None = None) -> None:
        self.apps = apps
        self.served = served or {}  # the apps served on a real socket, as served (`on_sockets`)

    def client(self, name: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.apps[name]), base_url=f"http://{name}", timeout=30)

    async def read(self, service: str, path: str, **params: str) -> Any:
        """A 200 answer's body, read through the service's own API."""
        async with self.client(service) as client:
            response = await client.get(path, params=params or None)
        assert response.status_code == 200, response.text
        return response.json()

    async def faults(self, name: str, **faults: Any) -> None:
        async with self.client(name) as client:
            (await client.post("/_admin/faults", json=faults)).raise_for_status()

    async def available(self, *books: int) -> list[int]:
        async with self.client("inventory") as client:
            data = (await client.get("/stock", params={"bookIds": ",".join(map(str, books))})).json()["data"]
        by_id = {s["bookId"]: s["available"] for s in data}
        return [by_id[b] for b in books]

    async def set_stock(self, book: int, available: int) -> None:
        async with self.client("inventory") as client:
            (await client.patch(f"/stock/{book}", json={"available": available})).raise_for_status()


@contextlib.asynccontextmanager
async def running_checkout_shop(urls: dict[str, str], *,
                                on_sockets: Mapping[str, Callable[[ASGIApp], ASGIApp]] | None = None,
                                **orders_options: Any) -> AsyncIterator[CheckoutShop]:
    """`on_sockets`: services the orders service calls over a real socket, so that its httpx
    timeouts apply, each served wrapped in what is given (CheckoutShop.served keeps it)."""
    apps = {name: create_app(SERVICES[name], database=urls[name], admin=True)
            for name in SAGA_SERVICES if name != "orders"}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        wrapped = {name: wrap(apps[name]) for name, wrap in (on_sockets or {}).items()}
        served = {name: await stack.enter_async_context(on_a_real_port(app)) for name, app in wrapped.items()}
        options = {"transports": {name: httpx.ASGITransport(app=app) for name, app in apps.items() if name not in served},
                   "urls": served, "retry_backoff_s": 0.001, "saga_resume_s": 3600, **orders_options}
        apps["orders"] = create_app(SERVICES["orders"], database=urls["orders"], admin=True, options=options)
        await stack.enter_async_context(apps["orders"].router.lifespan_context(apps["orders"]))
        yield CheckoutShop(apps, wrapped)


def checkout_body(items: list[tuple[int, int]], method: str = "card", customer: int = 7) -> dict[str, Any]:
    return {"customerId": customer, "items": [{"bookId": b, "quantity": q} for b, q in items],
            "shippingAddress": ADDRESS, "paymentMethod": method}


@pytest.fixture
async def database_urls(databases: ServiceDatabases) -> dict[str, str]:
    """Each saga service's database URL on the test's backend (conftest's `databases`)."""
    return await databases.urls(*SAGA_SERVICES)


@pytest.fixture
async def checkout_shop(database_urls: dict[str, str]) -> AsyncIterator[CheckoutShop]:
    async with running_checkout_shop(database_urls) as shop:
        yield shop


# `read(service, path, **params)`: a 200 answer's body (CheckoutShop.read, or `reader` over URLs).
Read = Callable[..., Awaitable[Any]]


def reader(clients: dict[str, httpx.AsyncClient]) -> Read:
    """A `Read` through clients of services that run elsewhere (real processes)."""

    async def read(service: str, path: str, **params: str) -> Any:
        response = await clients[service].get(path, params=params or None)
        assert response.status_code == 200, response.text
        return response.json()

    return read


async def assert_consistent(read: Read, order_id: int, checkout_id: int | None = None) -> None:
    """The order's status agrees with what the other services hold for it (issue 24), each read
    through its own API; with its checkout, the saga's record and reservation too:

    - PENDING: its checkout is still RUNNING or COMPENSATING (nothing else is settled yet);
    - PAID, SHIPPED, DELIVERED: exactly one live payment, CAPTURED, of the order's total; a
      checkout's: COMPLETED, one shipment not cancelled, its reservation CONFIRMED;
    - CANCELLED: no payment CAPTURED or PENDING, no shipment but cancelled ones, the
      reservation neither HELD nor CONFIRMED, the checkout settled with nothing owed;
    - PLACED (never checked out): no live payment, no shipment, no reservation held.
    """
    order = await read("orders", f"/orders/{order_id}")
    payments = (await read("payments", "/payments", orderIds=str(order_id)))["data"]
    shipments = (await read("shipping", "/shipments", orderIds=str(order_id)))["data"]
    checkout = await read("orders", f"/checkouts/{checkout_id}") if checkout_id is not None else None
    reserved = checkout and checkout["reservationId"]
    reservation = (await read("inventory", f"/reservations/{reserved}"))["status"] if reserved else None
    status = order["status"]
    state = {"order": status, "payments": [(p["status"], p["amount"]) for p in payments],
             "shipments": [s["status"] for s in shipments], "reservation": reservation,
             "checkout": checkout and (checkout["status"], checkout["compensationsOwed"])}
    live_payments = [p for p in payments if p["status"] in ("PENDING", "CAPTURED")]
    live_shipments = [s for s in shipments if s["status"] != "CANCELLED"]
    if checkout is not None:
        assert checkout["orderId"] == order_id, state
        if status == "PENDING":
            assert checkout["status"] in ("RUNNING", "COMPENSATING"), state
            return  # under way: the test checks again once it settled
        assert checkout["status"] in ("COMPLETED", "CANCELLED") and checkout["compensationsOwed"] == [], state
    if status in ("PAID", "SHIPPED", "DELIVERED"):
        assert [(p["status"], p["amount"]) for p in live_payments] == [("CAPTURED", order["total"])], state
        if checkout is not None:
            assert checkout["status"] == "COMPLETED" and reservation == "CONFIRMED" and len(live_shipments) == 1, state
    elif status == "CANCELLED":
        assert live_payments == [] and live_shipments == [] and reservation not in ("HELD", "CONFIRMED"), state
    elif status == "PLACED":
        assert live_payments == [] and shipments == [] and checkout is None, state
    else:
        raise AssertionError(f"order {order_id} is {status} with no checkout settled: {state}")
