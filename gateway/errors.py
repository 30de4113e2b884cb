"""The gateway's errors: one small hierarchy. Transport errors are translated into these
once, in `upstream`; resolvers never see httpx types.

graphql-core copies an exception's ``extensions`` onto the GraphQL error it locates at
the field's path, so raising one of these in a resolver yields
``{"message", "path", "extensions": {"code", "service"}}`` (DESIGN §6)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "GatewayError",
    "BadUserInput",
    "NotFound",
    "UpstreamError",
    "UpstreamUnavailable",
    "CircuitOpen",
    "UpstreamTimeout",
    "UpstreamBadResponse",
]


class GatewayError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.service = service

    @property
    def extensions(self) -> dict[str, Any]:
        ext: dict[str, Any] = {"code": self.code}
        if self.service:
            ext["service"] = self.service
        return ext


class BadUserInput(GatewayError):
    code = "BAD_USER_INPUT"


class NotFound(GatewayError):
    code = "NOT_FOUND"


class UpstreamError(GatewayError):
    """A service could not give a usable answer.

    `retryable`: the same read may succeed if sent again (refused or dropped connection,
    502/503/504/429); `retry_after`: seconds the service asked us to wait; `attempts`: how
    many times the call was sent before giving up (0: never sent). None of these reach the
    client: `extensions` stays {code, service}."""

    service: str

    def __init__(self, message: str, *, service: str, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message, service=service)
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 0


class UpstreamUnavailable(UpstreamError):
    code = "UPSTREAM_UNAVAILABLE"


class CircuitOpen(UpstreamUnavailable):
    """The service's circuit breaker is open: failed fast, nothing was sent. A cache layer
    catches `UpstreamUnavailable` (this included) to serve a stale entry instead."""


class UpstreamTimeout(UpstreamError):
    code = "UPSTREAM_TIMEOUT"


class UpstreamBadResponse(UpstreamError):
    code = "UPSTREAM_BAD_RESPONSE"
