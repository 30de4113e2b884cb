"""The `bookvault` command and the app it serves: the gateway over the BookVault schema."""

from .app import create_app

__all__ = ["create_app"]
