"""Connection bounds (issue 25; README, "Limits and cost"): what one client connection may
hold, counted per instance, per address and per caller, so that no client, slow or idle or
many, can keep the gateway from answering the next one.

- **Time**: a request head must arrive within `head_timeout` of the connection (or of the
  request's first byte), its body within `body_timeout` of the head (on /graphql within the
  request's deadline, gateway/view.py); an idle keep-alive connection is closed after
  `keepalive`. The timers live in the HTTP protocol (gateway/serve.py).
- **Connections**: at most `max_connections` per instance, lowered to what the process's
  file-descriptor limit allows, and `per_address` per client address. At the instance cap
  the connection idle the longest (no request in progress) is closed to make room, as
  nginx reuses its keep-alive connections when it runs out; when none is idle, or past
  the address cap, the request gets a 503 with `Retry-After` if its head comes within a
  second, and a flood beyond that is closed unanswered.
- **Streams**: at most `streams_per_caller` WebSockets and event streams (graphql-sse,
  Apollo's multipart subscriptions) per caller: the token's subject, else the address.

Each bound reached is counted (`bookvault_connections_refused_total{reason}`) and logged as
one line, at most `LOG_BURST` a second per reason (a flood must not become one in the log)."""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import caller_of
from .config import ConnectionLimits
from .live_multipart import APOLLO
from .live_sse import SSE

__all__ = ["REASONS", "Connections", "Guarded", "StreamLimit", "address_key", "file_limit", "refusal_body"]

log = logging.getLogger("bookvault.connections")

# Why a connection was closed or a request refused (the metric's `reason` label).
REASONS = ("head_timeout", "body_timeout", "head_too_large", "idle_evicted", "instance_limit", "address_limit",
           "stream_limit")
REFUSAL_WAIT = 1.0  # seconds a refused connection has to send its head and be told 503
RETRY_AFTER = "1"  # seconds, on a 503: a connection is freed as soon as one request ends
LOG_BURST = 10  # lines per reason and second; the rest are counted, and said in the next line
# File descriptors kept for what is not a client connection: the upstream connections
# (each service's max_connections), Redis, the document worker's pipes, logs, the listener.
OTHER_FILES = 256


class Guarded(Protocol):
    """A connection as the bookkeeping sees it (gateway/serve.py's protocol)."""

    peer: str  # its address as counted (`address_key`)

    def evict(self) -> None: ...


def address_key(host: str | None) -> str:
    """Whose connection this is, for the per-address cap: the IPv4 address, or an IPv6
    address's /64 (one host usually holds a whole /64, RFC 4291 §2.5.4)."""
    if not host or ":" not in host:
        return host or "-"
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


def file_limit(wanted: int) -> int:
    """The process's file-descriptor limit, its soft limit raised towards the hard one when
    `wanted` needs it (what systemd asks of programs that need many files; select() is not used)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def refusal_body(message: str, code: str) -> bytes:
    """The gateway's error shape for a refusal of HTTP's own (as gateway/view.py answers)."""
    return orjson.dumps({"errors": [{"message": message, "extensions": {"code": code}}]})


def _slack(limit: int) -> int:
    """Connections beyond the cap kept only to be told 503."""
    return 16 + limit // 16


class Connections:
    """The open connections of one server, and the streams of each caller."""

    def __init__(self, limits: ConnectionLimits, *, reserved: int = 0, files: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        wanted = limits.max_connections + _slack(limits.max_connections) + reserved + OTHER_FILES
        self.files = file_limit(wanted) if files is None else files
        room = self.files - reserved - OTHER_FILES
        # The cap and its 503 slack fit in the file descriptors: accept() never fails for lack of one.
        self.limit = max(1, min(limits.max_connections, (room - 16) * 16 // 17))
        self.slack = _slack(self.limit)
        self.open = 0
        self.refusing = 0  # over a cap, waiting for a head to answer 503
        self.per_address: dict[str, int] = {}
        self.idle: dict[Guarded, None] = {}  # oldest idle first (insertion order)
        self.streams: dict[str, int] = {}
        self.streams_open = 0
        self.refused = dict.fromkeys(REASONS, 0)
        self._lines: dict[str, list[float]] = {}  # reason -> [window start, lines, unsaid]
        if self.limit < limits.max_connections:
            log.warning("connection cap lowered", extra={"fields": {
                "configured": limits.max_connections, "limit": self.limit, "fileLimit": self.files,
                "reason": "BOOKVAULT_MAX_CONNECTIONS does not fit the process's file-descriptor limit"}})

    # -- connections -------------------------------------------------------------------

    def admit(self, connection: Guarded) -> str | None:
        """Counts `connection` in, or says why not ("address_limit", "instance_limit"); a
        refused one is counted in `refusing` until `release`."""
        key = connection.peer
        cap = self.limits.per_address
        if cap and self.per_address.get(key, 0) >= cap:
            reason: str | None = "address_limit"
        elif self.open >= self.limit and not self._evict_one():
            reason = "instance_limit"
        else:
            reason = None
        if reason is not None:
            self.refusing += 1
            return reason
        self.open += 1
        self.per_address[key] = self.per_address.get(key, 0) + 1
        return None

    def overflowing(self) -> bool:
        """Too many refused connections already wait to be told: close this one unanswered."""
        return self.refusing > self.slack

    def release(self, connection: Guarded, refused: bool) -> None:
        self.idle.pop(connection, None)
        if refused:
            self.refusing -= 1
            return
        self.open -= 1
        key = connection.peer
        left = self.per_address[key] - 1
        if left:
            self.per_address[key] = left
        else:
            del self.per_address[key]

    def rest(self, connection: Guarded) -> None:
        """No request in progress on `connection`: it may be closed to make room."""
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def work(self, connection: Guarded) -> None:
        self.idle.pop(connection, None)

    def _evict_one(self) -> bool:
        if not self.idle:
            return False
        victim = next(iter(self.idle))
        self.count("idle_evicted", victim.peer)
        victim.evict()  # releases it now: its place is the new connection's
        return True

    # -- streams -----------------------------------------------------------------------

    def open_stream(self, caller: str) -> bool:
        held = self.streams.get(caller, 0)
        if held >= self.limits.streams_per_caller:
            return False
        self.streams[caller] = held + 1
        self.streams_open += 1
        return True

    def close_stream(self, caller: str) -> None:
        self.streams_open -= 1
        left = self.streams[caller] - 1
        if left:
            self.streams[caller] = left
        else:
            del self.streams[caller]

    # -- what is said about it ---------------------------------------------------------

    def count(self, reason: str, address: str, **fields: Any) -> None:
        """A bound was reached: counted, and logged as one line (at most LOG_BURST a second
        per reason; a line says how many went unsaid before it)."""
        self.refused[reason] += 1
        if not log.isEnabledFor(logging.INFO):
            return
        now = self.clock()
        window = self._lines.get(reason)
        if window is None or now - window[0] >= 1.0:
            unsaid = int(window[2]) if window else 0
            self._lines[reason] = [now, 1, 0]
        elif window[1] < LOG_BURST:
            window[1] += 1
            unsaid = 0
        else:
            window[2] += 1
            return
        line = {"reason": reason, "client": address, **fields}
        if unsaid:
            line["unsaidBefore"] = unsaid
        log.info("connection bound", extra={"fields": line})


def _content_type(headers: Any) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return bytes(value).lower()
    return b""


def _streaming(content_type: bytes) -> bool:
    """An event stream (graphql-sse) or Apollo's multipart subscription: a response that
    lasts as long as its subscription."""
    return content_type.startswith(b"text/event-stream") or (
        content_type.startswith(b"multipart/mixed") and b"subscriptionspec" in content_type)


def _caller_key(scope: Scope) -> str:
    caller = caller_of(scope)
    if caller is not None:
        return "subject:" + caller.subject
    client = scope.get("client")
    return "address:" + address_key(client[0] if client else None)


class StreamLimit:
    """Pure ASGI, around the whole app: counts each caller's WebSockets (from `accept`) and
    HTTP streams (from a response head whose type is an event stream or a multipart
    subscription) until the app is done with them, and refuses one past
    `streams_per_caller`. The caller is known by then: the authentication middleware inside
    has put it in the scope. A refused WebSocket gets 429 instead of its handshake (or 403
    where the server cannot send a denial); a refused stream gets the protocol's own error
    and end (an SSE `next` + `complete`, a multipart error part), code `TOO_MANY_STREAMS`.
    The app then sees the client gone, and what it sends is dropped. (A query answered as an
    event stream, to a client that reads nothing else, counts too while it is sent.)"""

    def __init__(self, app: ASGIApp, connections: Connections) -> None:
        self.app = app
        self.connections = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http" and scope["path"] == "/graphql":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _message(self) -> str:
        limit = self.connections.limits.streams_per_caller
        return f"at most {limit} streams (WebSockets, event streams) per caller are open at once: close one first"

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        connections = self.connections
        holder: str | None = None
        refused = False

        async def counted_send(message: Message) -> None:
            nonlocal holder, refused
            if refused:
                return
            if message["type"] == "http.response.start" and _streaming(_content_type(message.get("headers", ()))):
                key = _caller_key(scope)
                if connections.open_stream(key):
                    holder = key
                else:
                    refused = True
                    await self._refuse_stream(scope, message, send)
                    return
            await send(message)

        async def counted_receive() -> Message:
            if refused:
                return {"type": "http.disconnect"}
            return await receive()

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            if holder is not None:
                connections.close_stream(holder)

    async def _refuse_stream(self, scope: Scope, start: Message, send: Send) -> None:
        client = scope.get("client")
        self.connections.count("stream_limit", client[0] if client else "-", caller=_caller_key(scope))
        # The stream's own refusal: graphql-sse's `next` with the errors and `complete`, or
        # Apollo's error part and closing delimiter (gateway/live_sse.py, live_multipart.py).
        framing = SSE if _content_type(start.get("headers", ())).startswith(b"text/event-stream") else APOLLO
        body = framing.start + framing.error(refusal_body(self._message(), "TOO_MANY_STREAMS")) + framing.complete
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        connections = self.connections
        holder: str | None = None
        refused = False

        async def counted_send(message: Message) -> None:
            nonlocal holder, refused
            if refused:
                return
            if message["type"] == "websocket.accept":
                key = _caller_key(scope)
                if connections.open_stream(key):
                    holder = key
                else:
                    refused = True
                    client = scope.get("client")
                    connections.count("stream_limit", client[0] if client else "-", caller=key)
                    await self._deny(scope, send)
                    return
            await send(message)

        async def counted_receive() -> Message:
            if refused:
                return {"type": "websocket.disconnect", "code": 1008}
            return await receive()

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            if holder is not None:
                connections.close_stream(holder)

    async def _deny(self, scope: Scope, send: Send) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            # The ASGI denial response: 429 and the error, instead of the handshake.
            await send({"type": "websocket.http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
            await send({"type": "websocket.http.response.body",
                        "body": refusal_body(self._message(), "TOO_MANY_STREAMS")})
        else:
            await send({"type": "websocket.close", "code": 1008})
