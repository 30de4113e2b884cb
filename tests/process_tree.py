"""`bookvault demo` / `bookvault services` as a test's child process, and what is left of
it: its descendants (read from /proc, as psutil is no dependency) and its ports.

`start` ends everything it started in every case, a failed assertion included: SIGKILL to
the supervisor's group and to each descendant's (the children run in their own sessions),
then a bounded wait. asyncio's `Process.wait()` returns only once the pipes are closed too,
so an orphan holding them would otherwise hang the test run with no output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mock_services import SERVICES

REAP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks after boot (/proc/<pid>/stat field 22): tells a reused pid apart


def _stat(pid: int) -> tuple[str, Proc] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or gone while being read
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[0], Proc(pid, int(fields[1]), int(fields[19]))


def descendants(pid: int) -> list[Proc]:
    """Every living process below `pid`: its children, theirs, and so on."""
    procs = [s[1] for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) and s[0] not in "ZX"]
    found, parents = [], {pid}
    while level := [p for p in procs if p.ppid in parents and p not in found]:
        found += level
        parents = {p.pid for p in level}
    return found


def alive(proc: Proc) -> bool:
    """Still running (a zombie nobody has reaped yet has ended)."""
    stat = _stat(proc.pid)
    return stat is not None and stat[0] not in "ZX" and stat[1].start == proc.start


def listening(ports: list[int]) -> list[int]:
    """The ports of 127.0.0.1 that accept a connection."""
    answering = []
    for port in ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            answering.append(port)
    return answering


async def remaining(procs: list[Proc], ports: list[int], within: float) -> tuple[list[int], list[int]]:
    """The pids still running and the ports still open once both are empty or `within` s
    have passed (a short bounded poll: these processes are not ours to wait for)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        pids, open_ports = [p.pid for p in procs if alive(p)], listening(ports)
        if not (pids or open_ports) or asyncio.get_running_loop().time() > deadline:
            return pids, open_ports
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    process: asyncio.subprocess.Process
    service_ports: list[int]
    gateway_port: int | None
    procs: list[Proc]  # the descendants once ready (see `ready`)

    @property
    def ports(self) -> list[int]:
        return self.service_ports + ([self.gateway_port] if self.gateway_port else [])

    async def ready(self, timeout: float = 60) -> list[str]:
        """The output lines up to "ready"; then `procs` holds every descendant."""
        assert self.process.stdout is not None
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(self.process.stdout.readline(), timeout)).decode()
            assert line, f"bookvault closed its output before it was ready: {''.join(lines)}"
            if line.startswith("ready"):
                break
            lines.append(line)
        self.procs = descendants(self.process.pid)
        return lines


def stack_env(service_ports: list[int], gateway_port: int | None, **extra: str) -> dict[str, str]:
    env = os.environ | {f"BOOKVAULT_{name.upper()}_URL": f"http://127.0.0.1:{port}"
                        for name, port in zip(SERVICES, service_ports, strict=True)}
    if gateway_port:
        env["BOOKVAULT_PORT"] = str(gateway_port)
    return env | extra


@contextlib.asynccontextmanager
async def start(command: str, data_dir: Path, ports: list[int], env: Mapping[str, str] | None = None,
                stderr: int = asyncio.subprocess.STDOUT) -> AsyncIterator[Stack]:
    """`bookvault <command>` on `ports` (six services, then the gateway's for "demo"), in a
    new session as a terminal would start it; ended and reaped on the way out, whatever happened."""
    service_ports, gateway_port = ports[:len(SERVICES)], (ports[len(SERVICES)] if command == "demo" else None)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("bookvault")), command, "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True,
        env=dict(env) if env is not None else stack_env(service_ports, gateway_port),
    )
    stack = Stack(process, service_ports, gateway_port, [])
    try:
        yield stack
    finally:
        await end(process, stack.procs)


async def end(process: asyncio.subprocess.Process, known: list[Proc]) -> None:
    """SIGKILL the supervisor's group and every descendant's, then reap it within
    REAP_TIMEOUT_S (a TimeoutError, never a hang)."""
    procs = [*known, *descendants(process.pid)] if process.returncode is None else known
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own group: started in a new session
    for proc in procs:
        if alive(proc):
            with contextlib.suppress(ProcessLookupError):
                if (group := os.getpgid(proc.pid)) != os.getpgrp():  # never the test run's own
                    os.killpg(group, signal.SIGKILL)
                os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(process.wait(), REAP_TIMEOUT_S)
