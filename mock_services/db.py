"""One service's own database: engine, serialised write transactions, the outbox.

Every change and its outbox event commit in one transaction (the transactional outbox
pattern), so the change feed never shows a change that was rolled back, nor misses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, create_engine, event, func, insert, select, text
from sqlalchemy.engine import Connection, Engine, Result, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable

from . import migrations

__all__ = ["BigId", "Database", "EventKey", "Position", "Reads", "now_iso", "add_outbox", "backend_of", "tracking"]

# Ids a path accepts go up to 10**18 - 1 (params.parse_id): 64-bit on PostgreSQL; SQLite's
# INTEGER is already 64-bit, and must stay INTEGER for its rowid and AUTOINCREMENT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


# PostgreSQL: the lock every outbox append of a database takes until its commit (`_append`).
# Advisory locks are per database, so one constant serves every service. 0x62766f7574626f78: "bvoutbox".
_OUTBOX_LOCK = 0x62766F7574626F78
_ORDER_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


@dataclass(frozen=True)
class EventKey:
    """A key an event carries besides the entity's own id, read from the entity's row when
    the feed is served: the key a reader caches the entity under (a payment is looked up
    by its order, so its events say `orderId`; README, "The change feed")."""

    entity: str
    field: str  # the event's field, e.g. "orderId"
    id_column: Column[Any]  # the entity's id
    key_column: Column[Any]  # the column holding the key (never changes once written)


def backend_of(url: str) -> str:
    return make_url(url).get_backend_name()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_outbox(metadata: MetaData) -> Table:
    # Seqs are dense and in commit order (Database._append): AUTOINCREMENT on SQLite, counted
    # under a lock at the commit on PostgreSQL (its sequence is then left unused).
    return Table(
        "outbox",
        metadata,
        Column("seq", BigId, primary_key=True, autoincrement=True),
        Column("type", String, nullable=False),
        Column("entity", String, nullable=False),
        Column("entity_id", BigId, nullable=False),
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


class _InlineReads:
    """A SQLite read connection used on the event loop's own thread, awaited like an
    `AsyncConnection`. aiosqlite runs each statement on a thread of its own: four thread hops
    per statement, about 38 % of a service's CPU under load (`perf`), for reads that take
    microseconds on an indexed local file. Reads never wait for the writer under WAL
    (sqlite.org/wal.html, "Concurrency"), so running them inline blocks the loop for no
    longer than the statement itself."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]:
        return self._conn.execute(statement, parameters)


# What a read block is handed: an `AsyncConnection` (PostgreSQL) or `_InlineReads` (SQLite).
Reads = AsyncConnection | _InlineReads


class Database:
    """A service's engine plus the change signal that wakes long-polling feed readers."""

    def __init__(self, url: str, metadata: MetaData, event_keys: Iterable[EventKey] = ()) -> None:
        self.url = url
        self.event_keys = {k.entity: k for k in event_keys}
        self.metadata = metadata
        self.outbox: Table = metadata.tables["outbox"]
        # Built once: every read of a request reads it (mock_services/position.py).
        self._head_query = select(func.coalesce(func.max(self.outbox.c.seq), 0))
        self.backend = backend_of(url)
        # SQLite: a connection past the pool's size (5 by default) is closed when returned, and
        # opening one costs a thread, a file open and the PRAGMAs below. Under ten concurrent
        # requests that churn was a tenth of a service's CPU; idle SQLite connections cost little.
        # JSON columns (an order's items) are parsed by orjson: the standard library's parser
        # was a fourteenth of a page of orders' CPU.
        options: dict[str, Any] = {"pool_size": 32, "max_overflow": 8, "json_deserializer": orjson.loads} \
            if self.backend == "sqlite" else {}
        self.engine: AsyncEngine = create_async_engine(url, **options)
        # SQLite's reads run on the loop's thread (_InlineReads), through the stdlib driver.
        self._inline: Engine | None = None
        if self.backend == "sqlite":
            self._inline = create_engine(make_url(url).set(drivername="sqlite"), **options,
                                         connect_args={"check_same_thread": False})
            for engine in self.sync_engines:
                event.listen(engine, "connect", _sqlite_connect)
                event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        # SQLite has one writer; serialising writes here avoids SQLITE_BUSY churn, and the
        # version bump itself is an atomic `version = version + 1 ... RETURNING`.
        self._write_lock = asyncio.Lock()
        # The write transaction in progress and the events it emitted, appended at its end.
        self._collecting: tuple[AsyncConnection, list[dict[str, Any]]] | None = None
        self._changed = asyncio.Event()
        self._stopping = False

    async def create(self, service: str, seed: Callable[[AsyncConnection], Awaitable[None]]) -> str:
        """Make the database `service`'s, in one transaction: create and seed it when new,
        migrate it when older, refuse another's (WrongDatabase; mock_services/migrations.py)."""

        async def after_seed(conn: AsyncConnection) -> None:
            if self.backend == "postgresql":
                await self._advance_sequences(conn)

        where = make_url(self.url).render_as_string(hide_password=True)
        async with self.write() as conn:
            return await migrations.prepare(conn, service, self.metadata, seed, after_seed, where)

    async def _advance_sequences(self, conn: AsyncConnection) -> None:
        # Seeding inserts explicit ids, which PostgreSQL's identity sequences do not see;
        # the next generated id must follow the seeded ones.
        for table in self.metadata.sorted_tables:
            for column in table.primary_key.columns:
                if column.autoincrement is True or (column.autoincrement == "auto" and len(table.primary_key.columns) == 1
                                                    and isinstance(column.type, (Integer, BigInteger))):
                    await conn.execute(text(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                        f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"
                    ))

    @property
    def sync_engines(self) -> list[Engine]:
        """The engines statements run on (for hooks such as tracing): the writer's, and on
        SQLite the inline readers'."""
        return [self.engine.sync_engine] + ([self._inline] if self._inline is not None else [])

    async def dispose(self) -> None:
        if self._inline is not None:
            self._inline.dispose()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[Reads]:
        if self._inline is None:
            async with self.engine.connect() as conn:
                yield conn
        else:
            with self._inline.connect() as inline:
                yield _InlineReads(inline)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Reads]:
        async with self._connect() as conn:
            yield conn
            position = _POSITION.get()
            if position is not None:  # in its own transaction, after its rows (mock_services/position.py)
                position.read = max(position.read, await self._head(conn))

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction; the events `emit` collected in it are appended to the
        outbox last, just before the commit (`_append`)."""
        async with self._write_lock:
            async with self.engine.begin() as conn:
                events: list[dict[str, Any]] = []
                self._collecting = (conn, events)  # the write lock makes it the only one
                try:
                    yield conn
                    await self._append(conn, events)
                finally:
                    self._collecting = None
        if (position := _POSITION.get()) is not None:
            position.wrote = True
        self._notify()

    async def emit(self, conn: AsyncConnection, entity: str, action: str, entity_id: int, version: int, at: str) -> None:
        """The change's outbox event, committed with it; its seq is given at the commit."""
        event = {"type": f"{entity}.{action}", "entity": entity, "entity_id": entity_id, "version": version, "at": at}
        if self._collecting is not None and self._collecting[0] is conn:
            self._collecting[1].append(event)
        else:  # a transaction not begun by `write`: append now, in the same order
            await self._append(conn, [event])

    async def _append(self, conn: AsyncConnection, events: list[dict[str, Any]]) -> None:
        """Give `events` the next seqs, densely and in commit order (README, "The change feed").

        A reader must never see seq n+1 committed while n is still to come, or it moves its
        cursor past n for good; and a seq that never commits must not be a hole that reads as
        missed events. SQLite has one writer: AUTOINCREMENT runs under its write lock, and a
        rollback takes the number back. On PostgreSQL a sequence does neither (nextval is
        neither ordered by commit nor rolled back: two writers on one database left a
        follower 1 to 10 events short of 400, issue 24), so the seqs are counted from the
        outbox itself under a transaction-scoped advisory lock, taken as the last thing
        before the commit (nothing else is waited for while holding it, so it cannot
        deadlock) and released only once the commit is visible. The next writer's
        `max(seq)`, a statement after it got the lock, sees that commit (READ COMMITTED
        takes a snapshot per statement), and a rolled-back or killed transaction leaves
        the count where it was."""
        if not events:
            return
        if self.backend != "postgresql":
            await conn.execute(insert(self.outbox), events)
            return
        await conn.execute(_ORDER_LOCK, {"key": _OUTBOX_LOCK})
        last = int((await conn.execute(self._head_query)).scalar_one())
        await conn.execute(insert(self.outbox), [{**event, "seq": last + n} for n, event in enumerate(events, 1)])

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stop_waiting(self) -> None:
        """The process is stopping: every long-poll answers now, and new ones do not wait."""
        self._stopping = True
        self._notify()

    async def events_after(
        self, after: int, limit: int, wait: float, gone: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Events with seq > after; waits up to `wait` seconds for the first one, less if
        the process stops or `gone` (the client disconnecting) returns first."""
        # Take the signal before reading, so a commit between the read and the wait
        # still wakes us.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            changed = self._changed
            rows, latest = await self._read_events(after, limit)
            left = deadline - loop.time()
            if rows or left <= 0 or self._stopping:
                return rows, latest
            # A commit without an event (the saga log's bookkeeping) wakes us too: wait on,
            # unless the process stops or the client goes away.
            waits = [asyncio.ensure_future(changed.wait())] + ([asyncio.ensure_future(gone())] if gone else [])
            try:
                done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            if gone is not None and waits[-1] in done:
                return rows, latest

    async def _read_events(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        o = self.outbox
        async with self.read() as conn:
            result = await conn.execute(select(o).where(o.c.seq > after).order_by(o.c.seq).limit(limit))
            rows = [
                {"seq": r.seq, "type": r.type, "entity": r.entity, "id": r.entity_id, "version": r.version, "at": r.at}
                for r in result
            ]
            latest = await self._head(conn)
            for key in self.event_keys.values():
                ids = {r["id"] for r in rows if r["entity"] == key.entity}
                if ids:
                    found = dict((await conn.execute(select(key.id_column, key.key_column)
                                                     .where(key.id_column.in_(ids)))).all())
                    for r in rows:
                        if r["entity"] == key.entity and r["id"] in found:
                            r[key.field] = found[r["id"]]
        return rows, latest

    async def head(self) -> int:
        """The highest seq written: read after a request's own queries, an upper bound of
        every change they saw (a change and its event commit together)."""
        async with self._connect() as conn:
            return await self._head(conn)

    async def _head(self, conn: Reads) -> int:
        return int((await conn.execute(self._head_query)).scalar_one())


@dataclass
class Position:
    """The feed position a request's reads saw, each read in the read's own transaction
    after its rows: the highest is an upper bound of every change the answer reflects. A
    request that wrote reads it again at the end (`wrote`)."""

    read: int = -1
    wrote: bool = False


_POSITION: contextvars.ContextVar[Position | None] = contextvars.ContextVar("feed_position", default=None)


@contextlib.contextmanager
def tracking() -> Iterator[Position]:
    """Within this block, the service's reads note the feed position they saw."""
    position = Position()
    token = _POSITION.set(position)
    try:
        yield position
    finally:
        _POSITION.reset(token)
