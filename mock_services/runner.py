"""Start processes (one per service, and the gateway for the demo), wait until each
answers /healthz, print where they listen, stop them all on Ctrl-C or SIGTERM.

A child that dies is reported and the others keep serving: that is the point of one
process per service (a demo can kill catalog and watch the gateway degrade)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

__all__ = ["Child", "supervise", "service_children"]


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str
    process: subprocess.Popen[bytes] | None = None
    # Stopped before every child of a lower tier: the gateway (tier 1) before the services
    # it long-polls, so nothing it waits on disappears under it.
    tier: int = 0


def service_children(urls: dict[str, str], data_dir: str, scale: int, admin: bool) -> list[Child]:
    children = []
    for name, url in urls.items():
        parsed = httpx.URL(url)
        argv = [sys.executable, "-m", "mock_services", name, "--host", parsed.host, "--port", str(parsed.port),
                "--data-dir", data_dir, "--scale", str(scale)]
        children.append(Child(name, argv + (["--admin"] if admin else []), url))
    return children


def _wait_ready(children: list[Child], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    pending = {c.name: c for c in children}
    with httpx.Client(timeout=1.0) as client:
        while pending and time.monotonic() < deadline:
            for name, child in list(pending.items()):
                if child.process and child.process.poll() is not None:
                    raise SystemExit(f"{name} exited with status {child.process.returncode} while starting")
                try:
                    if client.get(f"{child.url}/healthz").status_code == 200:
                        del pending[name]
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
    return list(pending)


def supervise(children: list[Child], banner: str = "", ready_timeout: float = 60.0) -> int:
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    try:
        # Tier by tier, lowest first: the gateway starts once the services answer, so its
        # change-feed followers find them (and nothing is logged as unreachable at start).
        for tier in sorted({c.tier for c in children}):
            group = [c for c in children if c.tier == tier]
            for child in group:
                # Own process group: a terminal's Ctrl-C reaches only us, and we stop children in order.
                child.process = subprocess.Popen(child.argv, start_new_session=True)
            late = _wait_ready(group, ready_timeout)
            if late:
                print(f"not ready after {ready_timeout:.0f}s: {', '.join(late)}", file=sys.stderr)
                return 1
        width = max(len(c.name) for c in children)
        for child in children:
            print(f"  {child.name:<{width}}  {child.url}  (pid {child.process.pid})")  # type: ignore[union-attr]
        print(f"ready in {time.monotonic() - started:.2f}s. {banner}Ctrl-C stops everything.", flush=True)
        reported: set[str] = set()
        while not stopping:
            for child in children:
                if child.name not in reported and child.process and child.process.poll() is not None:
                    reported.add(child.name)
                    print(f"{child.name} exited (status {child.process.returncode}); the others keep serving", flush=True)
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children)


def _stop_all(children: list[Child], timeout: float = 5.0) -> None:
    """SIGTERM each tier, highest first, and wait for it before the next; SIGKILL what
    outlives `timeout`."""
    for tier in sorted({c.tier for c in children}, reverse=True):
        running = [c.process for c in children if c.tier == tier and c.process and c.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):  # it may exit between poll() and here
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
