"""Fixtures for the services' tests: real apps on seeded SQLite data, reached over
httpx.ASGITransport, or over a real socket when a test needs one (hang, processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mock_services import SERVICES, create_app
from shop import gateway, on_a_real_port, shop  # noqa: F401  (fixtures for the gateway's tests)

Serve = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]
OpenService = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture(scope="session")
def seeded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six databases seeded once at scale 1; each test works on its own copy."""
    template = tmp_path_factory.mktemp("seeded")

    async def seed_all() -> None:
        for spec in SERVICES.values():
            app = create_app(spec, data_dir=template)
            async with app.router.lifespan_context(app):
                pass

    # Its own thread and loop, so the test's event loop is left alone.
    worker = threading.Thread(target=asyncio.run, args=(seed_all(),))
    worker.start()
    worker.join()
    assert {p.name for p in template.glob("*.db")} == {f"{name}.db" for name in SERVICES}
    return template


@pytest.fixture
def data_dir(tmp_path: Path, seeded_dir: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(seeded_dir, target)
    return target


@contextlib.asynccontextmanager
async def _serve(
    name: str, data_dir: Path, *, raise_app_exceptions: bool = True, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(SERVICES[name], data_dir=data_dir, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{name}") as client:
            yield client


@pytest.fixture
def serve(data_dir: Path) -> Serve:
    """`async with serve("catalog", admin=True) as client:` runs one app for a block."""

    def serve_(name: str, **options: Any) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        return _serve(name, options.pop("data_dir", data_dir), **options)

    return serve_


@pytest.fixture
async def service(serve: Serve) -> AsyncIterator[OpenService]:
    """`client = await service("catalog")`: the app runs until the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_(name: str, **options: Any) -> httpx.AsyncClient:
            return await stack.enter_async_context(serve(name, **options))

        yield open_


@pytest.fixture
async def catalog(service: OpenService) -> httpx.AsyncClient:
    return await service("catalog")


@pytest.fixture
async def orders(service: OpenService) -> httpx.AsyncClient:
    return await service("orders")


@pytest.fixture
def unused_ports() -> Callable[[int], list[int]]:
    """`unused_ports(6)`: distinct free ports on 127.0.0.1 (held open together while chosen)."""

    def ports(count: int) -> list[int]:
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            return [int(sock.getsockname()[1]) for sock in sockets]

    return ports


@pytest.fixture
async def live_service(data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`url = await live_service("catalog", admin=True)`: the app on uvicorn on a real socket."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(name: str, **options: Any) -> str:
            app = create_app(SERVICES[name], data_dir=data_dir, **options)
            return await stack.enter_async_context(on_a_real_port(app, lifespan="on"))

        yield start


@pytest.fixture
def error_of() -> Callable[[httpx.Response], tuple[int, str]]:
    """The status and code of an error answer, once it is shown to have the one error shape."""

    def error_of_(response: httpx.Response) -> tuple[int, str]:
        body = response.json()
        assert set(body) == {"error"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        return response.status_code, body["error"]["code"]

    return error_of_


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never export to a collector a developer's shell points at: a test that needs
    an OTEL_* variable sets it itself."""
    for key in [key for key in os.environ if key.startswith("OTEL_")]:
        monkeypatch.delenv(key)
