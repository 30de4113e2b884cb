"""Apollo's multipart HTTP subscriptions (the protocol Apollo Router speaks, and Apollo
Client's HttpLink, Kotlin and iOS read: apollographql.com/docs/router/executing-operations/
subscription-multipart-protocol): a subscription POSTed with ``Accept:
multipart/mixed;subscriptionSpec="1.0"`` is answered as ``multipart/mixed`` parts with the
boundary ``graphql``, served by the live hub like the other transports (gateway/live_sse.py
writes the stream; this module says how each part looks):

- a message: ``{"payload": {"data", "errors"?}}``;
- a heartbeat when idle: ``{}`` (the router sends one every 5 s; ours every `live_heartbeat`);
- an error that ends the subscription: ``{"payload": null, "errors": [...]}``, then the
  closing delimiter (RFC 2046 §5.1.1: ``--graphql--``)."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from .auth import Caller
from .live import Feed
from .live_sse import Framing, stream_feed
from .state import GatewayState

__all__ = ["SUBSCRIPTION_MULTIPART", "accepts_multipart_subscriptions", "serve_multipart_subscription"]

SUBSCRIPTION_MULTIPART = 'multipart/mixed; boundary="graphql"; subscriptionSpec="1.0"'
_PART = b"\r\ncontent-type: application/json; charset=utf-8\r\n\r\n"
_DELIMITER = b"\r\n--graphql"


def accepts_multipart_subscriptions(accept: str | None) -> bool:
    """Whether Accept names multipart/mixed with subscriptionSpec 1.0 (quoted or not)."""
    for part in (accept or "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        found = dict(p.partition("=")[::2] for p in params)
        if media == "multipart/mixed" and found.get("subscriptionspec", "").strip('"') == "1.0" \
                and found.get("q", "1").strip() not in ("0", "0.0", "0.00", "0.000"):
            return True
    return False


def _part(body: bytes) -> bytes:
    # Each part is followed by its delimiter, so a client hands it on as soon as it arrives.
    return _PART + body + _DELIMITER


APOLLO = Framing(
    headers=[(b"content-type", SUBSCRIPTION_MULTIPART.encode()), (b"cache-control", b"no-cache"),
             (b"x-accel-buffering", b"no")],
    next=lambda payload: _part(b'{"payload":' + payload + b"}"),
    error=lambda errors: _part(b'{"payload":null,' + errors[1:]),
    complete=b"--\r\n",
    heartbeat=_part(b"{}"),
    start=_DELIMITER,
)


async def serve_multipart_subscription(state: GatewayState, feed: Feed, caller: Caller | None, scope: Scope,
                                       receive: Receive, send: Send) -> None:
    await stream_feed(state, feed, caller, receive, send, APOLLO)
