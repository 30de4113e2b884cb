"""Helpers for the checkout tests: the five services a checkout touches, on the test's
backend (conftest's `databases`), the orders service calling the others in process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backends import ServiceDatabases
from mock_services import SERVICES, create_app

__all__ = ["ADDRESS", "SAGA_SERVICES", "CheckoutShop", "checkout_body", "checkout_shop", "database_urls",
           "running_checkout_shop"]

SAGA_SERVICES = ("catalog", "inventory", "payments", "shipping", "orders")
ADDRESS = {"name": "Ada Okafor", "street": "Keizersgracht 1", "city": "Amsterdam", "postalCode": "1015", "country": "NL"}


class CheckoutShop:
    """The running services; `client(name)` talks to one in process."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps

    def client(self, name: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.apps[name]), base_url=f"http://{name}", timeout=30)

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
async def running_checkout_shop(urls: dict[str, str], **orders_options: Any) -> AsyncIterator[CheckoutShop]:
    apps = {name: create_app(SERVICES[name], database=urls[name], admin=True)
            for name in SAGA_SERVICES if name != "orders"}
    options = {"transports": {name: httpx.ASGITransport(app=app) for name, app in apps.items()},
               "retry_backoff_s": 0.001, "saga_resume_s": 3600, **orders_options}
    apps["orders"] = create_app(SERVICES["orders"], database=urls["orders"], admin=True, options=options)
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield CheckoutShop(apps)


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
