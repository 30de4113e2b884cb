"""Settings from the environment (the README's table is the reference)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .cors import parse_origins

__all__ = ["ServiceConfig", "ResilienceConfig", "JwtConfig", "RateLimit", "ConnectionLimits", "Settings", "DEFAULT_PORTS"]

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_PORTS = {"customers": 8101, "catalog": 8102, "inventory": 8103, "orders": 8104, "payments": 8105, "shipping": 8106}


def _events_url(raw: str | None) -> str | None:
    """A NATS server's URL (README, "The versioned cache"), or None."""
    if raw is not None and not raw.startswith(("nats://", "tls://", "ws://", "wss://")):
        raise ValueError(f"BOOKVAULT_EVENTS_URL must be a NATS URL (nats://host:4222), got {raw!r}")
    return raw


def _float(env: Mapping[str, str], key: str, default: float, *, zero_ok: bool = False) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{key} must be {'zero or more' if zero_ok else 'positive'}, got {raw!r}")
    return value


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = _float(env, key, default)
    if value != int(value):
        raise ValueError(f"{key} must be a whole number, got {env.get(key)!r}")
    return int(value)


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be true or false, got {env.get(key)!r}")


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    url: str
    max_batch: int = 100
    connect_timeout: float = 0.5
    read_timeout: float = 1.5
    max_connections: int = 50
    retries: int = 2  # extra attempts of an idempotent read (ARCHITECTURE.md, "Resilience")
    max_body_bytes: int = MAX_BODY_BYTES  # a longer answer is UPSTREAM_BAD_RESPONSE


@dataclass(frozen=True)
class ResilienceConfig:
    """The request deadline, retry budget and circuit breakers (ARCHITECTURE.md, "Resilience"; README's table)."""

    deadline: float = 2.0  # seconds for one whole GraphQL request
    min_call: float = 0.02  # a call with less time than this left is not started
    backoff: float = 0.05  # first retry waits up to this (full jitter), doubling each time
    backoff_max: float = 1.0
    retry_ratio: float = 0.2  # retries a service may get, per call made to it
    retry_burst: float = 10.0  # retries saved up for a burst of failures
    breaker_threshold: int = 5  # consecutive failures that open a service's breaker
    breaker_cooldown: float = 2.0  # seconds open before one probe is let through

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ResilienceConfig:
        ms = 1000.0
        return cls(
            deadline=_float(env, "BOOKVAULT_DEADLINE_MS", cls.deadline * ms) / ms,
            min_call=_float(env, "BOOKVAULT_MIN_CALL_MS", cls.min_call * ms) / ms,
            backoff=_float(env, "BOOKVAULT_RETRY_BACKOFF_MS", cls.backoff * ms) / ms,
            backoff_max=_float(env, "BOOKVAULT_RETRY_BACKOFF_MAX_MS", cls.backoff_max * ms) / ms,
            retry_ratio=_float(env, "BOOKVAULT_RETRY_BUDGET_RATIO", cls.retry_ratio, zero_ok=True),
            retry_burst=_float(env, "BOOKVAULT_RETRY_BUDGET_BURST", cls.retry_burst, zero_ok=True),
            breaker_threshold=int(_float(env, "BOOKVAULT_BREAKER_THRESHOLD", cls.breaker_threshold)),
            breaker_cooldown=_float(env, "BOOKVAULT_BREAKER_COOLDOWN_MS", cls.breaker_cooldown * ms) / ms,
        )


@dataclass(frozen=True)
class JwtConfig:
    """How bearer tokens are verified (gateway/auth.py; README, "Callers")."""

    jwks_url: str | None = None
    secret: str | None = None  # HS256; the demo's is generated (bookvault/cli.py)
    issuer: str | None = None
    audience: str | None = None
    customer_claim: str = "customer_id"  # the claim naming the customer the caller acts as
    scopes_claim: str = "scope"  # a space-separated string (RFC 8693 §4.2) or a list
    staff_scope: str = "staff"  # the scope that may read every customer's data
    leeway: float = 30.0  # seconds of clock skew allowed on exp, nbf and iat
    jwks_timeout: float = 2.0  # seconds, for one JWKS fetch
    jwks_refresh: float = 30.0  # at most one fetch per this many seconds for an unknown kid

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JwtConfig:
        return cls(
            jwks_url=env.get("BOOKVAULT_JWT_JWKS_URL") or None,
            secret=env.get("BOOKVAULT_JWT_SECRET") or None,
            issuer=env.get("BOOKVAULT_JWT_ISSUER") or None,
            audience=env.get("BOOKVAULT_JWT_AUDIENCE") or None,
            customer_claim=env.get("BOOKVAULT_JWT_CUSTOMER_CLAIM") or cls.customer_claim,
            scopes_claim=env.get("BOOKVAULT_JWT_SCOPES_CLAIM") or cls.scopes_claim,
            staff_scope=env.get("BOOKVAULT_JWT_STAFF_SCOPE") or cls.staff_scope,
            leeway=_float(env, "BOOKVAULT_JWT_LEEWAY_S", cls.leeway, zero_ok=True),
            jwks_timeout=_float(env, "BOOKVAULT_JWT_JWKS_TIMEOUT_MS", cls.jwks_timeout * 1000) / 1000,
        )


@dataclass(frozen=True)
class RateLimit:
    """Requests per second per caller (its verified subject, else its address), with a burst
    (gateway/ratelimit.py). A rate of 0 turns the limit off."""

    rate: float = 0.0
    burst: int = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RateLimit:
        return cls(rate=_float(env, "BOOKVAULT_RATE_LIMIT", cls.rate, zero_ok=True),
                   burst=int(_float(env, "BOOKVAULT_RATE_BURST", cls.burst)))


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold (gateway/connections.py; README, "Limits and
    cost"): time to send a head and a body, idle time, connections per instance and per
    address, event streams per caller."""

    head_timeout: float = 10.0  # seconds from connecting (or a request's first byte) to the end of its head
    body_timeout: float = 10.0  # seconds from a head to the end of its body, any route (/graphql: its deadline)
    keepalive: float = 5.0  # seconds an idle keep-alive connection is kept (uvicorn's timeout_keep_alive)
    max_head_bytes: int = 65_536  # request line and headers; longer is 431
    max_connections: int = 10_000  # per instance, lowered to what the file-descriptor limit allows
    per_address: int = 256  # per client address (IPv6: per /64); 0: no cap (behind a proxy)
    streams_per_caller: int = 32  # WebSockets and event streams per caller (subject, else address)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConnectionLimits:
        return cls(
            head_timeout=_float(env, "BOOKVAULT_HEAD_TIMEOUT_S", cls.head_timeout),
            body_timeout=_float(env, "BOOKVAULT_BODY_TIMEOUT_S", cls.body_timeout),
            keepalive=_float(env, "BOOKVAULT_KEEPALIVE_S", cls.keepalive),
            max_head_bytes=_int(env, "BOOKVAULT_MAX_HEAD_BYTES", cls.max_head_bytes),
            max_connections=_int(env, "BOOKVAULT_MAX_CONNECTIONS", cls.max_connections),
            per_address=int(_float(env, "BOOKVAULT_MAX_CONNECTIONS_PER_ADDRESS", cls.per_address, zero_ok=True)),
            streams_per_caller=_int(env, "BOOKVAULT_MAX_STREAMS_PER_CALLER", cls.streams_per_caller),
        )


@dataclass(frozen=True)
class Settings:
    services: dict[str, ServiceConfig]
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "data"
    redis_url: str | None = None
    redis_timeout: float = 0.05
    redis_rest: float = 1.0  # after a Redis failure, seconds before it is tried again
    cache_namespace: str = "bv"
    cache_max_keys: int = 50_000
    # entity -> (ttl seconds, max-stale seconds); None keeps the binding's default
    cache_overrides: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    jwt: JwtConfig = field(default_factory=JwtConfig)  # who is asking (gateway/auth.py)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    feed_wait: float = 10.0
    follow_feeds: bool = True
    # nats://...: change events from the services' relays through NATS JetStream, instead of
    # long-polling each service's /events (gateway/events.py; issue 27).
    events_url: str | None = None
    learn_limits: bool = True  # read each service's maxBatch from GET /_meta
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call with credentials (gateway/cors.py)
    # The front door (README, "Limits and cost"): what one request may ask for.
    max_request_bytes: int = 1024 * 1024  # a longer body is refused while it streams (413)
    max_query_length: int = 32_768  # characters of a query text, checked before parsing
    max_tokens: int = 5000
    max_depth: int = 12
    max_aliases: int = 50
    max_selections: int = 200  # fields, fragment spreads and inline fragments, as written
    max_ids: int = 500  # ids one list argument may name
    max_cost: int = 2000  # upstream calls + entities an operation may fetch (gateway/cost.py)
    cost_list_size: int = 5  # items assumed in an embedded list that declares no estimate
    introspection: bool = True  # off: __schema/__type refused, no "Did you mean" suggestions
    document_workers: int = 1  # processes that parse and validate new documents (0: a thread)
    apq_max_entries: int = 10_000  # persisted queries kept in memory (least recently used out)
    apq_ttl: float = 86_400.0  # seconds a persisted query lives in Redis
    trusted_documents: str | None = None  # manifest path: only its operations run
    # The key of consistency tokens' MAC (gateway/consistency.py); None: derived from the
    # deployment's configuration, shared by its instances but no secret.
    consistency_secret: str | None = None
    consistency_wait: float = 0.5  # seconds a request may wait for this instance's feed to catch up
    floor_channel: bool = True  # publish and follow floor raises over Redis pub/sub
    # Live updates (README, "Subscriptions"): bounds per connection and per instance.
    live_per_connection: int = 100  # subscriptions one WebSocket may hold
    live_max: int = 10_000  # subscriptions this instance holds in all
    live_queue: int = 64  # messages waiting for one connection past which it is dropped (slow consumer)
    live_heartbeat: float = 15.0  # seconds between pings (WebSocket) and comment lines (SSE)
    live_init_timeout: float = 5.0  # seconds a WebSocket has to send connection_init
    # Fairness and slow consumers (issue 25; gateway/outbox.py): bytes in flight for one
    # connection past which, behind a blocked send, it is dropped; how long a send may stay
    # blocked (the client does not read) before it is dropped whatever the change rate;
    # messages in flight for one caller past which its first states wait; client pings
    # answered per second per WebSocket.
    live_queue_bytes: int = 1024 * 1024
    live_send_timeout: float = 5.0
    live_caller_in_flight: int = 256
    live_ping_rate: float = 2.0
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # gateway/connections.py
    # Gateway processes sharing the port (`bookvault gateway --workers N`; gateway/workers.py).
    workers: int = 1

    def token_secret(self) -> str:
        if self.consistency_secret:
            return self.consistency_secret
        urls = ",".join(f"{name}={cfg.url}" for name, cfg in sorted(self.services.items()))
        return f"derived:{self.cache_namespace}:{urls}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        host = env.get("BOOKVAULT_SERVICES_HOST", "127.0.0.1")
        services = {}
        for name, port in DEFAULT_PORTS.items():
            key = f"BOOKVAULT_{name.upper()}"
            services[name] = ServiceConfig(
                name=name,
                url=env.get(f"{key}_URL", f"http://{host}:{port}").rstrip("/"),
                max_batch=int(_float(env, f"{key}_MAX_BATCH", 100)),
                connect_timeout=_float(env, f"{key}_CONNECT_TIMEOUT", 0.5),
                read_timeout=_float(env, f"{key}_READ_TIMEOUT", 1.5),
                retries=int(_float(env, f"{key}_RETRIES", 2, zero_ok=True)),
            )
        return cls(
            services=services,
            host=env.get("BOOKVAULT_HOST", "127.0.0.1"),
            port=int(env.get("BOOKVAULT_PORT", "8000")),
            data_dir=env.get("BOOKVAULT_DATA_DIR", "data"),
            redis_url=env.get("REDIS_URL") or None,
            redis_timeout=_float(env, "BOOKVAULT_REDIS_TIMEOUT_MS", 50) / 1000,
            redis_rest=_float(env, "BOOKVAULT_REDIS_RETRY_MS", 1000) / 1000,
            cache_namespace=env.get("BOOKVAULT_CACHE_NAMESPACE", "bv"),
            cache_max_keys=int(_float(env, "BOOKVAULT_CACHE_MAX_KEYS", 50_000)),
            cache_overrides=_cache_overrides(env),
            jwt=JwtConfig.from_env(env),
            rate_limit=RateLimit.from_env(env),
            feed_wait=_float(env, "BOOKVAULT_FEED_WAIT_S", 10),
            follow_feeds=env.get("BOOKVAULT_FOLLOW_FEEDS", "1") not in ("0", "false", "no"),
            events_url=_events_url(env.get("BOOKVAULT_EVENTS_URL") or None),
            resilience=ResilienceConfig.from_env(env),
            cors_origins=parse_origins(env.get("BOOKVAULT_CORS_ORIGINS")),
            max_request_bytes=_int(env, "BOOKVAULT_MAX_BODY_BYTES", cls.max_request_bytes),
            max_query_length=_int(env, "BOOKVAULT_MAX_QUERY_LENGTH", cls.max_query_length),
            max_tokens=_int(env, "BOOKVAULT_MAX_TOKENS", cls.max_tokens),
            max_depth=_int(env, "BOOKVAULT_MAX_DEPTH", cls.max_depth),
            max_aliases=_int(env, "BOOKVAULT_MAX_ALIASES", cls.max_aliases),
            max_selections=_int(env, "BOOKVAULT_MAX_SELECTIONS", cls.max_selections),
            max_ids=_int(env, "BOOKVAULT_MAX_IDS", cls.max_ids),
            max_cost=_int(env, "BOOKVAULT_MAX_COST", cls.max_cost),
            cost_list_size=_int(env, "BOOKVAULT_COST_LIST_SIZE", cls.cost_list_size),
            introspection=_bool(env, "BOOKVAULT_INTROSPECTION", cls.introspection),
            document_workers=int(_float(env, "BOOKVAULT_DOCUMENT_WORKERS", cls.document_workers, zero_ok=True)),
            apq_max_entries=_int(env, "BOOKVAULT_APQ_MAX_ENTRIES", cls.apq_max_entries),
            apq_ttl=_float(env, "BOOKVAULT_APQ_TTL_S", cls.apq_ttl),
            trusted_documents=env.get("BOOKVAULT_TRUSTED_DOCUMENTS") or None,
            consistency_secret=env.get("BOOKVAULT_CONSISTENCY_SECRET") or None,
            consistency_wait=_float(env, "BOOKVAULT_CONSISTENCY_WAIT_MS", 500, zero_ok=True) / 1000,
            floor_channel=env.get("BOOKVAULT_FLOOR_CHANNEL", "1") not in ("0", "false", "no"),
            live_per_connection=_int(env, "BOOKVAULT_LIVE_PER_CONNECTION", cls.live_per_connection),
            live_max=_int(env, "BOOKVAULT_LIVE_MAX", cls.live_max),
            live_queue=_int(env, "BOOKVAULT_LIVE_QUEUE", cls.live_queue),
            live_heartbeat=_float(env, "BOOKVAULT_LIVE_HEARTBEAT_S", cls.live_heartbeat),
            live_init_timeout=_float(env, "BOOKVAULT_LIVE_INIT_TIMEOUT_S", cls.live_init_timeout),
            live_queue_bytes=_int(env, "BOOKVAULT_LIVE_QUEUE_BYTES", cls.live_queue_bytes),
            live_send_timeout=_float(env, "BOOKVAULT_LIVE_SEND_TIMEOUT_S", cls.live_send_timeout),
            live_caller_in_flight=_int(env, "BOOKVAULT_LIVE_CALLER_IN_FLIGHT", cls.live_caller_in_flight),
            live_ping_rate=_float(env, "BOOKVAULT_LIVE_PING_RATE", cls.live_ping_rate),
            connections=ConnectionLimits.from_env(env),
            workers=parse_workers(env.get("BOOKVAULT_WORKERS")),
        )


def parse_workers(raw: str | None) -> int:
    """BOOKVAULT_WORKERS or `--workers`: a whole number from 1, or `auto`: the cores this
    process may run on (its CPU affinity, which a container's cpuset narrows; not os.cpu_count())."""
    text = (raw or "").strip().lower()
    if not text:
        return 1
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"BOOKVAULT_WORKERS must be a whole number from 1 or `auto`, got {raw!r}")
    return int(text)


def _cache_overrides(env: Mapping[str, str]) -> dict[str, tuple[float | None, float | None]]:
    """BOOKVAULT_CACHE_<ENTITY>_TTL / _MAX_STALE, in seconds (0 allowed: never fresh)."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for key, raw in env.items():
        match = re.fullmatch(r"BOOKVAULT_CACHE_([A-Z]+)_(TTL|MAX_STALE)", key)
        if not match:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key} must be a number of seconds, got {raw!r}") from None
        if value < 0:
            raise ValueError(f"{key} must not be negative")
        entity = match[1].lower()
        ttl, stale = out.get(entity, (None, None))
        out[entity] = (value, stale) if match[2] == "TTL" else (ttl, value)
    return out
