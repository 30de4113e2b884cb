"""The services' databases in tests, on either backend the services run on (README, "The
services"): copies of SQLite files seeded once per session, or PostgreSQL databases on
127.0.0.1:5432 cloned from templates seeded once per session (CREATE DATABASE ... TEMPLATE,
a copy of files, far cheaper than seeding), one per test and service, dropped after the
test; none is left when the session ends."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mock_services import SERVICES, create_app, database_url

__all__ = ["BACKENDS", "PG_ADMIN", "SQLITE_ONLY", "Postgres", "ServiceDatabases", "postgres_session", "run_in_thread",
           "seed_sqlite", "service_databases", "sqlite_urls"]

BACKENDS = ("sqlite", "postgresql")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# For a test that is about SQLite itself (a file, a data directory): conftest's `backend`
# fixture, which every service fixture follows, then runs it on SQLite alone. Say why where used.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])
# Creating a database copies the template's files; on a loaded machine that can take seconds.
PG_TIMEOUT_S = 60
SPARES = 3  # ready copies of each service's template
PARALLEL = 4  # CREATE/DROP DATABASE statements at once


def run_in_thread(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on its own loop in its own thread (session fixtures, outside a test's loop)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0] if result else None


async def _seed(urls: dict[str, str]) -> None:
    """Each service's first start creates its tables and demo data (scale 1)."""
    for name, url in urls.items():
        app = create_app(SERVICES[name], database=url)
        async with app.router.lifespan_context(app):
            pass


def seed_sqlite(directory: Path) -> None:
    run_in_thread(lambda: _seed(sqlite_urls(directory)))


def sqlite_urls(data_dir: Path) -> dict[str, str]:
    return {name: database_url(name, data_dir) for name in SERVICES}


class Postgres:
    """Databases of one test session, named bv_<session>_...: a seeded template per service,
    and the copies tests take of them. CREATE DATABASE ... TEMPLATE and DROP DATABASE run on
    a thread and loop of their own, a few at a time (a copy mostly waits for its files to be
    synced, so several at once go about as fast as one): SPARES copies of each service are
    kept ready while tests run (taking one orders the next), and a test's copies are dropped
    after it, so a test seldom waits for either. `close` waits for all of it and drops
    whatever is left, spares and templates included."""

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex[:10]
        self.templates: dict[str, str] = {}
        self._created: list[str] = []  # touched on the admin loop only
        self._spares: dict[str, collections.deque[concurrent.futures.Future[str]]] = {}
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._pool: asyncpg.Pool | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="postgres-admin", daemon=True)
        self._thread.start()

    @staticmethod
    def url(name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"

    def _submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _sql(self, *statements: str) -> None:
        """On the admin loop: statements in order, on one of a few connections."""
        assert self._pool is not None, "seeded_templates opens the pool"
        async with self._pool.acquire(timeout=PG_TIMEOUT_S) as conn:
            for statement in statements:
                await conn.execute(statement, timeout=PG_TIMEOUT_S)

    def seeded_templates(self) -> None:
        """One seeded database per service, the template of every copy; the first spares of each."""

        async def seed() -> None:
            self._pool = await asyncpg.create_pool(PG_ADMIN, min_size=0, max_size=PARALLEL, timeout=5)
            names = {service: f"bv_{self.session}_tmpl_{service}" for service in SERVICES}
            for name in names.values():
                await self._sql(f'CREATE DATABASE "{name}"')
                self._created.append(name)
            await _seed({service: self.url(name) for service, name in names.items()})
            self.templates = names

        self._submit(seed()).result()
        self._spares = {service: collections.deque(self._submit(self._copy(service)) for _ in range(SPARES))
                        for service in SERVICES}

    async def _copy(self, service: str) -> str:
        name = f"bv_{self.session}_{uuid.uuid4().hex[:8]}_{service}"
        await self._sql(f'CREATE DATABASE "{name}" TEMPLATE "{self.templates[service]}"')
        self._created.append(name)
        return self.url(name)

    async def copy(self, service: str) -> str:
        """A fresh copy of the service's seeded template, for the calling test alone: its URL."""
        spares = self._spares[service]
        spare = spares.popleft()
        spares.append(self._submit(self._copy(service)))
        return await asyncio.wrap_future(spare)

    def drop(self, *urls: str) -> None:
        """Drop a test's copies, off its path (`close` waits for it)."""
        names = [url.rsplit("/", 1)[1] for url in urls]

        async def drop() -> None:
            # FORCE: a process the test killed (the crash tests) may not have said goodbye yet.
            await self._sql(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names))
            self._created = [name for name in self._created if name not in names]

        self._pending = [f for f in self._pending if not f.done()] + [self._submit(drop())]

    def close(self) -> None:
        async def drop_all() -> None:
            if self._pool is None:
                return
            # Every drop is tried, even when one fails; the first failure is raised after.
            failures = [r for r in await asyncio.gather(*(
                self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)') for name in self._created),
                return_exceptions=True) if isinstance(r, BaseException)]
            self._created = []
            await self._pool.close()
            if failures:
                raise failures[0]

        try:
            concurrent.futures.wait([*(f for spares in self._spares.values() for f in spares), *self._pending])
            self._submit(drop_all()).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


@contextlib.contextmanager
def postgres_session() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.seeded_templates()
        yield pg
    finally:
        pg.close()


class ServiceDatabases:
    """One test's database per service on one backend. SQLite: the files of a copied data
    directory. PostgreSQL: a copy of the service's template, made when the test first asks
    for that service (most tests run one service) and dropped by `close`."""

    def __init__(self, backend: str, *, data_dir: Path | None = None, postgres: Postgres | None = None) -> None:
        self.backend = backend
        self._data_dir = data_dir
        self._postgres = postgres
        self._urls: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def url(self, name: str) -> str:
        """The service's database; the same one for every start within the test (restarts)."""
        async with self._lock:
            if name not in self._urls:
                if self._postgres is not None:
                    self._urls[name] = await self._postgres.copy(name)
                else:
                    assert self._data_dir is not None
                    self._urls[name] = database_url(name, self._data_dir)
            return self._urls[name]

    async def urls(self, *names: str) -> dict[str, str]:
        return {name: await self.url(name) for name in names}

    async def execute(self, name: str, statement: str) -> None:
        """Run SQL on a service's own database behind its back (to break it, say)."""
        url = await self.url(name)
        if self._postgres is not None:
            conn = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=5)
            try:
                await conn.execute(statement, timeout=PG_TIMEOUT_S)
            finally:
                await conn.close()
        else:
            with contextlib.closing(sqlite3.connect(url.split(":///", 1)[1], timeout=5)) as db, db:
                db.execute(statement)

    def close(self) -> None:
        if self._postgres is not None and self._urls:
            self._postgres.drop(*self._urls.values())


@contextlib.asynccontextmanager
async def service_databases(backend: str, *, data_dir: Path | None = None,
                            postgres: Postgres | None = None) -> AsyncIterator[ServiceDatabases]:
    databases = ServiceDatabases(backend, data_dir=data_dir, postgres=postgres)
    try:
        yield databases
    finally:
        databases.close()

