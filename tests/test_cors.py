"""CORS (README's configuration, BOOKVAULT_CORS_ORIGINS): listed origins may call with
credentials and get their preflights answered; any other origin gets nothing a browser
would accept; none listed, no CORS at all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from bookvault import create_app
from gateway import Settings
from gateway.config import JwtConfig
from shop import STAFF, TEST_SECRET

SHOP = "https://shop.example"
QUERY = {"query": "{ __typename }"}
Client = Callable[[str], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def gateway_with() -> Client:
    """`async with gateway_with("https://a, https://b") as client:` a gateway that calls no service."""

    @asynccontextmanager
    async def start(origins: str) -> AsyncIterator[httpx.AsyncClient]:
        env = Settings.from_env({"BOOKVAULT_CORS_ORIGINS": origins})
        app = create_app(Settings(services=env.services, cors_origins=env.cors_origins, follow_feeds=False,
                                  learn_limits=False, jwt=JwtConfig(secret=TEST_SECRET)))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
                yield client

    return start


def _preflight(origin: str) -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization"}


async def test_a_listed_origin_may_call_with_credentials(gateway_with):
    """A POST from a listed origin is answered with that origin allowed, credentials allowed and the trace id header exposed."""
    async with gateway_with(f"{SHOP}, http://localhost:5173/") as client:
        response = await client.post("/graphql", json=QUERY, headers={"origin": SHOP, **STAFF})
    assert response.status_code == 200 and response.json()["data"] == {"__typename": "Query"}
    assert response.headers["access-control-allow-origin"] == SHOP
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "x-trace-id" in response.headers["access-control-expose-headers"].lower()
    assert "origin" in response.headers["vary"].lower()


async def test_a_listed_origins_preflight_is_answered(gateway_with):
    """OPTIONS from a listed origin asking for POST with content-type and authorization gets 200 and permission for both."""
    async with gateway_with(f"http://localhost:5173,{SHOP}") as client:
        response = await client.options("/graphql", headers=_preflight(SHOP))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == SHOP
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization"} <= allowed
    assert int(response.headers["access-control-max-age"]) > 0


async def test_an_origin_not_listed_is_refused(gateway_with):
    """Another origin's preflight is a 400 and its requests carry no CORS permission, so a browser keeps the answer from it."""
    async with gateway_with(SHOP) as client:
        preflight = await client.options("/graphql", headers=_preflight("https://evil.example"))
        response = await client.post("/graphql", json=QUERY, headers={"origin": "https://evil.example"})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in response.headers  # without it a browser shows the page nothing


async def test_by_default_no_origin_is_allowed(gateway_with):
    """With BOOKVAULT_CORS_ORIGINS unset a cross-origin call gets no CORS header and a preflight gets no permission."""
    async with gateway_with("") as client:
        response = await client.post("/graphql", json=QUERY, headers={"origin": SHOP})
        preflight = await client.options("/graphql", headers=_preflight(SHOP))
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert not any(name.startswith("access-control-") for name in preflight.headers)


@pytest.mark.parametrize("value", ["*", "shop.example", "https://shop.example/app", "ftp://shop.example"])
def test_a_wildcard_or_malformed_origin_is_refused_at_start(value):
    """BOOKVAULT_CORS_ORIGINS with '*' or something that is not an origin stops the gateway from starting, with a clear message."""
    with pytest.raises(ValueError, match="BOOKVAULT_CORS_ORIGINS"):
        Settings.from_env({"BOOKVAULT_CORS_ORIGINS": value})
