"""The gateway's errors: one small hierarchy. Transport errors are translated into these
once, in `upstream`; resolvers never see httpx types.

graphql-core copies an exception's ``extensions`` onto the GraphQL error it locates at
the field's path, so raising one of these in a resolver yields
``{"message", "path", "extensions": {"code", "service"}}`` (ARCHITECTURE.md, "Resilience")."""

from __future__ import annotations

import logging
from typing import Any, cast

from graphql import GraphQLError
from strawberry.exceptions import StrawberryGraphQLError

__all__ = [
    "GatewayError",
    "BadUserInput",
    "NotFound",
    "Unauthenticated",
    "Forbidden",
    "UpstreamError",
    "UpstreamUnavailable",
    "CircuitOpen",
    "UpstreamTimeout",
    "UpstreamBadResponse",
    "UpstreamRejected",
    "Refused",
    "OutOfStock",
    "PaymentDeclined",
    "format_errors",
]

log = logging.getLogger("bookvault.gateway")


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


class Unauthenticated(GatewayError):
    """No verified caller where one is needed: a token that fails verification (HTTP 401,
    nothing runs), or private data asked for anonymously (null at its path)."""

    code = "UNAUTHENTICATED"


class Forbidden(GatewayError):
    """The caller is known but may not see this: another customer's data (null at its path)."""

    code = "FORBIDDEN"


class Refused(GatewayError):
    """A write the services refused for a reason the caller can act on (ARCHITECTURE.md,
    "Writes"). `code` may be the service's own (NOT_CANCELLABLE, CHECKOUT_IN_PROGRESS...);
    `details` are more extensions for the client, e.g. the cancelled order's id."""

    code = "REFUSED"

    def __init__(self, message: str, *, service: str | None = None, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, service=service)
        if code:
            self.code = code
        self.details = dict(details or {})

    @property
    def extensions(self) -> dict[str, Any]:
        return {**super().extensions, **self.details}


class OutOfStock(Refused):
    code = "OUT_OF_STOCK"


class PaymentDeclined(Refused):
    code = "PAYMENT_DECLINED"


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


class UpstreamRejected(UpstreamBadResponse):
    """The service answered 4xx. For a read the gateway made, that breaks the contract
    (UPSTREAM_BAD_RESPONSE, as any bad answer); a write reads `status` and the service's
    `{"error": {"code", "message"}}` to tell the caller what it did wrong."""

    def __init__(self, message: str, *, service: str, status: int, error_code: str | None = None,
                 error_message: str | None = None) -> None:
        super().__init__(message, service=service)
        self.status = status
        self.error_code = error_code
        self.error_message = error_message


def _unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return original is not None and not isinstance(original, (GatewayError, GraphQLError, StrawberryGraphQLError))


def format_errors(errors: list[GraphQLError]) -> list[dict[str, Any]]:
    """The errors as the client sees them: an error that is neither the client's nor a
    service's is a bug, answered with a generic message (the details go to the log)."""
    out = []
    for error in errors:
        if _unexpected(error):
            log.error("internal error at %s", error.path, exc_info=error.original_error)
            error = GraphQLError("Internal error", error.nodes, error.source, error.positions, error.path,
                                 extensions={"code": "INTERNAL_SERVER_ERROR"})
        out.append(cast(dict[str, Any], error.formatted))
    return out
