"""Subscriptions over WebSocket: the graphql-transport-ws protocol (github.com/enisdenjo/
graphql-ws, PROTOCOL.md), served by the live hub (ARCHITECTURE.md, "Live updates").

The protocol's close codes: 4400 a message not in the protocol, 4401 `subscribe` before
`connection_ack`, 4403 a `connection_init` whose token does not verify, 4408 no
`connection_init` in time, 4409 a subscription id already in use, 4429 a second
`connection_init`. Ours: 4008 a slow consumer (more than `live_queue` messages waiting
to be sent), 1001 the gateway is stopping. The caller is the one the authentication
middleware verified from the `Authorization` header, or, for clients that cannot set
headers (browsers), the bearer token in `connection_init`'s payload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from graphql import GraphQLError
from starlette.websockets import WebSocket, WebSocketDisconnect

from .auth import Caller, bearer, caller_of
from .config import Settings
from .errors import GatewayError, format_errors
from .hub import LiveHub, Subscription
from .outbox import Outbox
from .pipeline import Params, Pipeline, Refused
from .resilience import Deadline
from .state import GatewayState, gateway_state
from .telemetry import operation_span

__all__ = ["PROTOCOL", "SLOW_CONSUMER", "serve_websocket"]

log = logging.getLogger("bookvault.live")
PROTOCOL = "graphql-transport-ws"
SLOW_CONSUMER = 4008
GOING_AWAY = 1001
_CLOSE_TIMEOUT = 2.0  # seconds a close may take on a connection that does not read


class _Sink:
    """One subscription's messages, into its connection's queue."""

    __slots__ = ("connection", "id", "head")

    def __init__(self, connection: _Connection, id: str) -> None:
        self.connection, self.id = connection, id
        self.head = b'{"id":' + orjson.dumps(id) + b',"type":"next","payload":'

    def next(self, payload: bytes) -> bool:
        return self.connection.queue(self.head + payload + b"}")

    def end(self, error: GatewayError | None) -> None:
        if error is None:
            self.connection.finish(GOING_AWAY, "the gateway is stopping")
        else:
            self.connection.subscriptions.pop(self.id, None)
            self.connection.queue(_error(self.id, [GraphQLError(str(error), extensions=error.extensions)]))

    async def closed(self) -> None:
        await self.connection.finished.wait()


class _Connection:
    def __init__(self, websocket: WebSocket, pipeline: Pipeline, state: GatewayState, hub: LiveHub,
                 settings: Settings) -> None:
        self.websocket, self.pipeline, self.state, self.hub, self.settings = websocket, pipeline, state, hub, settings
        self.caller: Caller | None = caller_of(websocket.scope)
        self.acked = False
        self.subscriptions: dict[str, Subscription | None] = {}  # None: being set up
        self.outbox = Outbox(settings.live_queue)
        self.closing: tuple[int, str] | None = None
        self.closed = asyncio.Event()
        self.starting: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()  # the connection is closed

    def queue(self, message: bytes) -> bool:
        if self.outbox.put(message):
            return True
        if not self.outbox.ended:
            self.close(SLOW_CONSUMER, f"slow consumer: more than {self.settings.live_queue} messages unsent")
        return False

    def close(self, code: int, reason: str) -> None:
        """Close now; what is queued is not sent."""
        if self.closing is None:
            self.closing = (code, reason)
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
            for task in (*tasks, *self.starting):
                task.cancel()
            await asyncio.gather(*tasks, *self.starting, return_exceptions=True)
            for subscription in self.subscriptions.values():
                if subscription is not None:
                    self.hub.leave(subscription)
            if self.closing is not None:
                with contextlib.suppress(Exception):  # the peer may be gone, or not reading
                    await asyncio.wait_for(self.websocket.close(*self.closing), _CLOSE_TIMEOUT)
            self.finished.set()

    async def _write(self) -> None:
        outbox, websocket = self.outbox, self.websocket
        while (message := await outbox.get()) is not None:
            outbox.sending = True
            # An idle connection gets a ping (its client answers pong): proxies keep it open.
            await websocket.send_text(message.decode() if message else '{"type":"ping"}')
            outbox.sending = False

    async def _read(self) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            try:
                async with asyncio.timeout(self.settings.live_init_timeout):
                    while not self.acked:
                        await self._receive()
            except TimeoutError:
                return self.close(4408, "Connection initialisation timeout")
            while True:  # also while finishing (1001 after what is queued): pongs, completes
                await self._receive()

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
            self.queue(b'{"type":"pong"}')
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
                self.caller = await authenticator.verify(token)
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
            self.hub.leave(subscription)  # completed or closed meanwhile
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
