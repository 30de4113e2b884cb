"""Running the gateway on uvicorn (`bookvault gateway`). On SIGTERM/Ctrl-C uvicorn stops
accepting, then waits for the open connections before the lifespan ends: a subscription's
stream never ends by itself (an SSE stream would hold the stop until the grace period
ran out, a WebSocket would be cut with 1012). So the live hub is closed first: WebSockets
get 1001 and SSE streams `complete` (README, "Subscriptions"), then uvicorn goes on.

Every connection is bounded (gateway/connections.py, issue 25): uvicorn has an idle
keep-alive timeout (`timeout_keep_alive`), but no time limit on a request's head or body, no
limit on a head's size with httptools, and only `limit_concurrency`, which counts requests
and reads each refused head without a time limit. So the protocol below, a subclass of
uvicorn's httptools protocol (the `http=` protocol class is uvicorn's extension point; what
it overrides are the parser's callbacks and uvicorn's own `on_response_complete` and
`handle_websocket_upgrade`), keeps the head and body timers, the head's size and the
connection's place in the counts. Issue 22 would rather not subclass uvicorn's internals:
nothing public sees a request's head arrive, so this is the least of it.

Under `bookvault gateway --workers N` (gateway/workers.py), each worker serves the
supervisor's listening socket, inherited, rather than binding one, and answers its own
series to its peers for /metrics."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Settings
from .connections import (
    REFUSAL_WAIT,
    RETRY_AFTER,
    Connections,
    StreamLimit,
    address_key,
    refusal_body,
)
from .metrics import ConnectionCollector
from .workers import Worker

__all__ = ["CoalescingHttp", "GuardedHttp", "serve", "server"]


class _Coalescing:
    """A transport whose writes within one turn of the event loop leave in one send. uvicorn
    writes a response's head and its body apart: two system calls and two TCP segments per
    answer, where one does (on loopback, each send also runs the receiver's side of TCP in
    the sender's time). A write waits at most until the loop's next turn."""

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written goes before the close, as it would have
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str) -> Any:  # the rest (extra info, reading, protocol) as it is
        return getattr(self._transport, name)


class CoalescingHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) over a `_Coalescing` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalescing(transport))  # type: ignore[arg-type]


class _Watched(asyncio.Protocol):
    """The protocol a connection was handed to (uvicorn's WebSocket protocol after an
    upgrade), and `lost` called when that connection ends: it keeps its place until then."""

    def __init__(self, inner: asyncio.Protocol, lost: Any) -> None:
        self.inner, self.lost = inner, lost

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.lost()


_PHRASES = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class GuardedHttp(CoalescingHttp):
    """`CoalescingHttp` within the connection bounds (gateway/connections.py): the head must
    arrive within `head_timeout` of the connection (or of the request's first byte) and be
    at most `max_head_bytes`, the body within `body_timeout` of the head; the connection
    counts against the instance's and its address's caps, and may be closed to make room
    while it is idle. A timer is armed only when a head or a body is still incomplete after
    the bytes at hand are parsed: a request that arrives whole costs none."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, guard: Connections) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.limits = guard.limits
        self.peer = "-"  # the address as counted (IPv6: its /64)
        self.refused: str | None = None  # over a cap: why (the head is answered 503)
        self.released = False
        self.timer: asyncio.TimerHandle | None = None
        self.in_head = False  # between a request's first byte and the end of its head
        self.reading = False  # between a request's first byte and the end of its body
        self.since = 0.0  # when the head (or the body) began: the loop's clock
        self.head_bytes = 0
        self.pending = 0  # requests whose head is in and whose response is not complete
        self.upgrading = False
        self.handed_over = False  # to uvicorn's WebSocket protocol, which now holds the place

    # -- the connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = address_key(self.client[0] if self.client else None)
        self.refused = self.guard.admit(self)
        self.since = self.loop.time()
        if self.refused is None:
            self.guard.rest(self)
            self._arm(self.limits.head_timeout, "head_timeout")
            return
        self.guard.count(self.refused, self.peer)
        if self.guard.overflowing():
            self._release()
            self.transport.close()  # beyond what can be told 503: closed unanswered
            return
        self.app = self._unavailable  # type: ignore[assignment]  # its head is answered 503 (uvicorn runs `self.app`)
        self._arm(min(self.limits.head_timeout, REFUSAL_WAIT), "head_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.handed_over:
            self._release()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a new connection: this one is idle, its place given now."""
        self._release()
        self._disarm()
        self.transport.close()

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.guard.release(self, self.refused is not None)

    # -- timers ------------------------------------------------------------------------

    def _arm(self, delay: float, reason: str) -> None:
        self._disarm()
        self.timer = self.loop.call_later(max(0.0, delay), self._expired, reason)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self, reason: str) -> None:
        self.timer = None
        if self.transport.is_closing():
            return
        if self.refused is not None:  # counted when refused
            self.transport.close()
            return
        if reason == "head_timeout":
            limit = self.limits.head_timeout
            self.guard.count(reason, self.peer, limitS=limit, partial=self.in_head)
            if self.in_head and self.pending == 0:  # part of a head came: it is answered (RFC 9110 §15.5.9)
                self._answer(408, f"the request head did not arrive within {limit:g} s", "REQUEST_TIMEOUT")
            else:  # a connection that never sent a byte is closed, as an idle one is
                self.transport.close()
        else:
            limit = self.limits.body_timeout
            self.guard.count(reason, self.peer, limitS=limit)
            # uvicorn's request cycle says whether this request's answer has begun.
            if self.cycle is not None and not self.cycle.response_started:
                self._answer(408, f"the request body did not arrive within {limit:g} s", "REQUEST_TIMEOUT")
            else:
                self.transport.close()

    def _answer(self, status: int, message: str, code: str, headers: str = "") -> None:
        """A refusal written here, with no app to ask (the head is not complete), then closed."""
        body = refusal_body(message, code)
        head = (f"HTTP/1.1 {status} {_PHRASES[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n{headers}\r\n")
        self.transport.write(head.encode("latin-1") + body)
        self.transport.close()

    async def _unavailable(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The answer to a request over a cap: 503, try again in a second, and the connection closed."""
        message = ("too many connections from this address" if self.refused == "address_limit"
                   else "this instance holds as many connections as it can")
        body = refusal_body(message + ": try again shortly", "TOO_MANY_CONNECTIONS")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", RETRY_AFTER.encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    # -- the parser's callbacks and uvicorn's ------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.handed_over:
            return
        if self.in_head:  # these bytes end no head (httptools keeps them, whatever their number)
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_head_bytes:
                self.guard.count("head_too_large", self.peer, limitBytes=self.limits.max_head_bytes)
                self._answer(431, f"request heads are limited to {self.limits.max_head_bytes} bytes",
                             "HEAD_TOO_LARGE")
            elif self.timer is None:
                self._arm(self.since + self.limits.head_timeout - self.loop.time(), "head_timeout")
        elif self.reading and self.timer is None:
            self._arm(self.since + self.limits.body_timeout - self.loop.time(), "body_timeout")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.in_head and self.timer is None:  # a next request: its head's time starts now
            self.since = self.loop.time()
        self.in_head = self.reading = True
        self.head_bytes = 0
        self.guard.work(self)

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        self._disarm()
        self.in_head = False
        self.since = self.loop.time()
        self.upgrading = self.cycle is before  # no request cycle: uvicorn upgrades to a WebSocket
        if not self.upgrading:
            self.pending += 1

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self.reading = False
        if self.pending == 0 and not self.upgrading:
            self.guard.rest(self)

    def on_response_complete(self) -> None:
        self.pending -= 1
        super().on_response_complete()
        if self.pending == 0 and not self.reading and not self.transport.is_closing():
            self.guard.rest(self)

    def handle_websocket_upgrade(self) -> None:
        if self.refused is not None:
            self._answer(503, "too many connections: try again shortly", "TOO_MANY_CONNECTIONS",
                         f"retry-after: {RETRY_AFTER}\r\n")
            return
        self.guard.work(self)
        super().handle_websocket_upgrade()
        # uvicorn handed the connection to its WebSocket protocol: the connection keeps its
        # place in the counts until that protocol loses it (asyncio's public set_protocol).
        inner = self.transport.get_protocol()
        if not isinstance(inner, asyncio.Protocol):  # a buffered protocol: not uvicorn's, not wrapped
            self._release()
        else:
            self.transport.set_protocol(_Watched(inner, self._release))
        self.handed_over = True


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, guard: Connections | None = None,
                 worker: Worker | None = None) -> None:
        super().__init__(config)
        self.app = app
        self.worker = worker
        self.collector = ConnectionCollector(guard) if guard is not None else None
        self.registry: Any = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # The lifespan has run (or the app was started before): its /metrics shows the bounds.
        state = getattr(self.app.state, "gateway", None)
        if state is not None and self.collector is not None and self.registry is None:
            self.registry = state.telemetry.metrics.registry
            self.registry.register(self.collector)
        if state is not None and self.worker is not None and self.worker.server is None:
            await self.worker.start(state.telemetry.metrics.exposition)

    async def shutdown(self, sockets: Any = None) -> None:
        state = getattr(self.app.state, "gateway", None)
        if state is not None and state.live is not None:
            await state.live.close()
        await super().shutdown(sockets)
        if self.worker is not None:
            await self.worker.stop()
        if self.registry is not None:
            self.registry.unregister(self.collector)
            self.registry = None


def server(app: Starlette, settings: Settings, asgi: Any = None, worker: Worker | None = None,
           **options: Any) -> uvicorn.Server:
    """A uvicorn server of `app` (or of `asgi`, `app` wrapped in middleware) within the
    connection bounds of `settings`; `options` are uvicorn.Config's. As one of a
    supervisor's workers when `worker` is given (run it with `sockets=[worker.listener()]`)."""
    guard = Connections(settings.connections, reserved=sum(s.max_connections for s in settings.services.values()))
    config = uvicorn.Config(
        StreamLimit(asgi or app, guard),
        http=functools.partial(GuardedHttp, guard=guard),  # type: ignore[arg-type]  # a protocol factory
        timeout_keep_alive=settings.connections.keepalive,  # type: ignore[arg-type]  # seconds, to call_later
        **options)
    if worker is not None:
        app.state.worker = worker  # /metrics reads every worker's series through it (gateway/app.py)
    return _Server(config, app, guard, worker)


def serve(app: Starlette, asgi: Any = None, *, settings: Settings | None = None, **options: Any) -> None:
    """`uvicorn.run(app, **options)` within the connection bounds, subscribers told first on
    a stop; `asgi` is served instead of `app` when given (`app` wrapped in middleware). In a
    process the supervisor started (`Worker.current()`), on its inherited socket."""
    worker = Worker.current()
    sockets = [worker.listener()] if worker is not None else None
    server(app, settings or Settings.from_env(), asgi, worker, **options).run(sockets=sockets)
