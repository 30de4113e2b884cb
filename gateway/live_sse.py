"""Server-Sent Events: the graphql-sse protocol's "distinct connections mode"
(github.com/enisdenjo/graphql-sse, PROTOCOL.md). The HTTP adapter (gateway/view.py) sends
here what the operation pipeline admitted: a subscription, served by the live hub
(ARCHITECTURE.md, "Live updates"); or, for a client that accepts only event streams, one
query's answer. strawberry speaks graphql-sse too, but runs each subscriber through
graphql-core; the hub shares one read and one shaping per change.

The stream is ``event: next`` per message and ``event: complete`` when it ends (refused,
the gateway stopping). A refusal (bad document, UNAUTHENTICATED, FORBIDDEN...) is a `next`
with the errors, then `complete`: EventSource would take a 4xx for a reason to give up.
A comment line every `live_heartbeat` seconds keeps idle streams open; a slow reader is cut
off where it is, without `complete` (gateway/outbox.py: too much in flight behind a send
that does not return, or a send blocked for `live_send_timeout`).

Rights end with the token (issue 25): when the caller's token expires (its `exp` plus the
configured leeway), what is still queued is dropped and the stream ends with a `next`
carrying UNAUTHENTICATED, then `complete` (a multipart part with the error, then the
closing delimiter). The client subscribes again with a fresh token: each stream is one
request, so that is the refresh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from graphql import GraphQLError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .auth import Caller
from .errors import GatewayError, Unauthenticated
from .hub import Subscription, expires_in
from .live import Feed
from .outbox import Outbox
from .errors import format_errors
from .state import GatewayState

__all__ = ["EVENT_STREAM", "Framing", "serve_sse", "sse_answer", "sse_refusal", "stream_feed"]

EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class Framing:
    """How a subscription's messages are written on an HTTP stream: graphql-sse's events
    here, Apollo's multipart parts in gateway/live_multipart.py."""

    headers: list[tuple[bytes, bytes]]
    next: Callable[[bytes], bytes]  # a payload ({"data", "errors"?}) as sent
    error: Callable[[bytes], bytes]  # the errors ({"errors": [...]}) that end the subscription
    complete: bytes  # the end of the stream
    heartbeat: bytes  # written when idle for `live_heartbeat` seconds
    start: bytes = b""  # written before the first message


def _next(payload: bytes) -> bytes:
    return b"event: next\ndata: " + payload + b"\n\n"


SSE = Framing(
    headers=[(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
             (b"x-accel-buffering", b"no")],  # proxies: pass each event on at once
    next=_next, error=_next, complete=b"event: complete\ndata:\n\n", heartbeat=b":\n\n")


class _Sink:
    __slots__ = ("outbox", "framing", "dropped", "streaming")

    def __init__(self, outbox: Outbox, framing: Framing) -> None:
        self.outbox, self.framing, self.dropped = outbox, framing, False
        self.streaming: asyncio.Task[None] | None = None

    def next(self, payload: bytes) -> bool:
        if self.outbox.ended or self.outbox.put(self.framing.next(payload)):
            return True  # queued, or the stream is ending anyway (not slowness)
        self.cut()
        return False

    def cut(self) -> None:
        """A slow consumer: the stream is cut off where it is, no `complete`."""
        self.dropped = True
        if self.streaming is not None:
            self.streaming.cancel()

    def end(self, error: GatewayError | None) -> None:
        if error is not None:
            self.fail([GraphQLError(str(error), extensions=error.extensions)])
        self.outbox.put(self.framing.complete, last=True)

    def fail(self, errors: list[GraphQLError]) -> None:
        """The errors that end the stream (`complete` follows)."""
        self.outbox.put(self.framing.error(_errors(errors)), last=False)
        self.outbox.put(self.framing.complete, last=True)

    async def room(self) -> bool:
        await self.outbox.room()
        return not self.outbox.ended

    def full(self) -> bool:
        return self.outbox.full()

    @property
    def slow(self) -> bool:
        return self.dropped

    async def closed(self) -> None:
        if self.streaming is not None:
            await asyncio.wait([self.streaming])


def _errors(errors: list[GraphQLError]) -> bytes:
    return orjson.dumps({"errors": format_errors(errors)})


def _headers(framing: Framing) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in framing.headers}


def sse_refusal(errors: list[GraphQLError]) -> Response:
    """A refused operation as a stream: its errors as one `next`, then `complete`."""
    return Response(_next(_errors(errors)) + SSE.complete, headers=_headers(SSE))


def sse_answer(body: dict[str, Any]) -> Response:
    """A query's or mutation's answer as a stream: one `next`, then `complete`."""
    return Response(_next(orjson.dumps(body)) + SSE.complete, headers=_headers(SSE))


async def serve_sse(state: GatewayState, feed: Feed, caller: Caller | None, scope: Scope, receive: Receive,
                    send: Send) -> None:
    await stream_feed(state, feed, caller, receive, send, SSE)


async def stream_feed(state: GatewayState, feed: Feed, caller: Caller | None, receive: Receive, send: Send,
                      framing: Framing) -> None:
    """The admitted subscription `feed`, streamed until it ends or the client leaves. The
    stream starts before the first state: its messages wait for room in the outbox
    (gateway/outbox.py), which the stream empties as the client reads."""
    hub, settings = state.live, state.settings
    assert hub is not None
    outbox = Outbox(settings.live_queue, settings.live_queue_bytes, settings.live_send_timeout)
    if caller is not None:
        outbox.budgets = (hub.budget(caller, settings.live_caller_in_flight),)
    sink = _Sink(outbox, framing)
    outbox.stalled = sink.cut
    await send({"type": "http.response.start", "status": 200, "headers": framing.headers})
    if framing.start:
        await send({"type": "http.response.body", "body": framing.start, "more_body": True})
    gone = asyncio.create_task(_disconnected(receive))
    gone.add_done_callback(lambda _: outbox.end())  # a client that left: stop at once
    sink.streaming = asyncio.create_task(_stream(outbox, send, framing.heartbeat))
    subscription: Subscription | None = None
    expiry: asyncio.TimerHandle | None = None

    def expired() -> None:
        """The token's end: nothing more is sent but UNAUTHENTICATED, then the end."""
        hub.expired += 1
        if subscription is not None:
            hub.leave(subscription)
        outbox.clear()
        sink.end(Unauthenticated("the token has expired; subscribe again with a fresh one"))

    try:
        delay = expires_in(caller, settings.jwt.leeway)
        if delay is not None:
            expiry = asyncio.get_running_loop().call_later(max(0.0, delay), expired)
        try:
            subscription = await hub.subscribe(feed, caller, sink)
        except GatewayError as exc:
            sink.end(exc)
        except Exception as exc:  # a bug: masked (and logged) by format_errors, the stream still ends
            sink.fail([GraphQLError(str(exc), original_error=exc)])
        if outbox.ended and subscription is not None:
            hub.leave(subscription)  # it expired, or the client left, while its first state was sent
        await asyncio.gather(sink.streaming, return_exceptions=True)
    finally:
        if expiry is not None:
            expiry.cancel()
        gone.cancel()
        sink.streaming.cancel()  # when something above failed
        if subscription is not None:
            (hub.drop if sink.dropped else hub.leave)(subscription)
        outbox.release()
    if not sink.dropped and not gone.done():
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _stream(outbox: Outbox, send: Send, heartbeat: bytes) -> None:
    async def one(message: bytes) -> None:
        await send({"type": "http.response.body", "body": message or heartbeat, "more_body": True})

    await outbox.send_each(one)


async def _disconnected(receive: Receive) -> None:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
