"""One service's own database: engine, serialised write transactions, the outbox.

Every change and its outbox event commit in one transaction (the transactional outbox
pattern), so the change feed never shows a change that was rolled back, nor misses one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["Database", "now_iso", "add_outbox"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_outbox(metadata: MetaData) -> Table:
    # AUTOINCREMENT: a seq is never reused, so `seq` is strictly increasing for readers.
    return Table(
        "outbox",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("type", String, nullable=False),
        Column("entity", String, nullable=False),
        Column("entity_id", Integer, nullable=False),
        Column("version", Integer, nullable=False),
        Column("at", String, nullable=False),
        sqlite_autoincrement=True,
    )


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin; otherwise
    # DDL runs outside them and a crash mid-seed leaves empty tables (SQLAlchemy docs,
    # "Serializable isolation / Savepoints / Transactional DDL").
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while the single writer commits; the busy timeout covers a
    # second process (a restart overlapping the old one) holding the write lock briefly.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Database:
    """A service's engine plus the change signal that wakes long-polling feed readers."""

    def __init__(self, url: str, metadata: MetaData) -> None:
        self.url = url
        self.metadata = metadata
        self.outbox: Table = metadata.tables["outbox"]
        self.engine: AsyncEngine = create_async_engine(url)
        if make_url(url).get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_connect)
            event.listen(self.engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        # SQLite has one writer; serialising writes here avoids SQLITE_BUSY churn, and the
        # version bump itself is an atomic `version = version + 1 ... RETURNING`.
        self._write_lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def create(self, seed: Callable[[AsyncConnection], Awaitable[None]]) -> None:
        """Create the schema and seed it, in one transaction, when the database is new."""
        async with self.write() as conn:
            existing = await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync))
            if not existing:
                await conn.run_sync(self.metadata.create_all)
                await seed(conn)

    async def dispose(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock:
            async with self.engine.begin() as conn:
                yield conn
        self._notify()

    async def emit(self, conn: AsyncConnection, entity: str, action: str, entity_id: int, version: int, at: str) -> None:
        await conn.execute(
            insert(self.outbox).values(
                type=f"{entity}.{action}", entity=entity, entity_id=entity_id, version=version, at=at
            )
        )

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def events_after(self, after: int, limit: int, wait: float) -> tuple[list[dict[str, Any]], int]:
        """Events with seq > after; waits up to `wait` seconds for the first one."""
        # Take the signal before reading, so a commit between the read and the wait
        # still wakes us.
        changed = self._changed
        rows, latest = await self._read_events(after, limit)
        if not rows and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
            rows, latest = await self._read_events(after, limit)
        return rows, latest

    async def _read_events(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        o = self.outbox
        async with self.read() as conn:
            result = await conn.execute(select(o).where(o.c.seq > after).order_by(o.c.seq).limit(limit))
            rows = [
                {"seq": r.seq, "type": r.type, "entity": r.entity, "id": r.entity_id, "version": r.version, "at": r.at}
                for r in result
            ]
            latest = (await conn.execute(select(func.coalesce(func.max(o.c.seq), 0)))).scalar_one()
        return rows, latest
