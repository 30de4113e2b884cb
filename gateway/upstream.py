"""Every HTTP call to the services goes through here: pooled clients per service with
their own timeouts and connection limits, a cap on body size, and the one place where
the transports' errors become the gateway's (`raise ... from exc`). Each call runs under
`resilience` (deadline, breaker, retries of reads; ARCHITECTURE.md, "Resilience")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson

from .auth import CALLER_HEADER, caller_header
from .config import ResilienceConfig, ServiceConfig
from .http1 import Client, ConnectionFailed, Oversized, ProtocolViolation, Reply
from .errors import UpstreamBadResponse, UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from .resilience import DEADLINE_HEADER, RETRYABLE_STATUSES, Deadline, Resilience, parse_retry_after
from .telemetry import outgoing, sending

__all__ = ["Upstream", "POSITION_HEADER", "feed_seq"]


POSITION_HEADER = "x-feed-seq"
_HEADERS = {"accept": "application/json", "user-agent": "bookvault-gateway"}


def feed_seq(raw: str | None) -> int:
    """A service's `X-Feed-Seq` (mock_services/position.py) as a seq; -1 when absent or not one."""
    return int(raw) if raw and raw.isdigit() and len(raw) <= 18 else -1


def _server(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _error_of(body: bytes) -> tuple[str | None, str | None]:
    """The code and message of a service's error body (ARCHITECTURE.md, "Services"), if it has one."""
    try:
        error = orjson.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return None, None
    return (code if isinstance(code, str) else None), (message if isinstance(message, str) else None)


class Exchange(Protocol):
    """One HTTP exchange with one service, its transport's errors already the gateway's."""

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                       timeout: float) -> Reply: ...

    async def aclose(self) -> None: ...


def _oversized(service: str, cap: int) -> UpstreamBadResponse:
    return UpstreamBadResponse(f"{service} sent a body over {cap} bytes", service=service)


async def _capped(chunks: AsyncIterator[bytes], service: str, cap: int) -> bytes:
    """A body without a length, read whole but refused once past `cap` bytes."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise _oversized(service, cap)
        parts.append(chunk)
    return b"".join(parts)


def _late(service: str) -> UpstreamTimeout:
    return UpstreamTimeout(f"{service} did not answer in time", service=service)


def _unreachable(service: str, exc: Exception, retryable: bool = False) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service, retryable=retryable)


class _Http1:
    """The network: the gateway's own HTTP/1.1 client (gateway/http1.py). An upstream call
    is most of a cold query's CPU, and it costs about half of aiohttp's and a sixth of httpx's
    per call (ARCHITECTURE.md, "Upstream calls")."""

    def __init__(self, service: str, cfg: ServiceConfig) -> None:
        self.service = service
        self.client = Client(cfg.url, limit=cfg.max_connections, cap=cfg.max_body_bytes,
                             connect_timeout=cfg.connect_timeout, headers=_HEADERS)

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                       timeout: float) -> Reply:
        service = self.service
        try:
            return await self.client.request(method, url, headers, body, timeout)
        except TimeoutError as exc:  # no connection, or no whole answer, in time
            raise _late(service) from exc
        except ConnectionFailed as exc:  # refused, reset, dropped mid-body
            raise _unreachable(service, exc, retryable=True) from exc
        except Oversized as exc:
            raise _oversized(service, self.client.cap) from exc
        except ProtocolViolation as exc:
            raise _unreachable(service, exc) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


class _Httpx:
    """An httpx transport in place of the network: tests drive the services' ASGI apps in
    process (`httpx.ASGITransport`) or wrap them to slow or break them."""

    def __init__(self, service: str, cfg: ServiceConfig, transport: httpx.AsyncBaseTransport) -> None:
        self.service, self.cap, self.connect = service, cfg.max_body_bytes, cfg.connect_timeout
        self.client = httpx.AsyncClient(base_url=cfg.url, transport=transport, headers=_HEADERS)

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                       timeout: float) -> Reply:
        service, cap = self.service, self.cap
        try:
            async with self.client.stream(method, url, headers=headers, content=body,
                                          timeout=httpx.Timeout(timeout, connect=self.connect)) as response:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise _oversized(service, cap)
                return Reply(response.status_code, response.headers, await _capped(response.aiter_bytes(), service, cap))
        except UpstreamError:
            raise
        except httpx.TimeoutException as exc:
            raise _late(service) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # refused, reset, dropped mid-body
            raise _unreachable(service, exc, retryable=True) from exc
        except httpx.HTTPError as exc:  # other protocol violations
            raise _unreachable(service, exc) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


class Upstream:
    """One pooled client per service, created in the app's lifespan: gateway/http1.py's over the
    network, or an httpx transport a test gives in its place."""

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
        # server.address and server.port of each service's CLIENT spans, parsed once.
        self._servers = {name: _server(cfg.url) for name, cfg in self.services.items()}
        self._exchanges: dict[str, Exchange] = {
            name: _Httpx(name, cfg, transports[name]) if name in transports else _Http1(name, cfg)
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
        for exchange in self._exchanges.values():
            await exchange.aclose()

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
        """One exchange, told upstream how long it may take, whose trace it belongs to and who asked."""
        sent = dict(headers) if headers else {}
        if budget_ms is not None:
            sent[DEADLINE_HEADER] = str(budget_ms)
            if whole_budget:
                timeout = budget_ms / 1000
        if (caller := caller_header()) is not None:
            sent[CALLER_HEADER] = caller  # beside traceparent
        with sending(service, method, url, self._servers[service]) as request:  # its CLIENT span, when traced
            outgoing(sent)
            body = None
            if payload is not None:
                body = orjson.dumps(payload)
                sent["content-type"] = "application/json"
            reply = await self._exchanges[service](method, url, sent, body,
                                                   self.services[service].read_timeout if timeout is None else timeout)
            request.answered(reply.status)
            decoded = self._decode(reply, service)
        return (decoded, feed_seq(reply.headers.get(POSITION_HEADER))) if positioned else decoded

    @staticmethod
    def _decode(reply: Reply, service: str) -> Any:
        status = reply.status
        if status >= 500 or status == 429:
            raise UpstreamUnavailable(f"{service} answered {status}", service=service,
                                      retryable=status in RETRYABLE_STATUSES,
                                      retry_after=parse_retry_after(reply.headers.get("retry-after")))
        if status == 204:
            return None
        if not 200 <= status < 300:
            code, message = _error_of(reply.body)
            raise UpstreamRejected(f"{service} answered {status}", service=service, status=status,
                                   error_code=code, error_message=message)
        if not _is_json(reply.headers.get("content-type", "")):
            raise UpstreamBadResponse(f"{service} answered with a non-JSON body", service=service)
        try:
            return orjson.loads(reply.body)
        except ValueError as exc:
            raise UpstreamBadResponse(f"{service} answered with malformed JSON", service=service) from exc
