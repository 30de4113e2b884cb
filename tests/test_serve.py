"""The gateway's HTTP protocol (gateway/serve.py): uvicorn's, with a response's writes sent
together. Every test serving on a real port (tests/shop.py, `on_a_real_port`) runs on it too:
streams, WebSockets, slow readers."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from gateway.serve import _Coalescing
from shop import on_a_real_port


class _Recording:
    """A transport that keeps what it is asked to send, one item per send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def _next_turn() -> None:
    """Returns once the event loop has run what was scheduled before this call."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


async def test_a_head_and_body_written_in_one_turn_leave_in_one_send() -> None:
    """uvicorn writes a response's head and body apart; they reach the socket in one send."""
    socket = _Recording()
    transport = _Coalescing(socket)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"ok")
    assert socket.sent == [] and transport.get_write_buffer_size() == 40
    await _next_turn()
    assert socket.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"next")  # a later turn's writes are a send of their own
    await _next_turn()
    assert socket.sent[1:] == [b"next"]


async def test_a_close_sends_what_was_written_before_it() -> None:
    """Closing (Connection: close, keep-alive expiry) sends the held writes first, then closes."""
    socket = _Recording()
    transport = _Coalescing(socket)  # type: ignore[arg-type]
    transport.writelines([b"HTTP/1.1 204 No Content\r\n", b"connection: close\r\n\r\n"])
    transport.close()
    assert socket.sent == [b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"] and socket.closed
    await _next_turn()
    assert len(socket.sent) == 1  # nothing sent twice


async def test_an_abort_sends_nothing_held() -> None:
    """An aborted connection (a timed-out or broken one) sends none of what was held."""
    socket = _Recording()
    transport = _Coalescing(socket)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.abort()
    await _next_turn()
    assert socket.sent == [] and socket.aborted


async def test_answers_streams_and_keep_alive_work_on_a_real_socket() -> None:
    """Served by uvicorn on the protocol: whole answers on one connection, streamed parts in order."""

    async def parts() -> object:
        for i in range(3):
            yield f"part {i}\n"

    app = Starlette(routes=[Route("/plain", lambda r: PlainTextResponse("x" * 100_000)),
                            Route("/stream", lambda r: StreamingResponse(parts(), media_type="text/plain"))])
    async with on_a_real_port(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        first, second = await client.get("/plain"), await client.get("/plain")
        streamed = await client.get("/stream")
    assert first.text == second.text == "x" * 100_000
    assert streamed.text == "part 0\npart 1\npart 2\n" and streamed.headers["transfer-encoding"] == "chunked"
