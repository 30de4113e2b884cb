"""Process helpers for the benches: start the six services (with --admin, a fresh data dir)
and the gateway on free ports chosen at runtime, wait for /healthz, stop everything on
exit, error or Ctrl-C; and the /_admin calls a bench makes (faults, stats).

Ports are never the defaults and the caller's BOOKVAULT_*, REDIS_URL and OTEL_* variables
are not passed on (give them in `env`), so a bench does not collide with a running demo:

    with Stack() as stack:
        stack.gateway_url, stack.service_urls["catalog"], stack.pid("gateway")
        stack.kill("catalog")          # a chaos bench: one service gone, the rest serve
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from gateway.config import DEFAULT_PORTS
from mock_services.runner import Child, _stop_all, _wait_ready, service_children

__all__ = ["Stack", "free_ports", "set_faults", "clear_stats", "fetch_stats", "peak_rss_kib", "cpu_seconds", "REPO"]

REPO = Path(__file__).resolve().parent.parent
SERVICES = tuple(DEFAULT_PORTS)
_NOT_INHERITED = ("BOOKVAULT_", "REDIS_URL", "OTEL_")  # customers, catalog, inventory, orders, payments, shipping


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the kernel says are free now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in KiB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _bookvault_command() -> list[str]:
    script = Path(sys.executable).parent / "bookvault"
    if not script.exists():
        script = REPO / ".venv" / "bin" / "bookvault"
    return [str(script), "gateway"]


class Stack:
    """The six services and the gateway as child processes, each in its own session."""

    def __init__(self, *, scale: int = 1, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 ready_timeout: float = 90.0) -> None:
        self.scale = scale
        self.host = host
        self.ready_timeout = ready_timeout
        *service_ports, gateway_port = free_ports(len(SERVICES) + 1, host)
        self.service_urls = {name: f"http://{host}:{port}" for name, port in zip(SERVICES, service_ports)}
        self.gateway_url = f"http://{host}:{gateway_port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="bookvault-bench-"))
        # The caller's BOOKVAULT_*, REDIS_URL and OTEL_* settings are not inherited: a bench
        # states what it runs with (`env`), and never shares a demo's Redis or collector.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
        self.env = {**inherited, **(env or {}), "BOOKVAULT_HOST": host, "BOOKVAULT_PORT": str(gateway_port),
                    "BOOKVAULT_DATA_DIR": str(self.workdir / "data")}
        for name, url in self.service_urls.items():
            self.env[f"BOOKVAULT_{name.upper()}_URL"] = url
        self.children = {c.name: c for c in service_children(self.service_urls, str(self.workdir / "data"), scale,
                                                               admin=True)}
        self.children["gateway"] = Child("gateway", _bookvault_command(), self.gateway_url)
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Stack:
        atexit.register(self.stop)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            self.spawn(name)
        self.wait_ready(SERVICES)
        self.spawn("gateway")
        self.wait_ready(["gateway"])
        self.startup_seconds = time.monotonic() - started

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        child = self.children[name]
        with open(self.log_path(name), "ab") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the children.
            child.process = subprocess.Popen(child.argv, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return child.process

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, names: Iterable[str], timeout: float | None = None) -> None:
        children = [self.children[n] for n in names]
        timeout = timeout or self.ready_timeout
        try:
            late = _wait_ready(children, timeout)
        except SystemExit as exc:  # a child exited while starting
            dead = next((c.name for c in children if c.process and c.process.poll() is not None), "")
            raise RuntimeError(f"{exc}:\n{self.log_tail(dead)}") from None
        if late:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(late)}")

    def pid(self, name: str) -> int:
        process = self.children[name].process
        assert process is not None, f"{name} was not started"
        return process.pid

    def kill(self, name: str, hard: bool = False) -> None:
        """Stop one child: SIGTERM (SIGKILL after 5 s), or at once with `hard`."""
        child = self.children[name]
        if hard and child.process and child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        _stop_all([child])

    def restart(self, name: str) -> None:
        self.kill(name)
        self.spawn(name)
        self.wait_ready([name])

    def stop(self) -> None:
        """Every child, then the temp dir; idempotent (also runs at exit)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            _stop_all(list(self.children.values()))
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            atexit.unregister(self.stop)


# -- /_admin on the services ---------------------------------------------------------


async def set_faults(client: httpx.AsyncClient, urls: Iterable[str], faults: dict[str, Any]) -> None:
    async def one(url: str) -> None:
        (await client.post(f"{url}/_admin/faults", json=faults)).raise_for_status()

    await asyncio.gather(*(one(u) for u in urls))


async def clear_stats(client: httpx.AsyncClient, urls: Iterable[str]) -> None:
    async def one(url: str) -> None:
        (await client.delete(f"{url}/_admin/stats")).raise_for_status()

    await asyncio.gather(*(one(u) for u in urls))


async def fetch_stats(client: httpx.AsyncClient, service_urls: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Each service's recorded requests ({route, ids, start, end, status, ...})."""

    async def one(url: str) -> list[dict[str, Any]]:
        response = await client.get(f"{url}/_admin/stats")
        response.raise_for_status()
        return list(response.json()["requests"])

    lists = await asyncio.gather(*(one(u) for u in service_urls.values()))
    return dict(zip(service_urls, lists))
