"""Connection bounds (gateway/connections.py, issue 25): over real sockets, a `bookvault
gateway` process (or, for subscriptions, the gateway app over the in-process services on
gateway/serve.py's server) closes silent, stalled and trickled connections within their
bounds, keeps answering new clients through a flood of idle ones, refuses past its caps
with a code, and treats a client that hangs up mid-body as no error of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from gateway.config import ConnectionLimits
from gateway.serve import server
from process_tree import end
from ports import free_port
from shop import Shop, as_customer, closed_port_url, running_gateway

MARGIN = 1.5  # seconds a bound may be late by on two loaded cores
PROTOCOL = Subprotocol("graphql-transport-ws")
ORDER_UPDATES = {"query": "subscription { orderUpdated(id: 1) { id status } }"}


class Gateway:
    """`bookvault gateway` as a child process in its own session, its stderr read line by line."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.more = asyncio.Condition()
        self.reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            async with self.more:
                self.lines.append(line.decode(errors="replace"))
                self.more.notify_all()

    async def line(self, pattern: str, timeout: float = 10) -> str:
        """The first line of its log matching `pattern`, waited for."""
        async with asyncio.timeout(timeout), self.more:
            while True:
                found = [line for line in self.lines if re.search(pattern, line)]
                if found:
                    return found[0]
                await self.more.wait()

    async def metric(self, name: str) -> float:
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            text = (await client.get("/metrics")).text
        match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, nofile: int | None = None, **settings: str) -> AsyncIterator[Gateway]:
    """`bookvault gateway` with `settings` (BOOKVAULT_* without the prefix) and no services
    behind it (nothing here reads them); `nofile`: its file-descriptor limit (prlimit)."""
    port = free_port()  # outside the ephemeral range (tests/ports.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOKVAULT_", "REDIS_URL", "OTEL_"))}
    env |= {f"BOOKVAULT_{name.upper()}_URL": closed_port_url() for name in ("customers", "catalog", "inventory",
                                                                           "orders", "payments", "shipping")}
    env |= {"BOOKVAULT_PORT": str(port), "BOOKVAULT_DATA_DIR": str(tmp_path), "BOOKVAULT_FOLLOW_FEEDS": "0",
            "BOOKVAULT_DOCUMENT_WORKERS": "0", **{f"BOOKVAULT_{k.upper()}": v for k, v in settings.items()}}
    command = [str(Path(sys.executable).with_name("bookvault")), "gateway"]
    if nofile is not None:
        command = ["prlimit", f"--nofile={nofile}:{nofile}", *command]
    process = await asyncio.create_subprocess_exec(*command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                   start_new_session=True)
    running = Gateway(process, port)
    try:
        async with asyncio.timeout(30), httpx.AsyncClient(timeout=1) as client:
            while True:  # up when /healthz answers: uvicorn offers no signal a parent can await
                assert process.returncode is None, "".join(running.lines)
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{running.url}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            await end(process, [])
        running.reading.cancel()


async def open_connection(url: str, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def answer_and_close(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and when it closed."""
    received = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
    return received, time.monotonic()


def error_code(answer: bytes) -> str:
    return str(json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"][0]["extensions"]["code"])


HEAD = (b"POST /graphql HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n")


async def test_a_silent_connection_is_closed_at_the_head_timeout(tmp_path: Path) -> None:
    """A connection that never sends a byte is closed, unanswered, once the head timeout passes."""
    async with gateway(tmp_path, head_timeout_s="0.5") as gw:
        reader, _ = await open_connection(gw.url)
        opened = time.monotonic()
        received, closed = await answer_and_close(reader)
        assert received == b""
        assert 0.45 <= closed - opened <= 0.5 + MARGIN
        assert await gw.metric('bookvault_connections_refused_total{reason="head_timeout"}') == 1


async def test_a_stalled_head_gets_408_at_the_head_timeout(tmp_path: Path) -> None:
    """Part of a head, then silence: 408 REQUEST_TIMEOUT and the connection closed, at the head timeout."""
    async with gateway(tmp_path, head_timeout_s="0.5") as gw:
        reader, writer = await open_connection(gw.url)
        opened = time.monotonic()
        writer.write(HEAD[:40])
        received, closed = await answer_and_close(reader)
        assert received.startswith(b"HTTP/1.1 408 ") and error_code(received) == "REQUEST_TIMEOUT"
        assert 0.45 <= closed - opened <= 0.5 + MARGIN
        assert len(await gw.line('"reason":"head_timeout"')) < 400  # one line, no traceback
        assert not any("Traceback" in line for line in gw.lines)


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
async def test_a_slow_body_gets_408_within_the_request_deadline(tmp_path: Path, trickle: bool) -> None:
    """A body that stalls after 36 bytes, or comes a byte every 100 ms, is answered 408 by the deadline, and the connection closed."""
    async with gateway(tmp_path, deadline_ms="800") as gw:
        reader, writer = await open_connection(gw.url)
        started = time.monotonic()
        writer.write(HEAD + b'{"query": "{ books(ids: [1]) { id } ')

        async def drip() -> None:
            while trickle:
                await asyncio.sleep(0.1)
                writer.write(b" ")

        dripping = asyncio.create_task(drip())
        try:
            received, closed = await answer_and_close(reader)
        finally:
            dripping.cancel()
        assert received.startswith(b"HTTP/1.1 408 ") and error_code(received) == "REQUEST_TIMEOUT"
        assert 0.75 <= closed - started <= 0.8 + MARGIN
        line = await gw.line('"status":408')
        assert '"path":"/graphql"' in line


async def test_a_body_nobody_reads_is_cut_at_the_body_timeout(tmp_path: Path) -> None:
    """/healthz refuses a POST at once (405); the body nobody reads may not trickle on past the body timeout."""
    async with gateway(tmp_path, body_timeout_s="0.8") as gw:
        reader, writer = await open_connection(gw.url)
        started = time.monotonic()
        writer.write(b"POST /healthz HTTP/1.1\r\nhost: gateway\r\ncontent-length: 1000\r\n\r\n")

        async def drip() -> None:
            while True:
                await asyncio.sleep(0.1)
                writer.write(b" ")

        dripping = asyncio.create_task(drip())
        try:
            received, closed = await answer_and_close(reader)
        finally:
            dripping.cancel()
        assert received.startswith(b"HTTP/1.1 405 ")
        assert 0.75 <= closed - started <= 0.8 + MARGIN
        assert await gw.metric('bookvault_connections_refused_total{reason="body_timeout"}') == 1


async def test_a_head_past_its_size_limit_gets_431(tmp_path: Path) -> None:
    """A head that goes on past BOOKVAULT_MAX_HEAD_BYTES is answered 431 before it ends."""
    async with gateway(tmp_path, max_head_bytes="8192") as gw:
        reader, writer = await open_connection(gw.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nx-padding: " + b"a" * 20_000)
        received, _ = await answer_and_close(reader)
        assert received.startswith(b"HTTP/1.1 431 ") and error_code(received) == "HEAD_TOO_LARGE"


async def test_a_client_that_hangs_up_mid_body_is_no_500_and_no_traceback(tmp_path: Path) -> None:
    """Half a body, then the client is gone: logged as 499, with no traceback and no 500."""
    async with gateway(tmp_path) as gw:
        for _ in range(3):
            _, writer = await open_connection(gw.url)
            writer.write(HEAD + b" " * 100)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await gw.line('"status":499')
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:  # the log is written up to here
            assert (await client.post("/graphql", json={"query": "{ __typename }"})).status_code == 200
        await gw.line('"status":200')
        assert sum('"status":499' in line for line in gw.lines) == 3
        assert not any("Traceback" in line or '"status":500' in line or "Exception" in line for line in gw.lines)


def _raise_own_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard < needed:
            pytest.skip(f"the file-descriptor limit ({hard}) is below the {needed} this test opens")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_idle_connections_past_the_file_limit_do_not_stop_a_new_client(tmp_path: Path) -> None:
    """5,000 silent connections, past the gateway's 4,096 file descriptors: a new client still gets /healthz at once."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) sets the gateway's file-descriptor limit")
    _raise_own_file_limit(6000)
    async with gateway(tmp_path, nofile=4096) as gw:
        limit = await gw.metric("bookvault_connections_limit")
        assert 1000 < limit < 4096  # lowered to fit the file descriptors
        idle: list[asyncio.StreamWriter] = []
        try:
            for start in range(0, 5000, 250):  # 250 per address: under the per-address cap
                source = f"127.0.0.{2 + start // 250}"
                opened = await asyncio.gather(*(open_connection(gw.url, source) for _ in range(250)))
                idle += [writer for _, writer in opened]
            async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
                started = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                assert time.monotonic() - started < 2.0  # a sanity bound, not a latency target
                assert await gw.metric("bookvault_connections_open") <= limit
                assert await gw.metric('bookvault_connections_refused_total{reason="idle_evicted"}') >= 5000 - limit
        finally:
            for writer in idle:
                writer.transport.abort()


async def test_past_the_address_cap_a_request_gets_503_with_retry_after(tmp_path: Path) -> None:
    """Five connections from 127.0.0.1 hold its cap: the sixth is told 503 and when to retry; other addresses are served; a freed place is taken again."""
    async with gateway(tmp_path, max_connections_per_address="5") as gw:
        held = [await open_connection(gw.url) for _ in range(5)]
        print("T1", time.monotonic())
        reader, writer = await open_connection(gw.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        received, _ = await answer_and_close(reader)
        print("T2", time.monotonic())
        assert received.startswith(b"HTTP/1.1 503 ") and error_code(received) == "TOO_MANY_CONNECTIONS"
        assert b"\r\nretry-after: 1\r\n" in received.lower()
        async with httpx.AsyncClient(base_url=gw.url, timeout=5, transport=httpx.AsyncHTTPTransport(
                local_address="127.0.0.2")) as other:
            assert (await other.get("/healthz")).status_code == 200
        held[0][1].close()
        await answer_and_close(held[0][0])
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
        assert await gw.metric('bookvault_connections_refused_total{reason="address_limit"}') == 1
        for _, writer in held:
            writer.transport.abort()


async def test_at_the_instance_cap_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    """At the cap a new client is served and the connection idle the longest is closed; with none idle, 503."""
    async with gateway(tmp_path, max_connections="4", max_connections_per_address="0", deadline_ms="10000") as gw:
        oldest = await open_connection(gw.url)
        others = [await open_connection(gw.url) for _ in range(3)]
        reader, writer = await open_connection(gw.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n")
        assert (await answer_and_close(reader))[0].startswith(b"HTTP/1.1 200 ")
        assert (await answer_and_close(oldest[0]))[0] == b""  # closed to make room, unanswered
        # Four requests in progress (each waits for a body it was promised, past 100-continue): none is idle.
        busy = [*others, await open_connection(gw.url)]
        for reader, writer in busy:
            writer.write(b"POST /graphql HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                         b"content-length: 10\r\nexpect: 100-continue\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        reader, writer = await open_connection(gw.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        received, _ = await answer_and_close(reader)
        assert received.startswith(b"HTTP/1.1 503 ") and error_code(received) == "TOO_MANY_CONNECTIONS"
        for reader, writer in busy:  # their bodies come, they are answered: idle again, /metrics gets a place
            writer.write(b'{"a": 1}  ')
            await reader.readuntil(b"\r\n\r\n")
        assert await gw.metric('bookvault_connections_refused_total{reason="instance_limit"}') == 1
        for _, writer in busy:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """`app` (started) on a real 127.0.0.1 port by gateway/serve.py's server, as `bookvault gateway` serves it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    running = server(app, app.state.gateway.settings, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    task = asyncio.create_task(running.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not running.started:  # uvicorn offers a flag, not an event
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        running.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def _metric(app: Any, name: str) -> float:
    text = app.state.gateway.telemetry.metrics.exposition().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Until `condition` holds: the gateway lets go of a stream once it sees its client gone."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _first_event(lines: AsyncIterator[str]) -> str:
    """The data of a stream's first event; `lines` goes on (an iterator let go of closes its stream)."""
    async for line in lines:
        if line.startswith("data: {"):
            return line
    raise AssertionError("the stream ended before its first event")


async def test_a_caller_past_its_stream_cap_is_refused_on_every_transport(shop: Shop) -> None:
    """Two streams per caller: a third gets TOO_MANY_STREAMS over SSE and multipart, a WebSocket 429; another caller is served; a closed stream frees its place."""
    staff, other = as_customer(None, staff=True), as_customer(None, staff=True, subject="another-staff")
    sse = {"accept": "text/event-stream"}
    async with running_gateway(shop, connections=ConnectionLimits(streams_per_caller=2)) as (_, app), served(app) as url:
        ws_url = url.replace("http://", "ws://") + "/graphql"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with contextlib.AsyncExitStack() as streams:
                held = []
                for _ in range(2):
                    response = await streams.enter_async_context(
                        client.stream("POST", "/graphql", json=ORDER_UPDATES, headers={**staff, **sse}))
                    held.append(response.aiter_lines())
                    assert response.status_code == 200 and '"orderUpdated"' in await _first_event(held[-1])
                third = await client.post("/graphql", json=ORDER_UPDATES, headers={**staff, **sse})
                assert third.status_code == 200 and '"TOO_MANY_STREAMS"' in third.text
                assert third.text.endswith("event: complete\ndata:\n\n")
                multipart = await client.post("/graphql", json=ORDER_UPDATES, headers={
                    **staff, "accept": 'multipart/mixed;subscriptionSpec="1.0", application/json'})
                assert '"payload":null,"errors"' in multipart.text and '"TOO_MANY_STREAMS"' in multipart.text
                with pytest.raises(InvalidStatus) as denied:
                    async with connect(ws_url, additional_headers=staff, subprotocols=[PROTOCOL]):
                        pass
                assert denied.value.response.status_code == 429
                async with client.stream("POST", "/graphql", json=ORDER_UPDATES, headers={**other, **sse}) as theirs:
                    assert '"orderUpdated"' in await _first_event(theirs.aiter_lines())
            await _until(lambda: _metric(app, "bookvault_streams_open") == 0)
            async with connect(ws_url, additional_headers=staff, subprotocols=[PROTOCOL]) as websocket:
                await websocket.send(json.dumps({"type": "connection_init"}))
                assert json.loads(await websocket.recv())["type"] == "connection_ack"
        await _until(lambda: _metric(app, "bookvault_connections_open") == 0)
        assert _metric(app, 'bookvault_connections_refused_total{reason="stream_limit"}') == 3
