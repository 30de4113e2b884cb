"""The feed position of an answer: every response of a service's own routes says, in
`X-Feed-Seq`, the highest change-feed seq its reads saw (README, "The change feed"): each
read reads it in its own transaction, after its rows (`tracking` in db.py; a request that
wrote, or read nothing, reads it as it answers). A change commits with its event,
so every change the answer reflects has a seq at or below it: a reader (the gateway's
consistency token) knows which feed position the data it got is as new as. After a write,
it is at least the seq of the write's own event."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .db import tracking

__all__ = ["FeedPosition", "POSITION_HEADER"]

POSITION_HEADER = "X-Feed-Seq"
_SKIP = ("/events", "/_admin", "/_meta", "/healthz", "/openapi.json")
log = logging.getLogger("bookvault.services")


class FeedPosition:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_SKIP):
            await self.app(scope, receive, send)
            return

        async def positioned(message: Message) -> None:
            if message["type"] == "http.response.start":
                try:
                    # A read saw it in its own transaction; after a write, or with no read, ask now.
                    seq = position.read if position.read >= 0 and not position.wrote else await scope["app"].state.ctx.db.head()
                except Exception:  # the answer is sent anyway, without a position
                    log.warning("could not read the feed position", exc_info=True)
                else:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-feed-seq", str(seq).encode())]}
            await send(message)

        with tracking() as position:
            await self.app(scope, receive, positioned)
