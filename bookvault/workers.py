"""`bookvault gateway --workers N`: N gateway processes on one port, supervised (README,
"Workers"; issue 27). The worker side is gateway/workers.py.

The port is bound once, here, and each worker inherits the listening socket (as gunicorn
and uvicorn's own `--workers` do) rather than each binding it with SO_REUSEPORT: with one
shared accept queue, a connection the kernel has accepted but no worker has yet taken
stays in the queue when a worker dies, and the next worker to accept takes it; with
SO_REUSEPORT each worker has its own queue, which is reset when that worker dies.

A worker that exits while the supervisor runs is started again under the same index (a
worker that dies within `_STEADY` seconds of its start waits longer each time: a gateway
that cannot start is not restarted in a tight loop). SIGTERM, SIGINT and SIGHUP stop the
supervisor: it closes its copy of the socket and sends each worker SIGTERM, upon which
each worker drains as a lone gateway does (gateway/serve.py: subscriptions ended first,
WebSockets closed with 1001, SSE streams completed, then in-flight requests finish); a
worker still running after the grace period is killed with its process group. The
workers run in their own sessions (a terminal's Ctrl-C reaches the supervisor alone, which
stops them once) and die with the supervisor should it be killed (PR_SET_PDEATHSIG, the
same wrapper as the services' supervisor, mock_services/runner.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from gateway.config import Settings
from gateway.workers import COUNT_ENV, DIR_ENV, FD_ENV, INDEX_ENV
from mock_services.runner import _DIE_WITH_PARENT, _Signals, stop_processes

__all__ = ["supervise"]

_STEADY = 5.0  # seconds a worker must live for its next restart to be immediate
_BACKOFF_MAX = 10.0
_BACKLOG = 2048  # uvicorn's own default


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # quick deaths in a row
    due: float = 0.0  # when to start it again (monotonic), once it has exited


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _start(slot: _Slot, sock: socket.socket, count: int, directory: str) -> None:
    argv = [sys.executable, "-m", "bookvault.cli", "gateway"]
    if sys.platform == "linux":
        argv = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    env = os.environ | {FD_ENV: str(sock.fileno()), INDEX_ENV: str(slot.index), COUNT_ENV: str(count),
                        DIR_ENV: directory, "BOOKVAULT_WORKERS": "1"}
    slot.process = subprocess.Popen(argv, env=env, pass_fds=(sock.fileno(),), start_new_session=True)
    slot.started = time.monotonic()


def _exited(slot: _Slot, now: float) -> None:
    """Report a worker's exit and say when it starts again."""
    assert slot.process is not None
    status = slot.process.returncode
    how = f"signal {-status}" if status < 0 else f"status {status}"
    slot.failures = slot.failures + 1 if now - slot.started < _STEADY else 0
    delay = 0.0 if slot.failures == 0 else min(_BACKOFF_MAX, 0.5 * 2 ** (slot.failures - 1))
    slot.due = now + delay
    print(f"gateway worker {slot.index} (pid {slot.process.pid}) exited ({how}); starting it again"
          + (f" in {delay:g}s" if delay else ""), file=sys.stderr, flush=True)
    slot.process = None


def supervise(settings: Settings, count: int) -> int:
    """Run `count` workers on settings.host:settings.port until a stop signal; 0 then."""
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as exc:
        print(f"bookvault gateway: cannot listen on {settings.host}:{settings.port} (BOOKVAULT_HOST, "
              f"BOOKVAULT_PORT): {exc.strerror or exc}", file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="bookvault-workers-")  # the workers' metrics sockets
    slots = [_Slot(i) for i in range(count)]
    # Handlers first: a signal during start-up must still stop what was started.
    with _Signals() as signals:
        try:
            for slot in slots:
                _start(slot, sock, count, directory)
            print(f"bookvault gateway: {count} workers on http://{settings.host}:{settings.port} (pids "
                  f"{', '.join(str(s.process.pid) for s in slots if s.process)})", file=sys.stderr, flush=True)
            while not signals.stop:
                now = time.monotonic()
                waiting = [s.due - now for s in slots if s.process is None]
                signals.wait(max(0.0, min(waiting)) if waiting else None)  # a child's exit wakes it
                if signals.stop:
                    break
                now = time.monotonic()
                for slot in slots:
                    if slot.process is not None and slot.process.poll() is not None:
                        _exited(slot, now)
                    if slot.process is None and slot.due <= now:
                        _start(slot, sock, count, directory)
            return 0
        finally:
            sock.close()  # no new connection queues for workers that are leaving
            _stop(slots, settings.resilience.deadline + 1 + 5)
            shutil.rmtree(directory, ignore_errors=True)


def _stop(slots: list[_Slot], timeout: float) -> None:
    """SIGTERM every worker (each drains, gateway/serve.py), then SIGKILL what outlives
    `timeout` with its process group (its document worker)."""
    stop_processes([s.process for s in slots if s.process is not None], timeout, group=False)
