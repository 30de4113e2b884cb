"""Every HTTP call to the services goes through here: pooled clients per service with
their own timeouts and connection limits, a cap on body size, and the one place where
httpx's exceptions become the gateway's (`raise ... from exc`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from .config import ServiceConfig
from .errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .telemetry import httpx_event_hooks

__all__ = ["Upstream", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 8 * 1024 * 1024


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Upstream:
    """One pooled `httpx.AsyncClient` per service, created in the app's lifespan."""

    def __init__(
        self,
        services: Mapping[str, ServiceConfig],
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.services = dict(services)
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
        return self.services[service].max_batch

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def get_json(self, service: str, url: str) -> Any:
        """GET a JSON document, or raise an `UpstreamError` naming the service."""
        client = self._clients[service]
        try:
            async with client.stream("GET", url) as response:
                body = await self._read(response, service)
        except UpstreamError:
            raise
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{service} did not answer in time", service=service) from exc
        except httpx.HTTPError as exc:  # refused, reset mid-body, protocol violations
            raise UpstreamUnavailable(f"{service} is unreachable ({type(exc).__name__})", service=service) from exc
        return self._decode(response, body, service)

    @staticmethod
    async def _read(response: httpx.Response, service: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise UpstreamBadResponse(f"{service} sent a body over {MAX_BODY_BYTES} bytes", service=service)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise UpstreamBadResponse(f"{service} sent a body over {MAX_BODY_BYTES} bytes", service=service)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _decode(response: httpx.Response, body: bytes, service: str) -> Any:
        status = response.status_code
        if status >= 500 or status == 429:
            raise UpstreamUnavailable(f"{service} answered {status}", service=service)
        if status != 200:
            raise UpstreamBadResponse(f"{service} answered {status}", service=service)
        if not _is_json(response.headers.get("content-type", "")):
            raise UpstreamBadResponse(f"{service} answered with a non-JSON body", service=service)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamBadResponse(f"{service} answered with malformed JSON", service=service) from exc
