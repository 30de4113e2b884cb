"""Fixtures for the services' tests: real apps on seeded data, reached over
httpx.ASGITransport, or over a real socket when a test needs one (hang, processes).

Every fixture that runs a service follows `backend`: each such test runs twice, `[sqlite]`
on a copy of SQLite files and `[postgresql]` on copies of PostgreSQL templates
(tests/backends.py), as the services run on both (README, "The services")."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ports import free_ports
from backends import BACKENDS, Postgres, ServiceDatabases, postgres_session, seed_sqlite, service_databases
from mock_services import SERVICES, create_app
from shop import gateway, namespace, on_a_real_port, shop  # noqa: F401  (fixtures for the gateway's tests)

Serve = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]
OpenService = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture(scope="session")
def seeded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six databases seeded once at scale 1; each test works on its own copy."""
    template = tmp_path_factory.mktemp("seeded")
    seed_sqlite(template)  # on its own thread and loop, so the test's event loop is left alone
    assert {p.name for p in template.glob("*.db")} == {f"{name}.db" for name in SERVICES}
    return template


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """Seeded template databases on 127.0.0.1:5432 for this session, dropped at its end."""
    with postgres_session() as pg:
        yield pg


@pytest.fixture
def data_dir(tmp_path: Path, seeded_dir: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(seeded_dir, target)
    return target


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database the services of a test run on; `backends.SQLITE_ONLY` narrows it."""
    return str(request.param)


@pytest.fixture
async def databases(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[ServiceDatabases]:
    """The test's own database per service: a copied SQLite file, or a PostgreSQL copy
    made on first use and dropped when the test ends."""
    if backend == "sqlite":
        context = service_databases(backend, data_dir=request.getfixturevalue("data_dir"))
    else:
        context = service_databases(backend, postgres=request.getfixturevalue("postgres"))
    async with context as databases:
        yield databases


@contextlib.asynccontextmanager
async def _serve(
    name: str, databases: ServiceDatabases, *, raise_app_exceptions: bool = True, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(SERVICES[name], database=await databases.url(name), **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{name}") as client:
            yield client


@pytest.fixture
def serve(databases: ServiceDatabases) -> Serve:
    """`async with serve("catalog", admin=True) as client:` runs one app for a block; a
    second block on the same name is a restart on the same database."""

    def serve_(name: str, **options: Any) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        return _serve(name, databases, **options)

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
    """`unused_ports(6)`: distinct free ports on 127.0.0.1, outside the ephemeral range (tests/ports.py)."""
    return free_ports


@pytest.fixture
async def live_service(databases: ServiceDatabases) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`url = await live_service("catalog", admin=True)`: the app on uvicorn on a real socket."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(name: str, **options: Any) -> str:
            app = create_app(SERVICES[name], database=await databases.url(name), **options)
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
