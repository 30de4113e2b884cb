"""Readiness (ARCHITECTURE.md, "Resilience"): `/readyz` shows each service's circuit breaker and each backend
probe in `GatewayState.readiness` (the cache layer appends its own, e.g. Redis), and
answers 503 only when the gateway cannot serve at all: not started, every service's
breaker open, or a probe marked `required` failing."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from .state import GatewayState

__all__ = ["MEMORY_CACHE", "ReadinessProbe", "instance_headers", "readyz", "watch_loop"]

log = logging.getLogger("bookvault.health")
PROBE_TIMEOUT = 0.5  # seconds; a probe that takes longer is failing
# The nonce `bookvault demo`'s supervisor gives this process, echoed on /healthz so its
# readiness probe knows the answer came from this process and not from another gateway on
# the port. The same names as mock_services/runner.py's INSTANCE_ENV and INSTANCE_HEADER
# (the gateway does not import mock_services; tests/test_lifecycle.py checks they agree).
INSTANCE_ENV = "BOOKVAULT_INSTANCE"
INSTANCE_HEADER = "bookvault-instance"


def instance_headers() -> dict[str, str]:
    """/healthz's extra header: this process's supervisor nonce, when it was given one."""
    nonce = os.environ.get(INSTANCE_ENV)
    return {INSTANCE_HEADER: nonce} if nonce else {}


@dataclass(frozen=True)
class ReadinessProbe:
    """One backend's readiness, listed as ``{group: {name: {"status": "ok" | "failing"}}}``."""

    group: str  # "caches"
    name: str  # "memory", "redis"
    check: Callable[[], Awaitable[bool]]
    required: bool = False  # True: without it the gateway cannot serve at all


async def _always() -> bool:
    return True


MEMORY_CACHE = ReadinessProbe("caches", "memory", _always)


async def _ok(probe: ReadinessProbe) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await probe.check()
    except Exception:  # a probe that fails in any way says "not ok"; why goes to the log
        log.warning("readiness probe %s/%s failed", probe.group, probe.name, exc_info=True)
        return False


async def watch_loop(observe: Callable[[float], None], every: float = 0.02) -> None:
    """Forever: sleep `every` seconds and `observe` how late the loop woke (seconds). A late
    wake-up is time something held the event loop, which no request may do for long
    (README, "Limits and cost"); bench/hostile_bench.py reads it from /metrics."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + every
        await asyncio.sleep(every)
        observe(max(0.0, loop.time() - expected))


async def readyz(request: Request) -> Response:
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    if state is None:
        return JSONResponse({"status": "unavailable", "reason": "starting or stopping"}, status_code=503)
    services = state.resilience.states()
    results = await asyncio.gather(*(_ok(probe) for probe in state.readiness))
    body: dict[str, Any] = {"status": "ready", "services": services}
    for probe, ok in zip(state.readiness, results, strict=True):
        body.setdefault(probe.group, {})[probe.name] = {"status": "ok" if ok else "failing"}
    if any(s["breaker"] != "closed" for s in services.values()) or not all(results):
        body["status"] = "degraded"
    required_down = any(probe.required and not ok for probe, ok in zip(state.readiness, results, strict=True))
    if required_down or all(s["breaker"] == "open" for s in services.values()):
        body["status"] = "unavailable"
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)
