"""Ports for a process a test starts: chosen BELOW the kernel's ephemeral range.

A port taken from `bind(("127.0.0.1", 0))` is ephemeral: between the test's choice and the
child's own bind, any outgoing connection on the machine (the services' own calls to
PostgreSQL, Redis, each other) may be given it, and the child dies with "address already in
use" (seen in CI: tests/test_deploy.py, uvicorn exit 3). Outgoing connections never take a
port below /proc/sys/net/ipv4/ip_local_port_range, so a free one there stays free."""

from __future__ import annotations

import contextlib
import random
import socket

__all__ = ["free_port", "free_ports"]

_FLOOR = 20_000  # below this: well-known and registered services a machine may run


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1, free now (held together while chosen) and outside
    the ephemeral range."""
    top = max(_ephemeral_start(), _FLOOR + 1_000)
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in random.sample(range(_FLOOR, top), min(top - _FLOOR, count * 50)):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports below the ephemeral range")


def free_port() -> int:
    return free_ports(1)[0]
