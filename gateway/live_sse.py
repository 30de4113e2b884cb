"""Subscriptions over Server-Sent Events: the graphql-sse protocol's "distinct connections
mode" (github.com/enisdenjo/graphql-sse, PROTOCOL.md), served by the live hub
(ARCHITECTURE.md, "Live updates"). strawberry 0.341 speaks graphql-sse too, but runs each
subscriber through graphql-core; the hub shares one read and one shaping per change.

A POST to /graphql with ``Accept: text/event-stream`` (or a GET with the parameters in the
URL, for EventSource) answers one stream: ``event: next`` per message, ``event: complete``
when the subscription ends (refused, the gateway stopping). A refusal (bad document,
UNAUTHENTICATED, FORBIDDEN...) is a `next` with the errors, then `complete`: EventSource
would take a 4xx for a reason to give up. A comment line every `live_heartbeat` seconds
keeps idle streams open; a reader slower than `live_queue` messages is cut off."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from graphql import GraphQLError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import caller_of
from .errors import GatewayError
from .hub import Subscription
from .live import prepare
from .outbox import Outbox
from .persisted import PersistedQueryError
from .state import gateway_state
from .view import GraphQLView, RequestError, _capped, _read, format_errors

__all__ = ["EVENT_STREAM", "EventStream", "Streams", "serve_sse", "wants_events"]

EVENT_STREAM = "text/event-stream"
COMPLETE = b"event: complete\ndata:\n\n"
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]  # proxies: pass each event on at once


def wants_events(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"accept":
            return EVENT_STREAM.encode() in value
    return False


class Streams:
    """/graphql over HTTP: event streams to `events`, the rest (one answer each) to `queries`."""

    def __init__(self, events: ASGIApp, queries: ASGIApp) -> None:
        self.events, self.queries = events, queries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if wants_events(scope) and scope["method"] in ("GET", "POST"):
            await self.events(scope, receive, send)
        else:
            await self.queries(scope, receive, send)


class EventStream:
    """The graphql-sse endpoint (ASGI) over the view's document cache and planner."""

    def __init__(self, view: GraphQLView) -> None:
        self.view = view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_sse(self.view, scope, receive, send)


def _next(payload: bytes) -> bytes:
    return b"event: next\ndata: " + payload + b"\n\n"


class _Sink:
    __slots__ = ("outbox", "dropped", "streaming")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox, self.dropped = outbox, False
        self.streaming: asyncio.Task[None] | None = None

    def next(self, payload: bytes) -> bool:
        if self.outbox.put(_next(payload)):
            return True
        self.dropped = True  # a slow consumer: the stream is cut off where it is, no `complete`
        if self.streaming is not None:
            self.streaming.cancel()
        return False

    def end(self, error: GatewayError | None) -> None:
        if error is not None:
            self.outbox.put(_next(_errors([GraphQLError(str(error), extensions=error.extensions)])), last=False)
        self.outbox.put(COMPLETE, last=True)

    async def closed(self) -> None:
        if self.streaming is not None:
            await asyncio.wait([self.streaming])


def _errors(errors: list[GraphQLError]) -> bytes:
    return orjson.dumps({"errors": format_errors(errors)})


async def serve_sse(view: GraphQLView, scope: Scope, receive: Receive, send: Send) -> None:
    state = gateway_state(Request(scope))
    request = Request(scope, _capped(receive, view.settings.max_request_bytes))
    try:
        params = await _read(request)
        text, _ = await view.query_text(params)
    except (RequestError, PersistedQueryError) as exc:
        body = {"errors": [{"message": exc.message, "extensions": {"code": exc.code}}]}
        await Response(orjson.dumps(body), exc.status, media_type="application/json")(scope, receive, send)
        return
    outbox = Outbox(view.settings.live_queue)
    sink = _Sink(outbox)
    subscription: Subscription | None = None
    try:
        feed = await prepare(view, text, params.variables, params.operation_name)
        if isinstance(feed, list):
            refusal = feed
        else:
            subscription = await state.live.subscribe(feed, caller_of(scope), sink)
            refusal = None
    except GatewayError as exc:
        refusal = [GraphQLError(str(exc), extensions=exc.extensions)]
    if refusal is not None:
        outbox.put(_next(_errors(refusal)))
        outbox.put(COMPLETE, last=True)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    gone = asyncio.create_task(_disconnected(receive))
    gone.add_done_callback(lambda _: outbox.end())  # a client that left: stop at once
    sink.streaming = asyncio.create_task(_stream(outbox, send))
    try:
        await asyncio.gather(sink.streaming, return_exceptions=True)
    finally:
        gone.cancel()
        if subscription is not None:
            state.live.leave(subscription)
    if not sink.dropped and not gone.done():
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _stream(outbox: Outbox, send: Send) -> None:
    while (message := await outbox.get()) is not None:
        outbox.sending = True
        await send({"type": "http.response.body", "body": message or b":\n\n", "more_body": True})
        outbox.sending = False


async def _disconnected(receive: Receive) -> None:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
