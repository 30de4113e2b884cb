"""Running the gateway on uvicorn (`bookvault gateway`). On SIGTERM/Ctrl-C uvicorn stops
accepting, then waits for the open connections before the lifespan ends: a subscription's
stream never ends by itself (an SSE stream would hold the stop until the grace period
ran out, a WebSocket would be cut with 1012). So the live hub is closed first: WebSockets
get 1001 and SSE streams `complete` (README, "Subscriptions"), then uvicorn goes on."""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.applications import Starlette

__all__ = ["serve"]


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: Any = None) -> None:
        state = getattr(self.app.state, "gateway", None)
        if state is not None and state.live is not None:
            await state.live.close()
        await super().shutdown(sockets)


def serve(app: Starlette, asgi: Any = None, **options: Any) -> None:
    """`uvicorn.run(app, **options)`, subscribers told first; `asgi` is served instead of
    `app` when given (`app` wrapped in middleware)."""
    _Server(uvicorn.Config(asgi or app, **options), app).run()
