"""The orders service's HTTP clients for the services its checkout calls: one pooled
httpx client per service, with timeouts, at the same base URLs the gateway uses."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = ["DEFAULT_PORTS", "Unreachable", "Upstreams", "service_url"]

DEFAULT_PORTS = {"customers": 8101, "catalog": 8102, "inventory": 8103, "orders": 8104, "payments": 8105, "shipping": 8106}


class Unreachable(Exception):
    """No answer: refused, reset, or timed out. The call may or may not have had its effect."""


def service_url(name: str, env: Mapping[str, str] = os.environ) -> str:
    """`BOOKVAULT_<SERVICE>_URL`, else http://<BOOKVAULT_SERVICES_HOST>:81xx (README, Configuration)."""
    host = env.get("BOOKVAULT_SERVICES_HOST", "127.0.0.1")
    return env.get(f"BOOKVAULT_{name.upper()}_URL", f"http://{host}:{DEFAULT_PORTS[name]}").rstrip("/")


class Upstreams:
    """`options`: `urls` and `transports` per service (tests: in-process apps), `connect_timeout_s`,
    `timeout_s`, each over its BOOKVAULT_SAGA_* variable."""

    def __init__(self, options: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> None:
        timeout = httpx.Timeout(
            float(options.get("timeout_s", env.get("BOOKVAULT_SAGA_TIMEOUT_S", 5.0))),
            connect=float(options.get("connect_timeout_s", env.get("BOOKVAULT_SAGA_CONNECT_TIMEOUT_S", 0.5))),
        )
        urls = dict(options.get("urls") or {})
        transports = dict(options.get("transports") or {})
        self.clients = {
            name: httpx.AsyncClient(base_url=urls.get(name) or service_url(name, env), timeout=timeout,
                                    transport=transports.get(name))
            for name in ("catalog", "inventory", "payments", "shipping")
        }

    async def call(self, service: str, method: str, path: str, *, json: Any = None, key: str | None = None,
                   params: Mapping[str, str] | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else None
        try:
            return await self.clients[service].request(method, path, json=json, headers=headers, params=params)
        except httpx.TransportError as exc:  # timeouts included
            raise Unreachable(f"{service} {path}: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
