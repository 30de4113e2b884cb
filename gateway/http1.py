"""The gateway's HTTP/1.1 client for the services (ARCHITECTURE.md, "Upstream calls"): keep-alive
connections per service over asyncio's transports, answers parsed by httptools (the parser
uvicorn serves with). An upstream call is most of a cold query's CPU, and aiohttp's client
costs about 1.8 times this one's per call (`bench/upstream_bench.py`), for features the
gateway does not use: cookies, redirects, compression, proxies, multipart, tracing hooks,
URL normalisation.

What it does: one request at a time per connection (no pipelining); idle connections reused
last in, first out, and dropped as soon as the service closes them or after `keepalive`
seconds idle; at most `limit` open at once; bodies framed by Content-Length, chunked
transfer coding (RFC 9112 §7.1) or the end of the connection (§6.3), refused past `cap`
bytes. Errors are this module's own, translated to the gateway's by `upstream.py`, once."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = ["Client", "Reply", "ConnectionFailed", "ProtocolViolation", "Oversized"]


class ConnectionFailed(Exception):
    """Refused, reset, or closed before the whole answer came: the request may not have been
    seen, or its answer was lost (a read is safe to send again)."""


class ProtocolViolation(Exception):
    """The service answered with bytes that are not HTTP/1.1."""


class Oversized(Exception):
    """The body is longer than the client takes."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; `exchange` sends a request and waits for its whole answer."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[Reply] | None = None
        self.idle_since = 0.0
        self.error: Exception | None = None  # raised in a parser callback (httptools wraps those)
        self._reset()

    def _reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.headed = False  # the headers are in
        self.keep_alive = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write: send it now

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(self.error or ProtocolViolation(f"not an HTTP/1.1 answer ({type(exc).__name__})"))
            self._abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headed and "content-length" not in self.headers and "chunked" not in \
                self.headers.get("transfer-encoding", "").lower():
            self._done()  # a body delimited by the end of the connection (RFC 9112 §6.3, rule 8)
        else:
            waiter.set_exception(ConnectionFailed("the connection closed before the whole answer came"))

    # -- httptools' callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headed = True
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cap:
            self.error = Oversized()
            raise self.error

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.cap:
            self.error = Oversized()
            raise self.error
        self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            self._reset()  # an interim answer (RFC 9110 §15.2): the final one follows
            return
        self.keep_alive = self.parser.should_keep_alive()  # only known here: the parser resets after
        self._done()

    # -- the exchange --------------------------------------------------------------------

    def _done(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, request: bytes, timeout: float) -> tuple[Reply, bool]:
        """The answer to `request`, and whether the connection may carry another."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        self.error = None
        self._reset()
        self.transport.write(request)
        # A timer that fails the waiter, not `asyncio.timeout`: this runs once per upstream
        # call, and the context manager's task bookkeeping costs several times more.
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            reply = await waiter
        except BaseException:
            self._abort()  # timed out, cancelled: the answer may still come, to nobody
            raise
        finally:
            timer.cancel()
            self.waiter = None
        return reply, self.keep_alive and self.reusable()


def _expire(waiter: asyncio.Future[Reply]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Client:
    """Connections to one service at `base` (``http://host:port[/prefix]``, or https)."""

    def __init__(self, base: str, *, limit: int, cap: int, connect_timeout: float,
                 headers: Mapping[str, str] | None = None, keepalive: float = 4.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        self.cap, self.connect_timeout = cap, connect_timeout
        fixed = {"host": parts.netloc.rpartition("@")[2], **(headers or {})}
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        # A server closes a connection idle for a while (uvicorn after 5 s), and a request sent
        # as it does is lost: a read is sent again, a write is not (RFC 9112 §9.3.1). So a
        # connection idle for `keepalive` seconds is closed by this side instead of reused.
        self.keepalive, self.clock = keepalive, clock
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(limit)
        self._open: set[_Connection] = set()

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                      timeout: float) -> Reply:
        """`timeout` bounds the wait for a free connection (with `connect_timeout`) and,
        once sent, the whole answer."""
        if " " in url or "\r" in url or "\n" in url:
            raise ValueError("a space or line break in the URL")  # a bug of ours: never sent
        head = f"{method} {self.prefix}{url} HTTP/1.1\r\n{self.fixed}"
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"a line break in the {name} header")  # a bug of ours: never sent
            head += f"{name}: {value}\r\n"
        if body is not None or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head += f"content-length: {len(body or b'')}\r\n"
        request = (head + "\r\n").encode("latin-1") + (body or b"")
        if self.slots.locked():
            async with asyncio.timeout(timeout + self.connect_timeout):
                await self.slots.acquire()
        else:
            await self.slots.acquire()
        try:
            connection = await self._connection()
            try:
                reply, again = await connection.exchange(request, timeout)
            except BaseException:
                self._drop(connection)
                raise
            if again:
                connection.idle_since = self.clock()
                self.idle.append(connection)
            else:
                self._drop(connection)
            return reply
        finally:
            self.slots.release()

    async def _connection(self) -> _Connection:
        if self.idle:
            stale = self.clock() - self.keepalive
            while self.idle:
                connection = self.idle.pop()
                if connection.idle_since > stale and connection.reusable():
                    return connection
                self._drop(connection)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self.cap), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except OSError as exc:  # refused, unreachable, TLS failed
            raise ConnectionFailed(f"could not connect ({type(exc).__name__})") from exc
        self._open.add(connection)
        return connection

    def _drop(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if connection.transport is not None and not connection.transport.is_closing():
            connection.transport.close()

    async def aclose(self) -> None:
        for connection in list(self._open):
            self._drop(connection)
        self.idle.clear()
