"""Bearer tokens for the subscription tests: until the gateway's authentication middleware
is wired (gateway/auth.py's Authenticator in GatewayState), this stands in for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.auth import SCOPE_KEY, Authenticator, JwtConfig, bearer
from gateway.errors import Unauthenticated

SECRET = "live-tests-secret-of-more-than-32-bytes"


@contextlib.asynccontextmanager
async def authenticated(app: Any) -> AsyncIterator[Any]:
    state = app.state.gateway
    authenticator = getattr(state, "authenticator", None)
    if authenticator is not None:
        yield app
        return
    authenticator = Authenticator(JwtConfig(secret=SECRET))
    object.__setattr__(state, "authenticator", authenticator)

    async def served(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            token = bearer(headers.get(b"authorization", b"").decode() or None)
            if token:
                try:
                    scope[SCOPE_KEY] = await authenticator.verify(token)
                except Unauthenticated:
                    pass
        await app(scope, receive, send)

    yield served
