"""Settings from the environment (the README's table is the reference; DESIGN §8)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ServiceConfig", "Settings", "DEFAULT_PORTS"]

DEFAULT_PORTS = {"customers": 8101, "catalog": 8102, "inventory": 8103, "orders": 8104, "payments": 8105, "shipping": 8106}


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{key} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    url: str
    max_batch: int = 100
    connect_timeout: float = 0.5
    read_timeout: float = 1.5
    max_connections: int = 50


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
    identity_header: str = "authorization"
    feed_wait: float = 10.0
    follow_feeds: bool = True

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
            identity_header=env.get("BOOKVAULT_IDENTITY_HEADER", "authorization").lower(),
            feed_wait=_float(env, "BOOKVAULT_FEED_WAIT_S", 10),
            follow_feeds=env.get("BOOKVAULT_FOLLOW_FEEDS", "1") not in ("0", "false", "no"),
        )


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
