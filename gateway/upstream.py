"""Every HTTP call to the services goes through here: pooled clients per service with
their own timeouts and connection limits, a cap on body size, and the one place where
httpx's exceptions become the gateway's (`raise ... from exc`). Each call runs under
`resilience` (deadline, breaker, retries of reads; ARCHITECTURE.md, "Resilience")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from .config import ResilienceConfig, ServiceConfig
from .errors import UpstreamBadResponse, UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from .resilience import DEADLINE_HEADER, RETRYABLE_STATUSES, Deadline, Resilience, parse_retry_after
from .auth import forward_caller
from .telemetry import httpx_event_hooks

__all__ = ["Upstream", "POSITION_HEADER", "feed_seq"]


POSITION_HEADER = "x-feed-seq"


def feed_seq(raw: str | None) -> int:
    """A service's `X-Feed-Seq` (mock_services/position.py) as a seq; -1 when absent or not one."""
    return int(raw) if raw and raw.isdigit() and len(raw) <= 18 else -1


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _transport(cfg: ServiceConfig) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's HTTP/1.1 client: the same calls for about a third less CPU
    each (README, "Benchmarks": an upstream call is most of a cold request's CPU)."""
    return AiohttpTransport(limits=httpx.Limits(max_connections=cfg.max_connections,
                                                max_keepalive_connections=cfg.max_connections))


def _dropped(exc: httpx.TimeoutException) -> bool:
    """httpx-aiohttp reports a connection closed or reset by the peer as a connect timeout;
    it is a refused or dropped connection (retryable), not a slow service."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, aiohttp.ServerTimeoutError)


def _error_of(body: bytes) -> tuple[str | None, str | None]:
    """The code and message of a service's error body (ARCHITECTURE.md, "Services"), if it has one."""
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return None, None
    return (code if isinstance(code, str) else None), (message if isinstance(message, str) else None)


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
        hooks = httpx_event_hooks()
        hooks["request"].append(forward_caller)  # X-BookVault-Caller beside traceparent
        self._clients = {
            name: httpx.AsyncClient(
                base_url=cfg.url,
                timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
                transport=transports.get(name) or _transport(cfg),
                headers={"accept": "application/json", "user-agent": "bookvault-gateway"},
                event_hooks=hooks,
            )
            for name, cfg in self.services.items()
        }

    def max_batch(self, service: str) -> int:
        """Ids per batch call: the configured limit, or less if the service says so."""
        configured = self.services[service].max_batch
        return min(configured, self._advertised.get(service, configured))

    async def learn_limits(self, every: float = 2.0) -> None:
        """Read each service's advertised `maxBatch` (GET /_meta, ARCHITECTURE.md, "Services") until all have
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

    async def get_json_at(self, service: str, url: str, *, deadline: Deadline | None = None) -> tuple[Any, int]:
        """`get_json`, with the feed position the answer reflects (the service's
        `X-Feed-Seq`; -1 when it sends none): see gateway/consistency.py."""
        return await self.resilience.call(service, partial(self._send, service, "GET", url, None, positioned=True),
                                          deadline=deadline, retry=True)

    async def request(self, service: str, method: str, url: str, *, json: Any = None,
                      deadline: Deadline | None = None, headers: Mapping[str, str] | None = None) -> Any:
        """A write (or any call that must not be repeated): sent at most once, never retried.
        A 4xx answer raises `UpstreamRejected` with the service's error code. It may take the
        attempt's whole budget (connect + read timeouts, within the deadline), which it tells
        the service: a write cut off at the read timeout loses an answer that was coming."""
        return await self.resilience.call(service, partial(self._send, service, method, url, json, headers=headers,
                                                           whole_budget=True),
                                          deadline=deadline, retry=False)

    async def poll(self, service: str, url: str, *, timeout: float) -> Any:
        """A long-poll (the change feed): one attempt with its own timeout, outside the
        request path, so neither a breaker nor a request's deadline applies to it."""
        return await self._send(service, "GET", url, None, None, timeout=timeout)

    async def _send(self, service: str, method: str, url: str, payload: Any, budget_ms: int | None,
                    timeout: float | None = None, headers: Mapping[str, str] | None = None,
                    whole_budget: bool = False, positioned: bool = False) -> Any:
        """One exchange, told upstream how long it may take."""
        client = self._clients[service]
        extra: dict[str, Any] = {}
        if whole_budget and budget_ms is not None:
            timeout = budget_ms / 1000
        if budget_ms is not None or headers:
            extra["headers"] = {**(headers or {}), **({DEADLINE_HEADER: str(budget_ms)} if budget_ms is not None else {})}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=self.services[service].connect_timeout)
        try:
            async with client.stream(method, url, json=payload, **extra) as response:
                body = await self._read(response, service)
        except UpstreamError:
            raise
        except httpx.TimeoutException as exc:
            if _dropped(exc):
                raise UpstreamUnavailable(f"{service} is unreachable (connection lost)", service=service,
                                          retryable=True) from exc
            raise UpstreamTimeout(f"{service} did not answer in time", service=service) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # refused, reset, dropped mid-body
            raise UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service,
                                      retryable=True) from exc
        except (httpx.HTTPError, aiohttp.ClientError) as exc:  # other protocol violations
            raise UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service) from exc
        decoded = self._decode(response, body, service)
        return (decoded, feed_seq(response.headers.get(POSITION_HEADER))) if positioned else decoded

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
            code, message = _error_of(body)
            raise UpstreamRejected(f"{service} answered {status}", service=service, status=status,
                                   error_code=code, error_message=message)
        if not _is_json(response.headers.get("content-type", "")):
            raise UpstreamBadResponse(f"{service} answered with a non-JSON body", service=service)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamBadResponse(f"{service} answered with malformed JSON", service=service) from exc
