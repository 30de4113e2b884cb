"""The gateway's shared, long-lived objects: created in the lifespan, kept in app state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from .cache import CachePolicy, EntityCache
from .config import Settings
from .feed import FeedFollower
from .flights import SingleFlight
from .health import ReadinessProbe
from .resilience import Resilience
from .telemetry import Telemetry
from .upstream import Upstream

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
    # What /readyz checks besides the breakers; backends (caches...) append theirs.
    readiness: list[ReadinessProbe] = field(default_factory=list)
    limits: asyncio.Task[None] | None = None  # learning the services' maxBatch
    flights: SingleFlight = field(default_factory=SingleFlight)  # reads shared by concurrent requests


def gateway_state(connection: HTTPConnection) -> GatewayState:
    state: GatewayState = connection.app.state.gateway
    return state
