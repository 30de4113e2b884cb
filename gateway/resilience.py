"""Degradation and resilience (ARCHITECTURE.md, "Resilience"): the request's deadline, a circuit breaker and a
retry budget per service, and the policy that runs one upstream call under them.

Knows nothing of httpx: an attempt is any coroutine that raises the gateway's errors
(`upstream` translates the transport's). The timeouts are enforced here with asyncio, so
they hold on any transport, in-process ones included; httpx's own timeouts stay as the
first line on real sockets.

Hooks for other layers:
- an open breaker raises `CircuitOpen` (an `UpstreamUnavailable`) before anything is
  sent, so a cache above the upstream client catches `UpstreamUnavailable` and serves;
- `Resilience.on_retry` listeners run in the caller's context before each backoff (a
  tracing span open around the call can count retries there); a final `UpstreamError`
  carries `attempts`, the number of times the call was sent;
- `CircuitBreaker.listeners` hear every state change (metrics); changes are also logged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import tenacity

from .config import ResilienceConfig, ServiceConfig
from .errors import CircuitOpen, UpstreamError, UpstreamTimeout, UpstreamUnavailable

__all__ = [
    "DEADLINE_HEADER",
    "RETRYABLE_STATUSES",
    "Deadline",
    "BreakerState",
    "CircuitBreaker",
    "RetryBudget",
    "Resilience",
    "parse_retry_after",
    "partial_result",
]

log = logging.getLogger("bookvault.resilience")
T = TypeVar("T")
Clock = Callable[[], float]
# One attempt of a call, given the milliseconds it may take (sent upstream as a header).
Attempt = Callable[[int], Awaitable[T]]
RetryListener = Callable[[str, int, UpstreamError], None]

DEADLINE_HEADER = "X-Request-Deadline-Ms"
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class Deadline:
    """The moment one GraphQL request must be answered by; every upstream call it makes
    gets only what is left."""

    def __init__(self, budget: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + budget

    @classmethod
    def for_request(cls, budget: float, asked_ms: str | None = None) -> Deadline:
        """`budget` seconds, or less when the caller sent its own deadline header."""
        if asked_ms and asked_ms.isdigit():
            budget = min(budget, int(asked_ms) / 1000)
        return cls(budget)

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed → open after `threshold` consecutive failures → after `cooldown` seconds,
    half-open: exactly one probe goes through, and its outcome closes or re-opens it.

    `allow()` hands out a permit (the breaker's generation); an outcome reported with a
    permit from an earlier generation is ignored, so a call that started before the
    breaker opened cannot close it, nor take the probe's place."""

    def __init__(self, service: str, threshold: int, cooldown: float, clock: Clock = time.monotonic) -> None:
        self.service = service
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0  # consecutive
        self.listeners: list[Callable[[str, BreakerState, BreakerState], None]] = []
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> int:
        """A permit for one call, or `CircuitOpen` at once (nothing is sent)."""
        state = self.state
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
        elif state is not BreakerState.CLOSED:
            raise CircuitOpen(f"{self.service} is failing: circuit open, not called", service=self.service)
        return self._generation

    def succeeded(self, permit: int) -> None:
        if permit != self._generation:
            return
        self.failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)

    def failed(self, permit: int) -> None:
        if permit != self._generation:
            return
        self.failures += 1
        if self._state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._opened_at = self._clock()
            self._move(BreakerState.OPEN)

    def abandoned(self, permit: int) -> None:
        """The call ended with no verdict on the service (cancelled, or cut short by the
        request's deadline): a probe's place is free again."""
        if permit == self._generation and self._state is BreakerState.HALF_OPEN:
            self._probing = False

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._probing = False
        if new is BreakerState.CLOSED:
            self.failures = 0
        why = f" after {self.failures} consecutive failures" if new is BreakerState.OPEN else ""
        log.warning("circuit breaker %s: %s -> %s%s", self.service, old.value, new.value, why)
        for listener in self.listeners:
            listener(self.service, old, new)


class RetryBudget:
    """Retries as a share of calls, per service: each call earns `ratio` of a retry, at
    most `burst` are kept, a retry spends one. A service that fails everything sees at
    most `ratio` more traffic from retries, however many attempts a call may make."""

    def __init__(self, ratio: float, burst: float) -> None:
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def earn(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def spend(self) -> bool:
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


class Resilience:
    """Every service's breaker and retry budget (long-lived: made in the app's lifespan),
    and `call`, which runs one upstream call under them and the request's deadline."""

    def __init__(
        self,
        services: Mapping[str, ServiceConfig],
        config: ResilienceConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.services = dict(services)
        self.config = config
        self.breakers = {name: CircuitBreaker(name, config.breaker_threshold, config.breaker_cooldown, clock)
                         for name in self.services}
        self.budgets = {name: RetryBudget(config.retry_ratio, config.retry_burst) for name in self.services}
        self.on_retry: list[RetryListener] = []
        self._sleep = sleep
        self._backoff = tenacity.wait_random_exponential(multiplier=config.backoff, max=config.backoff_max)

    def states(self) -> dict[str, dict[str, Any]]:
        """Each service's breaker, for /readyz."""
        return {name: {"breaker": b.state.value, "failures": b.failures} for name, b in self.breakers.items()}

    async def call(self, service: str, attempt: Attempt[T], *, deadline: Deadline | None, retry: bool) -> T:
        """`attempt` under the breaker, the service's timeouts and `deadline` (without one,
        the configured request budget); sent again on a retryable failure only if `retry`
        (idempotent reads; writes never), with full-jitter backoff (at least what a
        Retry-After asks), while the deadline, `retries` and the retry budget allow."""
        deadline = deadline or Deadline(self.config.deadline)
        self.budgets[service].earn()
        sent = 0

        async def once() -> T:
            nonlocal sent
            permit, limit, by_deadline = self._admit(service, deadline)
            sent += 1
            return await self._timed(service, permit, limit, by_deadline, attempt)

        try:
            try:
                return await once()
            except UpstreamError as exc:
                if not (retry and _retryable(exc)):
                    raise
                first: UpstreamError | None = exc
            # Most calls succeed at once: tenacity (~40 us a call) is set up only for a retry.
            # Its first attempt is the one that just failed, so its counts, backoff and
            # stop rules see every attempt.
            retrying = tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception(_retryable),
                wait=self._wait,
                stop=lambda state: self._stop(service, deadline, state),
                before_sleep=lambda state: self._retrying(service, state),
                sleep=self._sleep,
                reraise=True,
            )
            async for trying in retrying:
                with trying:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    return await once()
        except UpstreamError as exc:
            exc.attempts = sent
            raise
        raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover

    def _admit(self, service: str, deadline: Deadline) -> tuple[int, float, bool]:
        """May a call start now, and for how long? Raises without sending when not."""
        cfg = self.services[service]
        remaining = deadline.remaining()
        if remaining < self.config.min_call:
            raise UpstreamTimeout(f"{service} not called: {remaining * 1000:.0f} ms left of the request's deadline",
                                  service=service)
        limit = cfg.connect_timeout + cfg.read_timeout
        permit = self.breakers[service].allow()
        return permit, min(limit, remaining), remaining < limit

    async def _timed(self, service: str, permit: int, limit: float, by_deadline: bool, attempt: Attempt[T]) -> T:
        breaker = self.breakers[service]
        timer = asyncio.timeout(limit)
        try:
            async with timer:
                result = await attempt(int(limit * 1000))
        except TimeoutError as exc:
            if not timer.expired():
                breaker.abandoned(permit)
                raise
            if by_deadline:  # the request ran out of time, not necessarily the service's fault
                breaker.abandoned(permit)
                raise UpstreamTimeout(f"{service} did not answer within the request's deadline",
                                      service=service) from exc
            breaker.failed(permit)
            raise UpstreamTimeout(f"{service} did not answer within {limit:.2f}s", service=service) from exc
        except (UpstreamUnavailable, UpstreamTimeout):
            breaker.failed(permit)
            raise
        except UpstreamError:
            breaker.succeeded(permit)  # it answered, if wrongly: it is up
            raise
        except BaseException:  # cancelled with its request, or a bug of ours
            breaker.abandoned(permit)
            raise
        breaker.succeeded(permit)
        return result

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None) or 0.0
        return max(self._backoff(state), asked)

    def _stop(self, service: str, deadline: Deadline, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number > self.services[service].retries:
            return True
        if deadline.remaining() - state.upcoming_sleep < self.config.min_call:
            return True  # no time to wait and try again
        return not self.budgets[service].spend()  # last: spent only on a retry that happens

    def _retrying(self, service: str, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        assert isinstance(exc, UpstreamError)
        log.info("retrying %s in %.0f ms after attempt %d: %s", service, state.upcoming_sleep * 1000,
                 state.attempt_number, exc)
        for listener in self.on_retry:
            listener(service, state.attempt_number, exc)


# Error codes that mean a field is missing because something failed, not because the
# answer is "there is none" (NOT_FOUND) or the query was wrong (BAD_USER_INPUT).
FAILURE_CODES = frozenset({"UPSTREAM_UNAVAILABLE", "UPSTREAM_TIMEOUT", "UPSTREAM_BAD_RESPONSE", "INTERNAL_SERVER_ERROR"})


def partial_result(field_errors: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The response's `extensions` entries that tell a frontend, without reading the
    errors, that some fields are missing and which services failed (ARCHITECTURE.md, "Resilience"):
    ``{"complete": false, "failedServices": [...]}``, or nothing when the answer is whole."""
    failed = [ext or {} for ext in field_errors if (ext or {}).get("code") in FAILURE_CODES]
    if not failed:
        return {}
    return {"complete": False, "failedServices": sorted({ext["service"] for ext in failed if ext.get("service")})}
