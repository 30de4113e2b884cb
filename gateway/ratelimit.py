"""Rate limits per caller (README, "Callers"): the generic cell rate algorithm (GCRA, the
ATM Forum's virtual scheduling algorithm; also what redis-cell and Envoy's local limiter
implement): each caller has a theoretical arrival time (TAT); a request is let through when
TAT - now <= burst * interval, and moves TAT one interval on. One number per caller, no
timer, and the wait until the next allowed request is exact, so `Retry-After` is too.

With Redis the TAT lives there, updated by one Lua script (atomic: every instance shares
one budget per caller); without Redis, or while Redis fails, in this instance's memory
(the gateway keeps answering: a limiter must not become the outage).

`RateLimitMiddleware` (pure ASGI) answers 429 with `Retry-After` (RFC 9110 §10.2.3) and
`RATE_LIMITED` before the request is read, keyed by the verified subject, else the client's
address."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import caller_of
from .config import RateLimit

__all__ = ["Limiter", "RateLimitMiddleware"]

log = logging.getLogger("bookvault.ratelimit")

# KEYS[1]: the caller's TAT (ms); ARGV: interval ms, burst ms (tolerance), expiry ms.
# Returns 0 when allowed, else the ms to wait. Time is Redis's own (one clock for every
# instance); with script effects replication (Redis >= 5 default) TIME is allowed here.
_GCRA = """
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now + 1000))
return 0
"""
MAX_CALLERS = 100_000  # TATs kept in memory; the least recently seen go first


class Limiter:
    """`wait(key)`: 0 when the request may go, else the seconds until it may."""

    def __init__(self, config: RateLimit, redis_url: str | None = None, *, namespace: str = "bv",
                 timeout: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / config.rate if config.rate > 0 else 0.0
        self.tolerance = self.interval * max(config.burst - 1, 0)
        self.clock = clock
        self.namespace = namespace
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._redis = None
        if redis_url and self.interval:
            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
            self._script = self._redis.register_script(_GCRA)

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    async def wait(self, key: str) -> float:
        if self._redis is not None:
            try:
                ms = await self._script(keys=[f"{self.namespace}:rl:{key}"],
                                        args=[round(self.interval * 1000, 3), round(self.tolerance * 1000, 3)])
                return float(ms) / 1000
            except (RedisError, OSError) as exc:
                log.warning("rate limit: Redis failed (%s); this instance limits alone meanwhile", type(exc).__name__)
        return self._local(key)

    def _local(self, key: str) -> float:
        now = self.clock()
        tat = max(self._tat.get(key, now), now)
        wait = tat - self.tolerance - now
        if wait > 0:
            return wait
        self._tat[key] = tat + self.interval
        self._tat.move_to_end(key)
        while len(self._tat) > MAX_CALLERS:
            self._tat.popitem(last=False)
        return 0.0

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class RateLimitMiddleware:
    """429 RATE_LIMITED for a caller over its budget; `limiter_of(scope)` finds the limiter
    (made in the app's lifespan). Put it after authentication: it keys by the caller."""

    def __init__(self, app: ASGIApp, limiter_of: Callable[[Scope], Limiter | None]) -> None:
        self.app = app
        self.limiter_of = limiter_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter_of(scope) if scope["type"] in ("http", "websocket") else None
        if limiter is None or not limiter.enabled or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        caller = caller_of(scope)
        key = f"s:{caller.key}" if caller is not None else f"a:{(scope.get('client') or ('?',))[0]}"
        wait = await limiter.wait(key)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "rate limited"})  # RFC 6455 §7.4.1
            return
        body = orjson.dumps({"errors": [{"message": "too many requests: retry after the time in Retry-After",
                                         "extensions": {"code": "RATE_LIMITED"}}]})
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(wait))).encode())]})
        await send({"type": "http.response.body", "body": body})
