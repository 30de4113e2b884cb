"""Settings from the environment (the README's table is the reference; DESIGN §8)."""

from __future__ import annotations

import os
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
    extra: dict[str, str] = field(default_factory=dict)

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
        )
