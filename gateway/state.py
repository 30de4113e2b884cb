"""The gateway's shared, long-lived objects: created in the lifespan, kept in app state."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from .config import Settings
from .telemetry import Telemetry
from .upstream import Upstream

__all__ = ["GatewayState", "gateway_state"]


@dataclass(frozen=True)
class GatewayState:
    settings: Settings
    upstream: Upstream
    telemetry: Telemetry


def gateway_state(connection: HTTPConnection) -> GatewayState:
    state: GatewayState = connection.app.state.gateway
    return state
