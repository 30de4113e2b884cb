"""The gateway's shared, long-lived objects: created in the lifespan, kept in app state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from .auth import Authenticator
from .cache import CachePolicy, EntityCache
from .config import Settings
from .consistency import Consistency
from .feed import FeedFollower
from .health import ReadinessProbe
from .ratelimit import Limiter
from .resilience import Resilience
from .source import EntitySource
from .telemetry import Telemetry
from .upstream import Upstream

if TYPE_CHECKING:
    from .documents import DocumentCache
    from .hub import LiveHub  # which imports the view, which imports this module

__all__ = ["GatewayState", "gateway_state"]


@dataclass(frozen=True)
class GatewayState:
    settings: Settings
    upstream: Upstream
    resilience: Resilience  # the services' breakers and retry budgets (upstream's too)
    cache: EntityCache
    policies: dict[str, CachePolicy]
    feeds: FeedFollower | None
    telemetry: Telemetry
    source: EntitySource  # cache, single-flight and upstream, read through
    # What /readyz checks besides the breakers; backends (caches...) append theirs.
    readiness: list[ReadinessProbe] = field(default_factory=list)
    limits: asyncio.Task[None] | None = None  # learning the services' maxBatch
    consistency: Consistency | None = None  # consistency tokens (gateway/consistency.py)
    authenticator: Authenticator | None = None  # bearer tokens into callers (gateway/auth.py)
    limiter: Limiter | None = None  # rate limits per caller (gateway/ratelimit.py)
    live: LiveHub | None = None  # subscriptions (gateway/hub.py)
    documents: DocumentCache | None = None  # parsed and validated documents, and their worker


def gateway_state(connection: HTTPConnection) -> GatewayState:
    state: GatewayState = connection.app.state.gateway
    return state
