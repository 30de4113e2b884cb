"""BookVault Gateway: a GraphQL BFF over the BookVault services (ARCHITECTURE.md)."""

from .app import Api, create_app, executable_schema
from .cache import CachePolicy
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
from .relations import Relation, resolve
from .source import Binding, EntitySource

__all__ = [
    "Api",
    "create_app",
    "executable_schema",
    "Settings",
    "ServiceConfig",
    "Binding",
    "CachePolicy",
    "EntitySource",
    "Relation",
    "resolve",
    "GatewayError",
    "BadUserInput",
    "NotFound",
    "UpstreamError",
    "UpstreamUnavailable",
    "UpstreamTimeout",
    "UpstreamBadResponse",
]
