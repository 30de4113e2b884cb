"""Fixtures for gateway tests: the six real service apps, in process, and a gateway in
front of them. Seeding runs once per session; each test gets its own copy of the files."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Settings, create_app
from gateway.config import ServiceConfig
from mock_services import SERVICES
from mock_services import create_app as create_service


@pytest.fixture(scope="session")
def seeded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seeded")

    async def seed() -> None:
        for spec in SERVICES.values():
            app = create_service(spec, data_dir=path)
            async with app.router.lifespan_context(app):
                pass

    asyncio.run(seed())
    return path


class Shop:
    """The running services, with the client a test uses to read their stats."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps
        self.transports = {name: httpx.ASGITransport(app=app) for name, app in apps.items()}

    def client(self, name: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transports[name], base_url=f"http://{name}")

    async def stats(self, name: str) -> list[dict[str, Any]]:
        async with self.client(name) as client:
            return (await client.get("/_admin/stats")).json()["requests"]

    async def calls(self) -> dict[str, list[dict[str, Any]]]:
        """Every service's recorded requests, feed polls left out."""
        return {name: [r for r in await self.stats(name) if r["route"] != "/events"] for name in self.apps}

    async def reset_stats(self) -> None:
        for name in self.apps:
            async with self.client(name) as client:
                await client.delete("/_admin/stats")

    async def faults(self, name: str, **faults: Any) -> None:
        async with self.client(name) as client:
            (await client.post("/_admin/faults", json=faults)).raise_for_status()


@contextlib.asynccontextmanager
async def running_shop(seeded_dir: Path, tmp_path: Path, **options: Any) -> AsyncIterator[Shop]:
    """The six services on a copy of the seeded data; `options` go to each service's app."""
    data = tmp_path / "data"
    shutil.copytree(seeded_dir, data)
    apps = {name: create_service(spec, data_dir=data, admin=True, **options) for name, spec in SERVICES.items()}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield Shop(apps)


@pytest.fixture
async def shop(seeded_dir: Path, tmp_path: Path) -> AsyncIterator[Shop]:
    async with running_shop(seeded_dir, tmp_path) as shop:
        yield shop


def settings_for(shop: Shop, **overrides: Any) -> Settings:
    services = {name: ServiceConfig(name=name, url=f"http://{name}", **overrides) for name in shop.apps}
    return Settings(services=services)


@contextlib.asynccontextmanager
async def gateway_client(shop: Shop, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A started gateway in front of `shop`; `options` go to `create_app`."""
    app = create_app(settings_for(shop), transports=shop.transports, **options)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


@pytest.fixture
async def gateway(shop: Shop) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(shop) as client:
        yield client
