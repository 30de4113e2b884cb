"""The write path (ARCHITECTURE.md, "Writes"): what a mutation's resolver needs besides the
entity source.

- `customer_of`: the one place that decides who the customer is: the verified token's
  customer; staff act for the customer the input names (ARCHITECTURE.md, "Callers").
- `scoped_key`: the caller's idempotency key, namespaced by that customer, so two
  callers' keys never meet in a service's key table.
- `send`: one write through `Upstream.request` (never retried: a lost answer is the
  caller's to repeat with the same key) under the request's deadline; a 4xx becomes
  `BAD_USER_INPUT`, `NOT_FOUND` or a `Refused` carrying the service's code.
- `evict`: what the write changed is forgotten by the cache at once, so the writer's
  next read sees it without waiting for the change feed (read-your-writes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from .context import RequestContext
from .errors import BadUserInput, Forbidden, GatewayError, NotFound, Refused, Unauthenticated, UpstreamRejected
from .relations import int_id
from .source import Binding
from .telemetry import batch_span

__all__ = ["MAX_KEY_LENGTH", "customer_of", "evict", "scoped_key", "send"]

MAX_KEY_LENGTH = 255  # as the services accept (draft-ietf-httpapi-idempotency-key-header)


def customer_of(context: RequestContext, claimed: Any = None) -> int:
    """Who the customer is: the verified caller's own customer; a customer id the input
    names must be theirs, unless the caller is staff, who act for the one named."""
    caller = context.reader.caller
    if caller is None:
        raise Unauthenticated("writes need a caller: sign in (Authorization: Bearer <token>)")
    named = int_id(claimed, "customerId") if claimed not in (None, "") else None
    if caller.staff and named is not None:
        return named
    if caller.customer_id is None:
        raise BadUserInput("this caller acts for no customer: name one in input.customerId (staff only)")
    if named is not None and named != caller.customer_id:
        raise Forbidden("input.customerId names another customer")
    return caller.customer_id


def scoped_key(customer: int, key: str) -> str:
    """The `Idempotency-Key` sent upstream for `customer`'s `key`. Namespaced by customer, not
    by credential: a caller whose token is refreshed between two tries is the same caller.
    Hashed, so any key the caller chose is a valid header value of bounded length."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise BadUserInput(f"idempotencyKey must be 1 to {MAX_KEY_LENGTH} characters")
    return f"gw-c{customer}-{hashlib.sha256(key.encode()).hexdigest()}"


async def send(context: RequestContext, service: str, method: str, url: str, *, route: str | None = None,
               json: Any = None, key: str | None = None) -> Any:
    """One write, sent at most once within the request's deadline; the service's refusal
    becomes the caller's error. 5xx, timeouts and an open breaker stay `UpstreamError`s
    (the outcome may be unknown: the caller repeats the mutation with the same key).
    `route` names the call in its CLIENT span and metrics (the URL's template)."""
    upstream = context.reader.source.upstream
    headers = {"Idempotency-Key": key} if key else None
    with batch_span(service, route or url, method=method):
        try:
            return await upstream.request(service, method, url, json=json, headers=headers,
                                          deadline=context.reader.deadline)
        except UpstreamRejected as exc:  # the caller's error, not the service's (its CLIENT span shows the 4xx)
            rejected = exc
    refusal = _refusal(rejected)
    if refusal is rejected:
        raise rejected
    raise refusal from rejected


def _refusal(exc: UpstreamRejected) -> GatewayError:
    """A service's 4xx to a write, as the caller's error."""
    service = exc.service
    message = exc.error_message or f"{service} refused the request"
    if exc.error_code == "IDEMPOTENCY_KEY_REUSED":
        message = "this idempotencyKey was used for another request; use a new key for a new one"
    if exc.status == 404:
        return NotFound(message, service=service)
    if exc.status in (400, 422):
        return BadUserInput(message, service=service)
    if exc.status == 409 and exc.error_code:
        return Refused(message, service=service, code=exc.error_code)
    return exc


async def evict(context: RequestContext, changed: Iterable[tuple[Binding, Iterable[Any]]]) -> None:
    """Forget the cached entries a write changed (every scope; ARCHITECTURE.md, "Writes")."""
    source = context.reader.source
    if source.cache is None:
        return
    for binding, keys in changed:
        policy = source.policy(binding)
        keep = policy.ttl + policy.max_stale if policy is not None else 0.0
        await source.cache.evict(binding.entity, list(keys), keep)
