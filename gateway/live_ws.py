"""Subscriptions over WebSocket: the graphql-transport-ws protocol (github.com/enisdenjo/
graphql-ws, PROTOCOL.md), served by the live hub (ARCHITECTURE.md, "Live updates").

The protocol's close codes: 4400 a message not in the protocol, 4401 `subscribe` before
`connection_ack`, 4403 a `connection_init` whose token does not verify, 4408 no
`connection_init` in time, 4409 a subscription id already in use, 4429 a second
`connection_init`. Ours: 4008 a slow consumer (gateway/outbox.py: too much in flight
behind a send that does not return, or a send blocked for `live_send_timeout`), 1001 the
gateway is stopping, 1008 a flood of pings (RFC 6455 §7.4.1, policy violation). The caller
is the one the authentication middleware verified from the `Authorization` header, or, for
clients that cannot set headers (browsers), the bearer token in `connection_init`'s payload.

Rights end with the token (issue 25): when the caller's token expires (its `exp` plus the
configured leeway), the connection is closed with 4403 and the reason `UNAUTHENTICATED:
...`, whatever is still queued is not sent. `connection_init` is one-shot in the protocol,
so a client refreshes by connecting again with a fresh token: graphql-ws's client does so
by itself, as 4403 is not one of the codes it gives up on, and it asks `connectionParams`
(a function) for the token again. One close for the whole connection rather than an
`error` per subscription: every subscription and any later `subscribe` on it would run
with the expired rights.

Client `ping`s get a `pong` up to `live_ping_rate` a second (a burst of `PING_BURST`);
more are dropped unanswered (counted in /metrics), and a connection that goes on past
`PING_FLOOD` dropped pings in a row is closed with 1008."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from graphql import GraphQLError
from starlette.websockets import WebSocket, WebSocketDisconnect

from .auth import Caller, bearer, caller_of
from .config import Settings
from .errors import GatewayError, Unauthenticated, format_errors
from .hub import LiveHub, Subscription, expires_in
from .outbox import SLICE, Outbox
from .pipeline import Params, Pipeline, Refused
from .resilience import Deadline
from .state import GatewayState, gateway_state
from .telemetry import operation_span

__all__ = ["PROTOCOL", "SLOW_CONSUMER", "serve_websocket"]

log = logging.getLogger("bookvault.live")
PROTOCOL = "graphql-transport-ws"
SLOW_CONSUMER = 4008
GOING_AWAY = 1001
EXPIRED = 4403  # the protocol's Forbidden: graphql-ws's client reconnects after it
POLICY_VIOLATION = 1008
PING_BURST = 10  # pings answered at once before the rate applies
PING_FLOOD = 100  # pings dropped in a row past which the connection is closed
_CLOSE_TIMEOUT = 2.0  # seconds a close may take on a connection that does not read


class _Sink:
    """One subscription's messages, into its connection's queue."""

    __slots__ = ("connection", "id", "head")

    def __init__(self, connection: _Connection, id: str) -> None:
        self.connection, self.id = connection, id
        self.head = b'{"id":' + orjson.dumps(id) + b',"type":"next","payload":'

    def next(self, payload: bytes) -> bool:
        if self.connection.outbox.ended:
            return True  # closing anyway: not slowness
        return self.connection.queue(self.head + payload + b"}")

    def end(self, error: GatewayError | None) -> None:
        if error is None:
            self.connection.finish(GOING_AWAY, "the gateway is stopping")
        else:
            self.connection.subscriptions.pop(self.id, None)
            self.connection.queue(_error(self.id, [GraphQLError(str(error), extensions=error.extensions)]))

    async def room(self) -> bool:
        await self.connection.outbox.room()
        return not self.connection.outbox.ended

    def full(self) -> bool:
        return self.connection.outbox.full()

    @property
    def slow(self) -> bool:
        return self.connection.closing is not None and self.connection.closing[0] == SLOW_CONSUMER

    async def closed(self) -> None:
        await self.connection.finished.wait()


class _Pings:
    """A token bucket (`rate` a second, `PING_BURST` deep) for the client's pings."""

    __slots__ = ("at", "dropped", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at, self.dropped = rate, float(PING_BURST), time.monotonic(), 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(PING_BURST), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.dropped = 0
            return True
        self.dropped += 1
        return False


class _Connection:
    def __init__(self, websocket: WebSocket, pipeline: Pipeline, state: GatewayState, hub: LiveHub,
                 settings: Settings) -> None:
        self.websocket, self.pipeline, self.state, self.hub, self.settings = websocket, pipeline, state, hub, settings
        self.caller: Caller | None = None
        self.acked = False
        self.subscriptions: dict[str, Subscription | None] = {}  # None: being set up
        self.outbox = Outbox(settings.live_queue, settings.live_queue_bytes, settings.live_send_timeout,
                             stalled=self._stalled)
        self.closing: tuple[int, str] | None = None
        self.closed = asyncio.Event()
        self.starting: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()  # the connection is closed
        self.pings = _Pings(settings.live_ping_rate)
        self.expiry: asyncio.TimerHandle | None = None
        self._as(caller_of(websocket.scope))

    def _as(self, caller: Caller | None) -> None:
        """The connection acts for `caller` from now on: its budget, and its token's end."""
        self.caller = caller
        self.outbox.budgets = (self.hub.budget(caller, self.settings.live_caller_in_flight),) if caller else ()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        delay = expires_in(caller, self.settings.jwt.leeway)
        if delay is not None:
            self.expiry = asyncio.get_running_loop().call_later(max(0.0, delay), self._expired)

    def _expired(self) -> None:
        self.expiry = None
        self.hub.expired += sum(1 for s in self.subscriptions.values() if s is not None and s.active)
        error = Unauthenticated("the token has expired; connect again with a fresh one")
        self.close(EXPIRED, f"{error.code}: {error}")

    def _release(self, subscription: Subscription) -> None:
        """It leaves the hub; counted as a slow consumer's when that is why the connection closes."""
        slow = self.closing is not None and self.closing[0] == SLOW_CONSUMER
        (self.hub.drop if slow else self.hub.leave)(subscription)

    def _stalled(self) -> None:
        self.close(SLOW_CONSUMER, f"slow consumer: a send blocked for {self.settings.live_send_timeout:g} s")

    def queue(self, message: bytes) -> bool:
        if self.outbox.put(message):
            return True
        if not self.outbox.ended:
            self.close(SLOW_CONSUMER, f"slow consumer: more than {self.settings.live_queue} messages "
                                      f"or {self.settings.live_queue_bytes} bytes unsent")
        return False

    def close(self, code: int, reason: str) -> None:
        """Close now; what is queued is not sent."""
        if self.closing is None:
            self.closing = (code, reason)
        self.outbox.end()  # nothing more is queued (first states waiting for room stop)
        self.closed.set()

    def finish(self, code: int, reason: str) -> None:
        """Close once what is queued is sent."""
        if self.closing is None:
            self.closing = (code, reason)
            self.outbox.end()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write()),
                 asyncio.create_task(self.closed.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self.expiry is not None:
                self.expiry.cancel()
            for task in (*tasks, *self.starting):
                task.cancel()
            await asyncio.gather(*tasks, *self.starting, return_exceptions=True)
            for subscription in self.subscriptions.values():
                if subscription is not None:
                    self._release(subscription)
            self.outbox.release()  # what it held in flight no longer counts against its caller
            if self.closing is not None:
                with contextlib.suppress(Exception):  # the peer may be gone, or not reading
                    await asyncio.wait_for(self.websocket.close(*self.closing), _CLOSE_TIMEOUT)
            self.finished.set()

    async def _write(self) -> None:
        websocket = self.websocket

        async def send(message: bytes) -> None:
            # An idle connection gets a ping (its client answers pong): proxies keep it open.
            await websocket.send_text(message.decode() if message else '{"type":"ping"}')

        await self.outbox.send_each(send)

    async def _read(self) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            try:
                async with asyncio.timeout(self.settings.live_init_timeout):
                    while not self.acked:
                        await self._receive()
            except TimeoutError:
                return self.close(4408, "Connection initialisation timeout")
            since = time.perf_counter()
            while True:  # also while finishing (1001 after what is queued): pongs, completes
                await self._receive()
                # Messages already received are handed over without a wait: a flood of them
                # would hold the loop; let it poll between slices.
                if time.perf_counter() - since > SLICE:
                    await asyncio.sleep(0)
                    since = time.perf_counter()

    async def _receive(self) -> None:
        received = await self.websocket.receive()
        if received["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(received.get("code", 1000))
        try:
            message = orjson.loads(received.get("text") or received.get("bytes") or b"")
            kind = message["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return self.close(4400, "Invalid message")
        if kind == "connection_init":
            await self._init(message.get("payload"))
        elif kind == "ping":
            if self.pings.take():
                self.queue(b'{"type":"pong"}')
            else:
                self.hub.pings_dropped += 1
                if self.pings.dropped > PING_FLOOD:
                    self.close(POLICY_VIOLATION, f"too many pings: at most {self.settings.live_ping_rate:g} a second")
        elif kind == "pong":
            pass
        elif kind == "subscribe":
            self._subscribe(message)
        elif kind == "complete":
            subscription = self.subscriptions.pop(str(message.get("id")), None)
            if subscription is not None:
                self.hub.leave(subscription)
        else:
            self.close(4400, f"Invalid message type {str(kind)[:32]!r}")

    async def _init(self, payload: Any) -> None:
        if self.acked:
            return self.close(4429, "Too many initialisation requests")
        raw = None
        if isinstance(payload, dict):
            raw = payload.get("Authorization", payload.get("authorization"))
        token = bearer(raw) if isinstance(raw, str) else None
        if token is not None:
            authenticator = gateway_state(self.websocket).authenticator
            try:
                if not token or authenticator is None:
                    raise GatewayError("no bearer token this gateway can verify")
                self._as(await authenticator.verify(token))
            except GatewayError:
                return self.close(4403, "Forbidden")
        self.acked = True
        self.queue(b'{"type":"connection_ack"}')

    def _subscribe(self, message: dict[str, Any]) -> None:
        if not self.acked:
            return self.close(4401, "Unauthorized")
        id, payload = message.get("id"), message.get("payload")
        if not isinstance(id, str) or not id or not isinstance(payload, dict):
            return self.close(4400, "Invalid subscribe message")
        if id in self.subscriptions:
            return self.close(4409, f"Subscriber for {id[:64]} already exists")
        if len(self.subscriptions) >= self.settings.live_per_connection:
            refusal = GraphQLError(f"a connection holds at most {self.settings.live_per_connection} subscriptions",
                                   extensions={"code": "TOO_MANY_SUBSCRIPTIONS"})
            self.queue(_error(id, [refusal]))
            return
        self.subscriptions[id] = None
        task = asyncio.create_task(self._start(id, payload), name=f"subscribe:{id[:32]}")
        self.starting.add(task)
        task.add_done_callback(self.starting.discard)

    async def _start(self, id: str, payload: dict[str, Any]) -> None:
        """An operation through the pipeline, as every transport's: a subscription is
        followed; a query or mutation (graphql-ws serves any operation) is answered with one
        `next`, then `complete`."""
        deadline = Deadline.for_request(self.settings.resilience.deadline)
        client = self.websocket.client
        try:
            with operation_span() as span:
                # A hundred subscribe messages arrive in one read: admitted a few at a time,
                # in turn with other callers' (gateway/hub.py, `Turns`).
                await self.hub.turns.take(self.caller.key if self.caller is not None else None)
                operation = await self.pipeline.admit(Params.of(payload), state=self.state, caller=self.caller,
                                                      client=client.host if client else None, deadline=deadline,
                                                      span=span, method="WS")
                if operation.feed is None:
                    context = self.pipeline.context(self.websocket, self.state, self.caller, deadline)
                    answer = await self.pipeline.answer(operation, context, span)
                    assert isinstance(answer, dict)  # no parts over a WebSocket: @defer is ignored
                    if self.subscriptions.pop(id, False) is None:
                        self.queue(b'{"id":' + orjson.dumps(id) + b',"type":"next","payload":' + orjson.dumps(answer)
                                   + b"}")
                        self.queue(b'{"id":' + orjson.dumps(id) + b',"type":"complete"}')
                    return
                span.outcome = "subscription"
            subscription = await self.hub.subscribe(operation.feed, self.caller, _Sink(self, id))
            if self.subscriptions.get(id, False) is None and self.closing is None:
                self.subscriptions[id] = subscription
                return
            self._release(subscription)  # completed or closed meanwhile
            return
        except Refused as refused:
            errors = refused.errors
        except GatewayError as exc:
            errors = [GraphQLError(str(exc), extensions=exc.extensions)]
        except Exception as exc:  # a bug: masked, logged by format_errors
            errors = [GraphQLError(str(exc), original_error=exc)]
        if self.subscriptions.pop(id, False) is None:
            self.queue(_error(id, errors))


def _error(id: str, errors: list[GraphQLError]) -> bytes:
    return orjson.dumps({"id": id, "type": "error", "payload": format_errors(errors)})


async def serve_websocket(websocket: WebSocket) -> None:
    """The /graphql WebSocket endpoint."""
    if PROTOCOL not in websocket.scope.get("subprotocols", ()):
        await websocket.close(1002, f"only the {PROTOCOL} subprotocol is spoken here")  # before accept: HTTP 403
        return
    state = gateway_state(websocket)
    assert state.live is not None
    await websocket.accept(PROTOCOL)
    await _Connection(websocket, websocket.app.state.graphql, state, state.live, state.settings).run()
