"""Start processes (one per service, and the gateway for the demo), wait until each
answers /healthz, print where they listen, stop them all on Ctrl-C, SIGTERM or SIGHUP.

A child that dies is reported and the others keep serving: that is the point of one
process per service (a demo can kill catalog and watch the gateway degrade).

No child outlives the supervisor. The children run in their own sessions, so a terminal's
Ctrl-C (or its SIGHUP when it closes) reaches the supervisor alone, which stops them in
order: the gateway first, then the services it follows. Should the supervisor die without
stopping them (SIGKILL, a crash), the kernel sends each child SIGTERM (PR_SET_PDEATHSIG,
set by a small wrapper before the child's own program runs): nothing is left holding the
ports or the supervisor's output pipes."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Self

import httpx
from sqlalchemy.engine import make_url

__all__ = ["INSTANCE_ENV", "INSTANCE_HEADER", "Child", "instance_headers", "service_children", "stop_processes", "supervise"]

# A child started by `supervise` gets a random nonce in INSTANCE_ENV and echoes it in
# INSTANCE_HEADER on /healthz: readiness is an answer from *this* child, not from whatever
# else listens on its port (another demo's gateway answers /healthz just as well).
# gateway/health.py reads the same variable (the gateway does not import mock_services).
INSTANCE_ENV = "BOOKVAULT_INSTANCE"
INSTANCE_HEADER = "bookvault-instance"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Run as `python -I -S -c _DIE_WITH_PARENT <supervisor pid> <argv...>`: asks the kernel for
# SIGTERM when the parent dies, then execs the real child (same pid; the setting survives
# exec). A wrapper rather than Popen's preexec_fn, which is unsafe with threads and forces
# the slow fork path. SIGTERM rather than SIGKILL: uvicorn then shuts down within its own
# graceful bound and the services close their databases.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0), ctypes.c_ulong(0),
              ctypes.c_ulong(0)) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[1]):  # the supervisor died before prctl: no signal would come
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str
    process: subprocess.Popen[bytes] | None = None
    # Stopped before every child of a lower tier: the gateway (tier 1) before the services
    # it long-polls, so nothing it waits on disappears under it.
    tier: int = 0
    port_variable: str = ""  # the setting that chooses `url`'s port, named when it is taken
    # Echoed by the child's /healthz (INSTANCE_HEADER); None: any 200 counts (callers that
    # start children themselves, e.g. bench/_harness.py, pass none).
    nonce: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # over the supervisor's own environment
    note: str = ""  # printed after its pid once ready (a service's database)


def instance_headers() -> dict[str, str]:
    """The headers a /healthz answer carries: the nonce the supervisor gave this process, if any."""
    nonce = os.environ.get(INSTANCE_ENV)
    return {INSTANCE_HEADER: nonce} if nonce else {}


def service_children(urls: dict[str, str], data_dir: str, scale: int, admin: bool,
                     databases: dict[str, str] | None = None) -> list[Child]:
    """One child per service; `databases` names some services' database URLs (the others keep a
    SQLite file in `data_dir`). A URL travels in the child's environment, not its argv, where
    any user of the machine could read a password in it (`ps`)."""
    children = []
    for name, url in urls.items():
        parsed = httpx.URL(url)
        argv = [sys.executable, "-m", "mock_services", name, "--host", parsed.host, "--port", str(parsed.port),
                "--data-dir", data_dir, "--scale", str(scale)]
        database = (databases or {}).get(name)
        env = {f"BOOKVAULT_{name.upper()}_DATABASE_URL": database} if database else {}
        where = make_url(database).render_as_string(hide_password=True) if database else f"{data_dir}/{name}.db"
        children.append(Child(name, argv + (["--admin"] if admin else []), url,
                              port_variable=f"BOOKVAULT_{name.upper()}_URL", env=env, note=where))
    return children


class _Signals:
    """While entered: SIGINT, SIGTERM and SIGHUP set `stop` (the terminal closing is a stop
    like any other), and `wait` returns as soon as any of those or a SIGCHLD (a child
    exited) arrives, through the signal module's wake-up fd: no polling of a flag."""

    def __init__(self) -> None:
        self.stop: int | None = None

    def __enter__(self) -> Self:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = {s: signal.signal(s, self._on_stop) for s in STOP_SIGNALS}
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._read)
        os.close(self._write)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop = signum

    def _on_child(self, signum: int, _frame: FrameType | None) -> None:
        pass  # its only use is the wake-up byte

    def wait(self, timeout: float | None) -> None:
        """Until a signal arrives (or has arrived since the last wait) or `timeout` passes."""
        if self.stop is None:
            select.select([self._read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 4096)


def _address(child: Child) -> tuple[str, int]:
    url = httpx.URL(child.url)
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def busy_ports(children: list[Child]) -> list[str]:
    """Why each child could not listen on its port, found by binding it now (as uvicorn
    will, SO_REUSEADDR included: a port in TIME_WAIT is free). Checked before any child
    starts, so a taken port is an error, never a "ready" answered by its holder."""
    problems = []
    seen: dict[tuple[str, int], Child] = {}
    for child in children:
        host, port = _address(child)
        variable = child.port_variable or "its URL"
        if (host, port) in seen:
            problems.append(f"port {port} is set twice ({seen[host, port].port_variable}, {variable})")
            continue
        seen[host, port] = child
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    problems.append(f"port {port} is in use ({variable}); stop what listens there "
                                    f"or set {variable} to a free port")
                else:
                    problems.append(f"port {port} on {host} cannot be used ({variable}): {exc.strerror or exc}")
    return problems


def _wait_ready(children: list[Child], timeout: float, signals: _Signals | None = None) -> list[str]:
    """The names not ready within `timeout` (all of the pending ones if a stop signal came
    first); raises SystemExit if one exits meanwhile. Ready: /healthz answers 200 with the
    child's nonce (when it has one)."""
    deadline = time.monotonic() + timeout
    pending = {c.name: c for c in children}
    foreign: set[str] = set()  # answered, but by some other process on the port
    with httpx.Client(timeout=1.0) as client:
        while pending and time.monotonic() < deadline and not (signals and signals.stop):
            for name, child in list(pending.items()):
                if child.process and child.process.poll() is not None:
                    holder = f"; {child.url} is answered by another process ({child.port_variable})" \
                        if name in foreign else ""
                    raise SystemExit(f"{name} exited with status {child.process.returncode} while starting{holder}")
                try:
                    answer = client.get(f"{child.url}/healthz")
                except httpx.TransportError:
                    continue
                if answer.status_code != 200:
                    continue
                if child.nonce is None or answer.headers.get(INSTANCE_HEADER) == child.nonce:
                    del pending[name]
                else:
                    foreign.add(name)
            if signals:
                signals.wait(0.05)  # returns at once on a stop signal or a child's exit
            else:
                time.sleep(0.05)
    return list(pending)


def _start(child: Child) -> None:
    child.nonce = secrets.token_hex(16)
    argv = child.argv
    if sys.platform == "linux":
        argv = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    # Own session: a terminal's Ctrl-C or hang-up reaches only us, and we stop the children in order.
    child.process = subprocess.Popen(argv, env=os.environ | child.env | {INSTANCE_ENV: child.nonce},
                                     start_new_session=True)


def supervise(children: list[Child], banner: str = "", ready_timeout: float = 60.0) -> int:
    problems = busy_ports(children)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    started = time.monotonic()
    # Handlers first: a signal during start-up must still stop what was started.
    with _Signals() as signals:
        try:
            # Tier by tier, lowest first: the gateway starts once the services answer, so its
            # change-feed followers find them (and nothing is logged as unreachable at start).
            for tier in sorted({c.tier for c in children}):
                group = [c for c in children if c.tier == tier]
                for child in group:
                    _start(child)
                late = _wait_ready(group, ready_timeout, signals)
                if signals.stop:
                    return 0
                if late:
                    print(f"not ready after {ready_timeout:.0f}s: {', '.join(late)}", file=sys.stderr)
                    return 1
            width = max(len(c.name) for c in children)
            for child in children:
                note = f"  {child.note}" if child.note else ""
                print(f"  {child.name:<{width}}  {child.url}  (pid {child.process.pid}){note}")  # type: ignore[union-attr]
            print(f"ready in {time.monotonic() - started:.2f}s. {banner}Ctrl-C stops everything.", flush=True)
            reported: set[str] = set()
            while not signals.stop:
                signals.wait(None)
                for child in children:
                    if child.name not in reported and child.process and child.process.poll() is not None:
                        reported.add(child.name)
                        print(f"{child.name} exited (status {child.process.returncode}); the others keep serving",
                              flush=True)
            return 0
        finally:
            _stop_all(children)


def _stop_all(children: list[Child], timeout: float = 5.0) -> None:
    """SIGTERM each tier, highest first, and wait for it before the next; SIGKILL what
    outlives `timeout`."""
    for tier in sorted({c.tier for c in children}, reverse=True):
        stop_processes([c.process for c in children if c.tier == tier and c.process], timeout, group=True)


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float, *, group: bool) -> None:
    """SIGTERM each running process (its whole group with `group`), wait for them together,
    then SIGKILL the group of any that outlives `timeout`."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):  # it may exit between poll() and here
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
