"""The gateway's HTTP/1.1 client for the services (gateway/http1.py): keep-alive connections
within a limit, every framing of a body, the body cap, and what a broken or late answer
becomes (ARCHITECTURE.md, "Upstream calls")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from gateway import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.config import ResilienceConfig, ServiceConfig
from gateway.http1 import Client, Oversized
from gateway.resilience import Resilience
from gateway.upstream import Upstream
from shop import serving

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


class KeepAliveServer:
    """Answers each request on a connection with `answer(n)` (n: the request's number on the
    server, from 0; None: no answer) and keeps the connection open; counts connections."""

    def __init__(self, answer: Callable[[int], bytes | None]) -> None:
        self.answer = answer
        self.requests = 0
        self.connections = 0
        self.open = 0
        self.most_open = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                n, self.requests = self.requests, self.requests + 1
                reply = self.answer(n)
                if reply is None:
                    await reader.read()  # until the client gives up and closes
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    def serving(self) -> contextlib.AbstractAsyncContextManager[str]:
        return serving(self._handle)


def upstream_for(url: str, **config: object) -> Upstream:
    cfg = ServiceConfig(name="svc", url=url, **{"retries": 0, **config})  # type: ignore[arg-type]
    return Upstream({"svc": cfg}, resilience=Resilience({"svc": cfg}, ResilienceConfig()))


async def test_sequential_calls_share_one_connection() -> None:
    """Twenty calls one after another open one connection to the service."""
    server = KeepAliveServer(lambda n: OK)
    async with server.serving() as url:
        client = Client(url, limit=4, cap=1000, connect_timeout=1)
        replies = [await client.request("GET", "/x", {}, None, 1) for _ in range(20)]
        await client.aclose()
    assert [r.body for r in replies] == [b'{"ok":true}'] * 20
    assert server.connections == 1


async def test_a_connection_idle_past_the_keepalive_is_not_reused() -> None:
    """A connection left idle longer than the keep-alive expiry is closed, not sent a request the server may be closing on."""
    now = [100.0]
    server = KeepAliveServer(lambda n: OK)
    async with server.serving() as url:
        client = Client(url, limit=4, cap=1000, connect_timeout=1, keepalive=4.0, clock=lambda: now[0])
        await client.request("GET", "/x", {}, None, 1)
        now[0] += 3.9
        await client.request("GET", "/x", {}, None, 1)
        assert server.connections == 1
        now[0] += 4.1
        await client.request("GET", "/x", {}, None, 1)
        await client.aclose()
    assert server.connections == 2


async def test_concurrent_calls_stay_within_the_connection_limit() -> None:
    """Twelve calls at once with a limit of 3: all answered, never more than 3 connections open."""
    server = KeepAliveServer(lambda n: OK)
    async with server.serving() as url:
        client = Client(url, limit=3, cap=1000, connect_timeout=1)
        replies = await asyncio.gather(*(client.request("GET", f"/x?n={i}", {}, None, 2) for i in range(12)))
        await client.aclose()
    assert all(r.status == 200 for r in replies)
    assert server.connections <= 3 and server.most_open <= 3


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    """A chunked body (RFC 9112 §7.1) and one that ends with the connection (§6.3) arrive whole."""
    chunked = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\n{\"a\":\r\n3\r\n[1]\r\n1\r\n}\r\n0\r\n\r\n")
    server = KeepAliveServer(lambda n: chunked)
    async with server.serving() as url:
        upstream = upstream_for(url)
        assert await upstream.get_json("svc", "/x") == {"a": [1]}
        assert await upstream.get_json("svc", "/x") == {"a": [1]}
        await upstream.aclose()
    assert server.connections == 1  # a chunked answer leaves the connection reusable

    until_close = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"b\":2}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(until_close)
        await writer.drain()
        writer.close()

    async with serving(handle) as url:
        upstream = upstream_for(url)
        assert await upstream.get_json("svc", "/x") == {"b": 2}
        await upstream.aclose()


async def test_an_interim_answer_is_passed_over() -> None:
    """A 100 Continue before the answer (RFC 9110 §15.2) is not taken for it."""
    server = KeepAliveServer(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    async with server.serving() as url:
        upstream = upstream_for(url)
        assert await upstream.get_json("svc", "/x") == {"ok": True}
        assert await upstream.get_json("svc", "/x") == {"ok": True}
        await upstream.aclose()
    assert server.connections == 1


async def test_a_chunked_body_past_the_cap_is_refused() -> None:
    """A body without a length that grows past the cap is UPSTREAM_BAD_RESPONSE, not read on."""
    big = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
    server = KeepAliveServer(lambda n: big)
    async with server.serving() as url:
        client = Client(url, limit=1, cap=100, connect_timeout=1)
        with pytest.raises(Oversized):
            await client.request("GET", "/x", {}, None, 1)
        await client.aclose()
        upstream = upstream_for(url, max_body_bytes=100)
        with pytest.raises(UpstreamBadResponse):
            await upstream.get_json("svc", "/x")
        await upstream.aclose()


async def test_an_answer_that_is_not_http_is_not_retried() -> None:
    """Bytes that are not HTTP/1.1 make UPSTREAM_UNAVAILABLE at once: sent once, even with retries allowed."""
    server = KeepAliveServer(lambda n: b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    async with server.serving() as url:
        upstream = upstream_for(url, retries=3)
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.get_json("svc", "/x")
        await upstream.aclose()
    assert not caught.value.retryable and server.requests == 1


async def test_a_late_answer_never_reaches_the_next_call() -> None:
    """A call that timed out leaves its connection: the next call gets its own answer on a new one."""
    server = KeepAliveServer(lambda n: None if n == 0 else OK)
    async with server.serving() as url:
        upstream = upstream_for(url, read_timeout=0.2)
        with pytest.raises(UpstreamTimeout):
            await upstream.get_json("svc", "/x")
        assert await upstream.get_json("svc", "/x") == {"ok": True}
        await upstream.aclose()
    assert server.connections == 2
