"""Running the gateway on uvicorn (`bookvault gateway`). On SIGTERM/Ctrl-C uvicorn stops
accepting, then waits for the open connections before the lifespan ends: a subscription's
stream never ends by itself (an SSE stream would hold the stop until the grace period
ran out, a WebSocket would be cut with 1012). So the live hub is closed first: WebSockets
get 1001 and SSE streams `complete` (README, "Subscriptions"), then uvicorn goes on."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttp", "serve"]


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
    _Server(uvicorn.Config(asgi or app, **{"http": CoalescingHttp, **options}), app).run()
