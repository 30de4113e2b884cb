"""Each service on its own database (issue 24): a marker table says whose a database is, so a
service refuses another's (exiting non-zero, naming both); a database from before the marker is
migrated; on PostgreSQL, `bookvault services setup-postgres` gives each service a role that
alone may connect to its database, and `bookvault services --database-url` runs all six on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from backends import PG_ADMIN
from mock_services import SERVICES, create_app
from mock_services.app import prepare_database
from mock_services.errors import StartupError, WrongDatabase
from mock_services.migrations import MARKER, SCHEMA_VERSION

BOOKVAULT = str(Path(sys.executable).with_name("bookvault"))
LISTED = re.compile(r"\s+(?P<name>\w+)\s+(?P<url>\S+)\s+\(pid (?P<pid>\d+)\)\s+(?P<database>\S+)")


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def _run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """A command to its end (killed, with its process group, past `timeout`): status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


async def test_a_service_started_on_another_services_database_exits_naming_both(databases, unused_ports):
    """`python -m mock_services customers --database <catalog's>`: a non-zero exit, one line naming customers and catalog."""
    catalog = await databases.url("catalog")
    status, out, err = await _run(sys.executable, "-m", "mock_services", "customers", "--port", str(unused_ports(1)[0]),
                                  "--database", catalog)
    assert status != 0
    (line,) = err.strip().splitlines()
    assert "customers" in line and "that is the catalog service's database" in line, err
    assert "Traceback" not in err


async def test_a_refused_database_is_left_as_it_was(databases, serve):
    """In process, customers' start-up on catalog's database raises WrongDatabase and creates nothing there; catalog starts as before."""
    catalog = await databases.url("catalog")
    before = await _tables(catalog)
    app = create_app(SERVICES["customers"], database=catalog)
    with pytest.raises(WrongDatabase, match="catalog"):
        async with app.router.lifespan_context(app):
            pass
    assert await _tables(catalog) == before and "customers" not in before
    async with serve("catalog") as client:
        assert (await client.get("/books/1")).status_code == 200


async def test_a_database_from_before_the_marker_is_migrated_once(databases, serve):
    """Catalog's database without its marker (and, on PostgreSQL, a 32-bit price column) is adopted: migrated, marked, then current."""
    url = await databases.url("catalog")
    await databases.execute("catalog", f"DROP TABLE {MARKER}")
    if databases.backend == "postgresql":
        await databases.execute("catalog", "ALTER TABLE books ALTER COLUMN price_cents TYPE integer")
    assert await prepare_database(SERVICES["catalog"], url) == "migrated from 1"
    assert await prepare_database(SERVICES["catalog"], url) == "current"
    async with serve("catalog") as client:
        response = await client.patch("/books/1", json={"price": {"amount": "999999999.99", "currency": "EUR"}})
        assert response.status_code == 200, response.text
    with pytest.raises(WrongDatabase, match=f"catalog service's database \\(schema version {SCHEMA_VERSION}\\)"):
        await prepare_database(SERVICES["customers"], url)


async def test_unmarked_tables_of_another_service_are_refused(databases):
    """A database from before the marker holding catalog's tables is not customers': refused, naming its tables."""
    url = await databases.url("catalog")
    await databases.execute("catalog", f"DROP TABLE {MARKER}")
    with pytest.raises(WrongDatabase, match="holds tables authors, books, outbox"):
        await prepare_database(SERVICES["customers"], url)
    assert MARKER not in await _tables(url)


async def test_a_database_newer_than_the_code_is_refused(databases):
    """A marker with a schema version above this code's is refused, not written over."""
    url = await databases.url("catalog")
    await databases.execute("catalog", f"UPDATE {MARKER} SET schema_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(WrongDatabase, match=f"schema version is {SCHEMA_VERSION + 1}, newer"):
        await prepare_database(SERVICES["catalog"], url)


@contextlib.asynccontextmanager
async def service_roles() -> AsyncIterator[tuple[str, str]]:
    """A template URL naming a fresh role and database per service (bvroles_<random>_<service>), set up
    by `bookvault services setup-postgres`; every role and database made is dropped after, no other."""
    prefix = f"bvroles_{uuid.uuid4().hex[:10]}"
    template = f"postgresql+asyncpg://{prefix}_{{service}}:pw-{{service}}@127.0.0.1:5432/{prefix}_{{service}}"
    try:
        status, out, err = await _run(BOOKVAULT, "services", "setup-postgres", "--admin-url", PG_ADMIN,
                                      "--database-url", template)
        assert status == 0, err
        assert len(out.strip().splitlines()) == len(SERVICES) and "created" in out
        yield template, prefix
    finally:
        admin = await asyncpg.connect(PG_ADMIN, timeout=10)
        try:
            for name in SERVICES:
                await admin.execute(f'DROP DATABASE IF EXISTS "{prefix}_{name}" WITH (FORCE)', timeout=60)
            for name in SERVICES:
                await admin.execute(f'DROP ROLE IF EXISTS "{prefix}_{name}"', timeout=10)
        finally:
            await admin.close()


def _libpq(template: str, role_of: str, database_of: str) -> str:
    """`role_of`'s credentials, `database_of`'s database."""
    own = template.replace("{service}", role_of).replace("+asyncpg", "")
    return own.rsplit("/", 1)[0] + "/" + template.replace("{service}", database_of).rsplit("/", 1)[1]


async def test_one_services_role_cannot_open_another_services_database():
    """On PostgreSQL (only), setup-postgres: each role opens its own database only (30 other pairs refused), is no superuser, cannot add dblink; a rerun changes nothing."""
    async with service_roles() as (template, prefix):
        for mine in SERVICES:
            conn = await asyncpg.connect(_libpq(template, mine, mine), timeout=10)
            try:
                assert await conn.fetchrow("SELECT current_user, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                                           "WHERE rolname = current_user") == (f"{prefix}_{mine}", False, False, False)
                with pytest.raises(asyncpg.InsufficientPrivilegeError):  # an untrusted extension: superusers only
                    await conn.execute("CREATE EXTENSION dblink")
            finally:
                await conn.close()
        for mine, theirs in itertools.permutations(SERVICES, 2):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for database"):
                await asyncpg.connect(_libpq(template, mine, theirs), timeout=10)
        # The service itself, with its credentials on another's database: a clear refusal, not a start.
        wrong = template.replace("{service}", "customers").rsplit("/", 1)[0] + "/" + \
            template.replace("{service}", "catalog").rsplit("/", 1)[1]
        with pytest.raises(StartupError, match="customers cannot open its database .*permission denied for database"):
            await prepare_database(SERVICES["customers"], wrong)
        status, out, err = await _run(BOOKVAULT, "services", "setup-postgres", "--admin-url", PG_ADMIN,
                                      "--database-url", template)
        assert (status, out.count(" kept, database "), out.count("created")) == (0, len(SERVICES), 0), err + out


async def test_bookvault_services_runs_all_six_on_postgresql_each_as_its_own_role(unused_ports):
    """On PostgreSQL, `bookvault services --database-url <template>`: six services seed their own databases as their own roles, answer, and stop on SIGINT."""
    async with service_roles() as (template, prefix):
        urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(SERVICES, unused_ports(len(SERVICES)), strict=True)}
        env = os.environ | {f"BOOKVAULT_{name.upper()}_URL": url for name, url in urls.items()}
        process = await asyncio.create_subprocess_exec(BOOKVAULT, "services", "--database-url", template,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                       env=env)
        pids: dict[str, int] = {}
        try:
            assert process.stdout is not None
            while not (line := (await asyncio.wait_for(process.stdout.readline(), 120)).decode()).startswith("ready"):
                assert line, "bookvault services ended before it was ready"
                if match := LISTED.match(line):
                    pids[match["name"]] = int(match["pid"])
                    # The database it runs on, its password hidden.
                    assert match["database"] == template.replace("{service}", match["name"]).replace(
                        f"pw-{match['name']}", "***"), line
            assert set(pids) == set(SERVICES)
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.get(f"{urls['catalog']}/books/1")).json()["id"] == 1
                assert (await client.get(f"{urls['customers']}/customers/7")).json()["id"] == 7
                placed = await client.post(f"{urls['orders']}/orders", json={"customerId": 7, "items": [
                    {"bookId": 1, "quantity": 1000, "unitPrice": {"amount": "30000.00", "currency": "EUR"},
                     "titleAtPurchase": "A"}]})
                assert placed.json()["total"]["amount"] == "30000000.00", placed.text
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pid in pids.values():  # in their own sessions: ended by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Each database is its own role's: the tables were made by the service, as that role.
        admin = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{prefix}_orders", timeout=10)
        try:
            owners = {r["tableowner"] for r in await admin.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await admin.close()
        assert owners == {f"{prefix}_orders"}


async def test_a_template_without_the_service_placeholder_is_refused_before_anything_starts(unused_ports):
    """`bookvault services --database-url postgresql+asyncpg://.../shared`: refused (every service on one database), exit 2, nothing started."""
    status, out, err = await _run(BOOKVAULT, "services", "--database-url", "postgresql+asyncpg://u@127.0.0.1:1/shared")
    assert status == 2 and out == ""
    assert "{service}" in err and "Traceback" not in err
