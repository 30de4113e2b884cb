"""BookVault Gateway: a GraphQL BFF over the BookVault services."""

from .app import create_app
from .config import ServiceConfig, Settings
from .errors import (
    BadUserInput,
    GatewayError,
    NotFound,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .loading import Binding, Loaders

__all__ = [
    "create_app",
    "Settings",
    "ServiceConfig",
    "Binding",
    "Loaders",
    "GatewayError",
    "BadUserInput",
    "NotFound",
    "UpstreamError",
    "UpstreamUnavailable",
    "UpstreamTimeout",
    "UpstreamBadResponse",
]
