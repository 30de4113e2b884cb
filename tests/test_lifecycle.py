"""No orphans, no false "ready": `bookvault demo` and `bookvault services` take their
children with them however they stop (SIGHUP when the terminal closes, SIGKILL), refuse a
taken port before starting anything, and count as ready only their own child's answer."""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from process_tree import remaining, start

from gateway import health
from mock_services import SERVICES, runner

GONE_WITHIN_S = 5.0


@pytest.mark.parametrize("command", ["demo", "services"])
async def test_sighup_to_the_process_group_leaves_no_process_and_no_open_port(
        command: str, data_dir: Path, unused_ports: Callable[[int], list[int]]) -> None:
    """SIGHUP to the supervisor's process group (a closed terminal) leaves no BookVault process and no open port within 5 s."""
    async with start(command, data_dir, unused_ports(len(SERVICES) + 1)) as stack:
        await stack.ready()
        assert len([p for p in stack.procs if p.ppid == stack.process.pid]) == len(SERVICES) + (command == "demo")
        os.killpg(stack.process.pid, signal.SIGHUP)
        assert await asyncio.wait_for(stack.process.wait(), GONE_WITHIN_S) == 0  # stopped, not killed by SIGHUP
        assert await remaining(stack.procs, stack.ports, GONE_WITHIN_S) == ([], [])


async def test_sigkill_to_the_supervisor_alone_leaves_no_child(
        data_dir: Path, unused_ports: Callable[[int], list[int]]) -> None:
    """SIGKILL to the demo's supervisor alone (it can stop nothing) leaves no child and no open port within 5 s."""
    async with start("demo", data_dir, unused_ports(len(SERVICES) + 1)) as stack:
        await stack.ready()
        os.kill(stack.process.pid, signal.SIGKILL)
        # No wait() on the supervisor first: it returns only once its orphans let go of the pipes.
        assert await remaining(stack.procs, stack.ports, GONE_WITHIN_S) == ([], [])
        assert await asyncio.wait_for(stack.process.wait(), GONE_WITHIN_S) == -signal.SIGKILL


@contextmanager
def _held_port() -> Iterator[int]:
    """A port another process's listener holds (as another demo's gateway would)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize("taken", ["gateway", "catalog"])
async def test_a_taken_port_fails_naming_port_and_variable_before_ready(
        taken: str, data_dir: Path, unused_ports: Callable[[int], list[int]]) -> None:
    """A demo whose port is taken exits non-zero within seconds, naming the port and its variable, never printing "ready"."""
    ports = unused_ports(len(SERVICES) + 1)
    with _held_port() as port:
        index = len(SERVICES) if taken == "gateway" else list(SERVICES).index(taken)
        ports[index] = port
        variable = "BOOKVAULT_PORT" if taken == "gateway" else f"BOOKVAULT_{taken.upper()}_URL"
        async with start("demo", data_dir, ports) as stack:
            assert stack.process.stdout is not None
            output = (await asyncio.wait_for(stack.process.stdout.read(), 20)).decode()
            assert await asyncio.wait_for(stack.process.wait(), 5) != 0
    assert f"port {port} is in use ({variable})" in output, output
    assert "ready" not in output, output
    assert await remaining([], [p for p in ports if p != port], 0) == ([], [])  # nothing was started


class _Healthz(http.server.BaseHTTPRequestHandler):
    echo: str | None = None  # the nonce this server answers with, if any

    def do_GET(self) -> None:
        self.send_response(200)
        if self.echo:
            self.send_header(runner.INSTANCE_HEADER, self.echo)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass  # no request lines in the test's output


def test_readiness_counts_only_the_childs_own_answer() -> None:
    """/healthz answered on the child's port without its nonce is not ready; with its nonce, it is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    # A child that lives until its stdin closes: alive, silent, and on no port of its own.
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        child = runner.Child("gateway", [], url, process, port_variable="BOOKVAULT_PORT", nonce="ours")
        assert runner._wait_ready([child], timeout=0.5) == ["gateway"]  # another process's answer
        _Healthz.echo = "ours"
        assert runner._wait_ready([child], timeout=5) == []
    finally:
        _Healthz.echo = None
        server.shutdown()
        server.server_close()
        process.kill()
        process.wait(timeout=5)
        serving.join(timeout=5)


def test_the_gateway_and_the_supervisor_name_the_nonce_alike() -> None:
    """gateway/health.py echoes the variable and header the supervisor sets and reads."""
    assert (health.INSTANCE_ENV, health.INSTANCE_HEADER) == (runner.INSTANCE_ENV, runner.INSTANCE_HEADER)
