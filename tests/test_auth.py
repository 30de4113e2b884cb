"""Who is asking: verified tokens, each customer sees only their own data, staff see all
(ARCHITECTURE.md, "Callers"). Tokens are signed here exactly as an identity provider would."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.auth import mint
from gateway.config import JwtConfig, RateLimit
from schema import SDL_PATH
from shop import STAFF, TEST_SECRET, Shop, as_customer, on_a_real_port, own_redis, running_gateway

ORDER_PAGE = (SDL_PATH.parent / "examples" / "order_page.graphql").read_text()
ORDER_HISTORY = (SDL_PATH.parent / "examples" / "order_history.graphql").read_text()
ANONYMOUS: dict[str, str] = {}
C7, C8 = as_customer(7), as_customer(8)


async def ask(client: httpx.AsyncClient, query: str, headers: dict[str, str], **variables: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def codes(body: dict[str, Any]) -> dict[tuple[Any, ...], str]:
    return {tuple(e["path"]): e["extensions"]["code"] for e in body.get("errors", ())}


async def first_order_of(shop: Shop, customer: int) -> int:
    async with shop.client("orders") as orders:
        return (await orders.get("/orders", params={"customerId": customer, "limit": 1})).json()["data"][0]["id"]


@pytest.fixture
async def anonymous_gateway(shop: Shop) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(shop, headers={}) as (client, _):
        yield client


async def test_who_sees_what(shop: Shop, anonymous_gateway: httpx.AsyncClient) -> None:
    """The matrix: anonymous, customer 7, customer 8 and staff × me, customer, order, orders mixing owners;
    each gets exactly what it may see, FORBIDDEN/UNAUTHENTICATED at the right paths, the book intact."""
    o7, o8 = await first_order_of(shop, 7), await first_order_of(shop, 8)
    query = """query($o7: ID!, $o8: ID!) { book(id: 1) { title } me { id }
      customer(id: 7) { name } order(id: $o7) { id payment { status } }
      orders(ids: [$o7, $o8]) { id } }"""
    expected = {  # caller -> (me, customer 7, order o7, orders [o7, o8], errors by path)
        "anonymous": (None, None, None, [None, None], {("me",): "UNAUTHENTICATED", ("customer",): "UNAUTHENTICATED",
                      ("order",): "UNAUTHENTICATED", ("orders", 0): "UNAUTHENTICATED", ("orders", 1): "UNAUTHENTICATED"}),
        "c7": ("7", True, True, [True, None], {("orders", 1): "FORBIDDEN"}),
        "c8": ("8", None, None, [None, True], {("customer",): "FORBIDDEN", ("order",): "FORBIDDEN",
                                               ("orders", 0): "FORBIDDEN"}),
        "staff": (None, True, True, [True, True], {}),
    }
    for who, headers in (("anonymous", ANONYMOUS), ("c7", C7), ("c8", C8), ("staff", STAFF)):
        body = await ask(anonymous_gateway, query, headers, o7=str(o7), o8=str(o8))
        me, customer, order, orders, errors = expected[who]
        data = body["data"]
        assert data["book"]["title"], who
        assert (data["me"] or {}).get("id") == me, who
        assert (data["customer"] is not None) == bool(customer), who
        assert (data["order"] is not None) == bool(order), who
        assert [o is not None for o in data["orders"]] == [bool(o) for o in orders], who
        assert codes(body) == errors, who


async def test_another_customers_order_reads_nothing_behind_it(shop: Shop, anonymous_gateway: httpx.AsyncClient,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Customer 8 asking for 7's order page: FORBIDDEN at `order`, no payment, shipment or customer is read,
    and nothing of the order reaches the logs."""
    o7 = await first_order_of(shop, 7)
    async with shop.client("orders") as orders:
        order = (await orders.get(f"/orders/{o7}")).json()
    await shop.reset_stats()
    with caplog.at_level(logging.DEBUG):
        body = await ask(anonymous_gateway, ORDER_PAGE, C8, id=str(o7))
    assert body["data"] == {"order": None} and codes(body) == {("order",): "FORBIDDEN"}
    assert order["total"]["amount"] not in body["errors"][0]["message"]
    assert not any(order["total"]["amount"] in r.getMessage() or order["placedAt"] in r.getMessage()
                   for r in caplog.records)
    calls = await shop.calls()
    assert [name for name, reqs in calls.items() if reqs] == ["orders"]
    anonymous = await ask(anonymous_gateway, ORDER_PAGE, ANONYMOUS, id=str(o7))
    assert codes(anonymous) == {("order",): "UNAUTHENTICATED"}
    await shop.reset_stats()
    await ask(anonymous_gateway, ORDER_PAGE, ANONYMOUS, id=str(o7))
    assert all(reqs == [] for reqs in (await shop.calls()).values())  # anonymous: refused without a call


async def test_the_example_pages_for_their_owner_and_for_others(shop: Shop, anonymous_gateway: httpx.AsyncClient) -> None:
    """The order page and history answer in full for their customer and staff; for customer 8, FORBIDDEN only."""
    o7 = await first_order_of(shop, 7)
    for page, variables in ((ORDER_PAGE, {"id": str(o7)}), (ORDER_HISTORY, {"id": "7"})):
        mine = await ask(anonymous_gateway, page, C7, **variables)
        staff = await ask(anonymous_gateway, page, STAFF, **variables)
        theirs = await ask(anonymous_gateway, page, C8, **variables)
        assert "errors" not in mine and mine["data"] == staff["data"]
        root = next(iter(mine["data"]))
        assert theirs["data"] == {root: None} and codes(theirs) == {(root,): "FORBIDDEN"}


def _keypair(kind: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RS256" \
        else ec.generate_private_key(ec.SECP256R1())
    algorithm = jwt.algorithms.RSAAlgorithm if kind == "RS256" else jwt.algorithms.ECAlgorithm
    return key, json.loads(algorithm.to_jwk(key.public_key()))


class KeyServer:
    """A JWKS endpoint (RFC 7517) whose keys a test rotates; counts its fetches."""

    def __init__(self) -> None:
        self.private: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self.published: list[dict[str, Any]] = []
        self.fetches = 0
        self.app = Starlette(routes=[Route("/.well-known/jwks.json", self.jwks)])

    async def jwks(self, request: Any) -> JSONResponse:
        self.fetches += 1
        return JSONResponse({"keys": self.published})

    def add(self, kid: str, alg: str = "RS256") -> None:
        private, public = _keypair(alg)
        self.private[kid] = (alg, private)
        self.published.append({**public, "kid": kid, "use": "sig", "alg": alg})

    def token(self, kid: str, **claims: Any) -> str:
        alg, private = self.private[kid]
        now = int(time.time())
        body = {"sub": "customer-7", "customer_id": 7, "iss": "https://id.example", "aud": "bookvault",
                "iat": now, "exp": now + 600, **claims}
        return jwt.encode(body, private, algorithm=alg, headers={"kid": kid})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


JWKS_CONFIG = {"issuer": "https://id.example", "audience": "bookvault"}


async def status_of(client: httpx.AsyncClient, token: str) -> int:
    response = await client.post("/graphql", json={"query": "{ me { id } }"}, headers={"authorization": f"Bearer {token}"})
    if response.status_code == 401:
        assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    return response.status_code


async def test_bad_tokens_are_refused_with_401_before_any_call(shop: Shop) -> None:
    """Expired, not yet valid, wrong issuer or audience, alg none, HS256 signed with the public key, a bad
    signature, garbage: 401 UNAUTHENTICATED each, and no service is called."""
    keys = KeyServer()
    keys.add("k1")
    async with on_a_real_port(keys.app) as url:
        config = JwtConfig(jwks_url=f"{url}/.well-known/jwks.json", **JWKS_CONFIG)
        async with running_gateway(shop, headers={}, jwt=config, follow_feeds=False, learn_limits=False) as (client, _):
            assert await status_of(client, keys.token("k1")) == 200
            await shop.reset_stats()
            now = int(time.time())
            public_pem = keys.private["k1"][1].public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            signed = keys.token("k1")
            header, payload, signature = signed.split(".")
            cases = {
                "expired": keys.token("k1", exp=now - 300),
                "not yet valid": keys.token("k1", nbf=now + 300),
                "wrong issuer": keys.token("k1", iss="https://evil.example"),
                "wrong audience": keys.token("k1", aud="another-api"),
                "alg none": jwt.encode({"sub": "x", "exp": now + 60}, None, algorithm="none"),
                "HS256 with the public key": _hs256_with(public_pem, {"sub": "customer-7", "customer_id": 7,
                                                                      "exp": now + 60, **JWKS_CONFIG_CLAIMS}),
                "bad signature": f"{header}.{payload}.{signature[:-4]}AAAA",
                "unknown kid": jwt.encode({"sub": "x"}, keys.private["k1"][1], algorithm="RS256", headers={"kid": "k9"}),
                "garbage": "!!not-a-token!!",
            }
            for case, token in cases.items():
                assert await status_of(client, token) == 401, case
            not_bearer = await client.post("/graphql", json={"query": "{ me { id } }"},
                                           headers={"authorization": "Basic dXNlcjpwYXNz"})
            assert not_bearer.status_code == 401
    assert all(reqs == [] for reqs in (await shop.calls()).values())


JWKS_CONFIG_CLAIMS = {"iss": "https://id.example", "aud": "bookvault"}


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token whose HMAC key is the RSA public key: the algorithm-confusion attack (RFC 8725 §2.1).
    PyJWT refuses to sign with a PEM key, so it is signed by hand, as an attacker would."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


async def test_key_rotation_is_picked_up_and_a_dead_key_server_keeps_cached_keys(shop: Shop) -> None:
    """A new kid is fetched without a restart, at most once per refresh interval however many tokens
    name unknown kids."""
    keys = KeyServer()
    keys.add("k1")
    clock = Clock()
    async with on_a_real_port(keys.app) as url:
        config = JwtConfig(jwks_url=f"{url}/.well-known/jwks.json", jwks_refresh=30.0, **JWKS_CONFIG)
        async with running_gateway(shop, headers={}, jwt=config, clock=clock, follow_feeds=False,
                                   learn_limits=False) as (client, _):
            assert await status_of(client, keys.token("k1")) == 200
            assert keys.fetches == 1
            keys.add("k2", "ES256")  # the identity provider rotates: a new key, an EC one
            clock.now += 31
            assert await status_of(client, keys.token("k2")) == 200
            assert keys.fetches == 2
            made_up = [jwt.encode({"sub": "x"}, keys.private["k1"][1], algorithm="RS256", headers={"kid": f"z{i}"})
                       for i in range(20)]
            assert set(await asyncio.gather(*(status_of(client, t) for t in made_up))) == {401}
            assert keys.fetches == 2  # fetched at most once per 30 s: no flood reaches the key server


async def test_cached_keys_outlive_the_key_server(shop: Shop) -> None:
    """Keys fetched while the JWKS server was up verify after it is gone; an unknown kid is refused, promptly."""
    keys = KeyServer()
    keys.add("k1")
    clock = Clock()
    server = on_a_real_port(keys.app)
    url = await server.__aenter__()
    config = JwtConfig(jwks_url=f"{url}/.well-known/jwks.json", jwks_timeout=1.0, **JWKS_CONFIG)
    async with running_gateway(shop, headers={}, jwt=config, clock=clock, follow_feeds=False,
                               learn_limits=False) as (client, _):
        assert await status_of(client, keys.token("k1")) == 200
        await server.__aexit__(None, None, None)
        keys.add("k2")
        clock.now += 60
        assert await status_of(client, keys.token("k1")) == 200
        started = time.monotonic()
        assert await status_of(client, keys.token("k2")) == 401
        assert time.monotonic() - started < 3  # the fetch is bounded by its timeout


async def test_private_entries_never_reach_another_subject_across_instances(shop: Shop, namespace: str) -> None:
    """Two instances sharing Redis, 120 concurrent requests from random callers: each sees only its own
    customer record (or FORBIDDEN), staff see the one asked; nothing cached crosses subjects."""
    emails = {}
    async with shop.client("customers") as customers:
        for c in customer_ids:
            emails[c] = (await customers.get(f"/customers/{c}")).json()["email"]
    query = "query($id: ID!) { customer(id: $id) { email } me { email } }"
    rng = random.Random(7)
    async with running_gateway(shop, headers={}, redis_url="redis://127.0.0.1:6379/0", cache_namespace=namespace) as (a, _), \
            running_gateway(shop, headers={}, redis_url="redis://127.0.0.1:6379/0", cache_namespace=namespace) as (b, _):
        callers = [(c, as_customer(c)) for c in customer_ids] + [(None, STAFF)]
        asks = [(rng.choice((a, b)), *rng.choice(callers), rng.choice(customer_ids)) for _ in range(120)]
        bodies = await asyncio.gather(*(ask(client, query, headers, id=str(asked))
                                        for client, _, headers, asked in asks))
    for (_, who, _, asked), body in zip(asks, bodies, strict=True):
        data = body["data"]
        if who is None or who == asked:
            assert data["customer"] == {"email": emails[asked]}
        else:
            assert data["customer"] is None and codes(body)[("customer",)] == "FORBIDDEN"
        assert data["me"] == (None if who is None else {"email": emails[who]})


customer_ids = [7, 8, 9, 10]


async def test_the_rate_limit_is_per_caller_and_shared_by_instances(shop: Shop) -> None:
    """Budget 5 (burst) at 0.2/s: the sixth request of a caller, to either instance, is 429 RATE_LIMITED
    with Retry-After; another caller, and another address, are unaffected."""
    limit = RateLimit(rate=0.2, burst=5)
    with own_redis() as (url, _):
        async with running_gateway(shop, headers={}, redis_url=url, rate_limit=limit) as (a, _), \
                running_gateway(shop, headers={}, redis_url=url, rate_limit=limit) as (b, _):
            query = {"query": "{ book(id: 1) { title } }"}
            answers = [await (a if i % 2 else b).post("/graphql", json=query, headers=C7) for i in range(6)]
            assert [r.status_code for r in answers] == [200] * 5 + [429]
            limited = answers[-1]
            assert limited.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
            assert 1 <= int(limited.headers["retry-after"]) <= 5
            assert (await a.post("/graphql", json=query, headers=C8)).status_code == 200
            assert (await b.post("/graphql", json=query)).status_code == 200  # anonymous: its address's budget


async def test_the_rate_limit_without_redis_is_per_instance(shop: Shop) -> None:
    """No Redis: the budget lives in the instance's memory; the request past it gets 429."""
    async with running_gateway(shop, headers={}, rate_limit=RateLimit(rate=0.5, burst=3)) as (client, _):
        query = {"query": "{ book(id: 1) { title } }"}
        statuses = [(await client.post("/graphql", json=query, headers=C7)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert (await client.post("/graphql", json=query, headers=C8)).status_code == 200


class Recording(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.headers = inner, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        return await self.inner.handle_async_request(request)


async def test_the_caller_is_forwarded_to_the_services(shop: Shop) -> None:
    """Each upstream call says who asked (X-BookVault-Caller, an RFC 8941 dictionary) beside traceparent."""
    recording = Recording(shop.transports["customers"])
    async with running_gateway(shop, {"customers": recording}, headers=C7, follow_feeds=False,
                               learn_limits=False) as (client, _):
        await ask(client, "{ me { name } }", {})
    assert [h["x-bookvault-caller"] for h in recording.headers] == ['sub="customer-7", scopes="", customer=7']


async def test_demo_tokens_from_the_command_line_verify(shop: Shop, tmp_path: Any) -> None:
    """`bookvault token --customer 7` signs with the secret the demo generated; the gateway accepts it."""
    from bookvault.cli import demo_secret, main

    secret = demo_secret(str(tmp_path), create=True)
    assert secret and demo_secret(str(tmp_path), create=False) == secret
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["token", "--customer", "7", "--data-dir", str(tmp_path)]) == 0
    token = out.getvalue().strip()
    async with running_gateway(shop, headers={}, jwt=JwtConfig(secret=secret)) as (client, _):
        body = await ask(client, "{ me { id } }", {"authorization": f"Bearer {token}"})
    assert body["data"] == {"me": {"id": "7"}}
    assert mint(TEST_SECRET, "x") != token


def test_the_sdl_shows_the_rules_the_bindings_enforce() -> None:
    """Every type of an owned binding carries @ownedBy naming the same field (or `through` its parent); every
    root field that reads one carries @authenticated; nothing public carries either."""
    from graphql import build_schema

    from gateway.relations import RELATION
    from schema import BINDINGS, Query, sdl

    schema = build_schema(sdl())
    types = {"customer": "Customer", "order": "Order", "payment": "Payment", "shipment": "Shipment",
             "book": "Book", "author": "Author", "stock": "Stock"}
    for binding in BINDINGS:
        if binding.entity not in types:
            continue
        node = schema.type_map[types[binding.entity]].ast_node
        owned = {d.name.value: {a.name.value: a.value.value for a in d.arguments or ()} for d in node.directives or ()}
        if binding.owner is not None:
            assert owned == {"ownedBy": {"field": binding.owner}}, binding.entity
        elif binding.through_parent:
            assert owned == {"ownedBy": {"through": "order"}}, binding.entity
        else:
            assert owned == {}, binding.entity
    fields = Query.__strawberry_definition__.fields
    for field in fields:
        relation = field.metadata.get(RELATION)
        private = relation is not None and (relation.binding.owner is not None or relation.binding.through_parent)
        directives = {d.name.value for d in schema.query_type.fields[field.graphql_name or _camel(field.name)].ast_node.directives or ()}
        assert directives == ({"authenticated"} if private else set()), field.name


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
