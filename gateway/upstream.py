"""Every HTTP call to the services goes through here: pooled clients per service with
their own timeouts and connection limits, a cap on body size, and the one place where
httpx's exceptions become the gateway's (`raise ... from exc`). Each call runs under
`resilience` (deadline, breaker, retries of reads; DESIGN §6)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import httpx

from .config import ResilienceConfig, ServiceConfig
from .errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .resilience import DEADLINE_HEADER, RETRYABLE_STATUSES, Deadline, Resilience, parse_retry_after
from .telemetry import httpx_event_hooks

__all__ = ["Upstream"]


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Upstream:
    """One pooled `httpx.AsyncClient` per service, created in the app's lifespan."""

    def __init__(
        self,
        services: Mapping[str, ServiceConfig],
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        resilience: Resilience | None = None,
    ) -> None:
        self.services = dict(services)
        self._advertised: dict[str, int] = {}
        self.resilience = resilience or Resilience(self.services, ResilienceConfig())
        transports = transports or {}
        self._clients = {
            name: httpx.AsyncClient(
                base_url=cfg.url,
                timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
                limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections),
                transport=transports.get(name),
                headers={"accept": "application/json", "user-agent": "bookvault-gateway"},
                event_hooks=httpx_event_hooks(),
            )
            for name, cfg in self.services.items()
        }

    def max_batch(self, service: str) -> int:
        """Ids per batch call: the configured limit, or less if the service says so."""
        configured = self.services[service].max_batch
        return min(configured, self._advertised.get(service, configured))

    async def learn_limits(self, every: float = 2.0) -> None:
        """Read each service's advertised `maxBatch` (GET /_meta, DESIGN §2) until all have
        answered: a service that allows fewer ids than configured gets smaller chunks
        instead of a 400 for every batch."""
        pending = set(self.services)
        while pending:
            answers = await asyncio.gather(*(self.poll(s, "/_meta", timeout=2.0) for s in pending), return_exceptions=True)
            for service, meta in zip(list(pending), answers, strict=True):
                limit = meta.get("maxBatch") if isinstance(meta, dict) else None
                if isinstance(limit, int) and limit > 0:
                    self._advertised[service] = limit
                    pending.discard(service)
            if pending:
                await asyncio.sleep(every)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def get_json(self, service: str, url: str, *, deadline: Deadline | None = None) -> Any:
        """GET a JSON document, or raise an `UpstreamError` naming the service. A read:
        retried on refused or dropped connections and 429/502/503/504, within `deadline`."""
        return await self.resilience.call(service, partial(self._send, service, "GET", url, None),
                                          deadline=deadline, retry=True)

    async def request(self, service: str, method: str, url: str, *, json: Any = None,
                      deadline: Deadline | None = None) -> Any:
        """A write (or any call that must not be repeated): sent at most once, never retried."""
        return await self.resilience.call(service, partial(self._send, service, method, url, json),
                                          deadline=deadline, retry=False)

    async def poll(self, service: str, url: str, *, timeout: float) -> Any:
        """A long-poll (the change feed): one attempt with its own timeout, outside the
        request path, so neither a breaker nor a request's deadline applies to it."""
        return await self._send(service, "GET", url, None, None, timeout=timeout)

    async def _send(self, service: str, method: str, url: str, payload: Any, budget_ms: int | None,
                    timeout: float | None = None) -> Any:
        """One exchange, told upstream how long it may take."""
        client = self._clients[service]
        extra: dict[str, Any] = {}
        if budget_ms is not None:
            extra["headers"] = {DEADLINE_HEADER: str(budget_ms)}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=self.services[service].connect_timeout)
        try:
            async with client.stream(method, url, json=payload, **extra) as response:
                body = await self._read(response, service)
        except UpstreamError:
            raise
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{service} did not answer in time", service=service) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # refused, reset, dropped mid-body
            raise UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service,
                                      retryable=True) from exc
        except httpx.HTTPError as exc:  # other protocol violations
            raise UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service) from exc
        return self._decode(response, body, service)

    async def _read(self, response: httpx.Response, service: str) -> bytes:
        cap = self.services[service].max_body_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise UpstreamBadResponse(f"{service} sent a body over {cap} bytes", service=service)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise UpstreamBadResponse(f"{service} sent a body over {cap} bytes", service=service)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _decode(response: httpx.Response, body: bytes, service: str) -> Any:
        status = response.status_code
        if status >= 500 or status == 429:
            raise UpstreamUnavailable(f"{service} answered {status}", service=service,
                                      retryable=status in RETRYABLE_STATUSES,
                                      retry_after=parse_retry_after(response.headers.get("retry-after")))
        if status == 204:
            return None
        if not 200 <= status < 300:
            raise UpstreamBadResponse(f"{service} answered {status}", service=service)
        if not _is_json(response.headers.get("content-type", "")):
            raise UpstreamBadResponse(f"{service} answered with a non-JSON body", service=service)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamBadResponse(f"{service} answered with malformed JSON", service=service) from exc
