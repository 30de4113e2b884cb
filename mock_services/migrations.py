"""A service's database made its own at start: created and seeded when new, migrated when
older, refused when it is another's (issue 24).

A marker table, written in the transaction that creates the schema, names the service the
database belongs to and its schema version. A service started on another service's database
(a wrong URL, a swapped variable) used to start "healthy", answer 500 on every route and serve
the other service's outbox as its own feed; now it refuses to start, naming both.

Databases made before the marker existed (schema version 1) are adopted when their tables
are this service's and no other's. Each step below takes a database from one version to the
next; the whole of it runs in one transaction with the check, so a crash leaves the old
version whole. A change to existing tables (a column, a type) adds a step and bumps
SCHEMA_VERSION; a new table needs neither: `create_all` makes the tables a database lacks at
every start, and leaves existing ones alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable

from .errors import WrongDatabase

__all__ = ["MARKER", "SCHEMA_VERSION", "marker", "prepare"]

# 1: the schema before the marker (32-bit money columns on PostgreSQL).
# 2: the marker; prices and order totals in 64-bit columns (mock_services/money.py).
SCHEMA_VERSION = 2
MARKER = "bookvault_service"
# Tables every service has: their presence alone does not make a database this service's.
_SHARED = frozenset({"outbox", "idempotency_keys"})
# pg_advisory_xact_lock's key (advisory locks are per database): two processes starting on one
# new database create it once.
_LOCK_KEY = 0x626F6F6B7661  # "bookva"

marker = Table(
    MARKER, MetaData(),
    Column("service", String, primary_key=True),
    Column("schema_version", Integer, nullable=False),
    Column("created_at", String, nullable=False),
    Column("migrated_at", String, nullable=False),
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _widen_integers(sync: Connection, metadata: MetaData) -> None:
    """1 -> 2: a column the code declares BIGINT that the database has as a 32-bit INTEGER
    becomes BIGINT (catalog's price_cents, orders' total_cents). SQLite's INTEGER is 64-bit
    already: nothing to do there."""
    if sync.dialect.name != "postgresql":
        return
    inspector = inspect(sync)
    for table in metadata.sorted_tables:
        have = {c["name"]: c["type"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            declared = column.type.dialect_impl(sync.dialect)
            if isinstance(declared, BigInteger) and column.name in have and not isinstance(have[column.name], BigInteger):
                sync.exec_driver_sql(f'ALTER TABLE "{table.name}" ALTER COLUMN "{column.name}" TYPE BIGINT')


# STEPS[v - 1] takes a database from version v to v + 1.
STEPS: list[Callable[[Connection, MetaData], None]] = [_widen_integers]
assert len(STEPS) == SCHEMA_VERSION - 1


def _tables(sync: Connection) -> set[str]:
    return set(inspect(sync).get_table_names())


async def prepare(
    conn: AsyncConnection,
    service: str,
    metadata: MetaData,
    seed: Callable[[AsyncConnection], Awaitable[None]],
    after_seed: Callable[[AsyncConnection], Awaitable[None]],
    where: str,
) -> str:
    """In the caller's transaction: make the database `service`'s at SCHEMA_VERSION, or raise
    WrongDatabase. `where` names the database in messages (no password). What was done:
    "created", "migrated from N" or "current"."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})"))
    else:
        # Takes SQLite's write lock first (waiting out busy_timeout), before the reads below
        # decide anything: a read lock cannot be upgraded while another process holds one.
        await conn.execute(CreateTable(marker, if_not_exists=True))
    tables = await conn.run_sync(_tables) - {MARKER}
    found: Any = None
    if await conn.run_sync(lambda sync: inspect(sync).has_table(MARKER)):
        found = (await conn.execute(select(marker))).first()
    now = _now()
    if found is not None:
        if found.service != service:
            raise WrongDatabase(f"{service} will not start on {where}: that is the {found.service} service's "
                                f"database (schema version {found.schema_version}); give {service} its own")
        if found.schema_version > SCHEMA_VERSION:
            raise WrongDatabase(f"{service} will not start on {where}: its schema version is "
                                f"{found.schema_version}, newer than this code's {SCHEMA_VERSION}")
        version = found.schema_version
    elif not tables:
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(marker.create, checkfirst=True)
        await seed(conn)
        await after_seed(conn)
        await conn.execute(marker.insert().values(service=service, schema_version=SCHEMA_VERSION, created_at=now,
                                                  migrated_at=now))
        return "created"
    else:  # made before the marker: this service's only if its tables are and no one else's are
        ours = set(metadata.tables)
        if tables - ours or not (tables & ours) - _SHARED:
            raise WrongDatabase(f"{service} will not start on {where}: it holds tables "
                                f"{', '.join(sorted(tables))}, not {service}'s ({', '.join(sorted(ours))}), "
                                f"and no {MARKER} marker")
        version = 1
    # Tables new since `version` (or added without a step); existing ones are left alone.
    await conn.run_sync(metadata.create_all)
    if version == SCHEMA_VERSION:
        return "current"
    for step in STEPS[version - 1:]:
        await conn.run_sync(step, metadata)
    await conn.run_sync(marker.create, checkfirst=True)
    if found is None:
        await conn.execute(marker.insert().values(service=service, schema_version=SCHEMA_VERSION, created_at=now,
                                                  migrated_at=now))
    else:
        await conn.execute(marker.update().values(schema_version=SCHEMA_VERSION, migrated_at=now))
    return f"migrated from {version}"
