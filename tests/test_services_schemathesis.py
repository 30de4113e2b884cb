"""Property-based: schemathesis generates requests from each service's own /openapi.json
(valid and invalid ones) and checks every answer against the document: no 5xx, documented
statuses, content types, headers and bodies; valid data accepted, invalid data refused.

On both backends (README, "The services"): each operation runs twice, `[sqlite]` and
`[postgresql]`. Schemathesis reads the documents when the tests are collected, before any fixture
can make a database, so it talks to a stand-in app (`ServiceUnderTest`) that answers with the
document until a module fixture points it at the service on that backend's database: a SQLite
file in a directory of its own, or a PostgreSQL database bv_st_<random>_<service>, seeded on
first use and dropped when the module ends."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from backends import BACKENDS, PG_ADMIN, Postgres, run_in_thread
from mock_services import SERVICES, create_app, database_url
from mock_services.responses import JSONResponse

# The orders service's checkout calls other services; here none listens, so it answers
# 503 CATALOG_UNAVAILABLE (documented) quickly instead of waiting out a timeout.
OPTIONS = {"urls": {n: "http://127.0.0.1:9" for n in ("catalog", "inventory", "payments", "shipping")}}
BOUNDED = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
STOP_TIMEOUT_S = 30


class ServiceUnderTest:
    """The ASGI app schemathesis calls: the service on the current backend's database, started
    (its lifespan entered) on the loop schemathesis sends requests from, at its first request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.document = create_app(SERVICES[name]).state.openapi
        self.urls: dict[str, str] = {}  # backend -> database, set by the module's fixture
        self.backend: str | None = None
        self._apps: dict[str, Starlette] = {}
        self._stack = contextlib.AsyncExitStack()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # its own has nothing to do; the service's is entered below
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.backend is None:  # collection: the document only
            await JSONResponse(self.document)(scope, receive, send)
            return
        await (await self._app(self.backend))(scope, receive, send)

    async def _app(self, backend: str) -> Starlette:
        if backend not in self._apps:
            self._loop = asyncio.get_running_loop()
            app = create_app(SERVICES[self.name], database=self.urls[backend], options=OPTIONS)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
            self._apps[backend] = app
        return self._apps[backend]

    def stop(self) -> None:
        """End every app started (from the test's thread, on the loop they run on)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(STOP_TIMEOUT_S)


APPS = {name: ServiceUnderTest(name) for name in SERVICES}
SCHEMAS = {
    # A long-poll with `wait` up to 30 s would dominate the run; the feed has its own tests.
    name: schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/events") for name, app in APPS.items()
}


@pytest.fixture(scope="module")
def databases_of_this_module() -> Iterator[None]:
    """A database per service and backend for this module's apps, gone when it ends."""
    directory = tempfile.mkdtemp(prefix="bookvault-schemathesis-")
    names = {service: f"bv_st_{uuid.uuid4().hex[:10]}_{service}" for service in SERVICES}

    async def sql(*statements: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement, timeout=60)
        finally:
            await conn.close()

    try:
        run_in_thread(lambda: sql(*(f'CREATE DATABASE "{name}"' for name in names.values())))
        for service, app in APPS.items():
            app.urls = {"sqlite": database_url(service, directory), "postgresql": Postgres.url(names[service])}
        yield
    finally:
        try:
            for app in APPS.values():
                app.stop()
        finally:
            run_in_thread(lambda: sql(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values())))
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def on_backend(request: pytest.FixtureRequest, databases_of_this_module: None) -> Iterator[str]:
    for app in APPS.values():
        app.backend = request.param
    yield request.param
    for app in APPS.values():
        app.backend = None


VALID_KEY = re.compile(r"[!-~]{1,255}")
# What a document cannot say, left out where it applies:
EXCLUDED = {
    # Rules across fields that JSON Schema cannot state: ids together with customerId; items in
    # several currencies, or whose total (quantity x unit price, summed) is past the largest
    # Money (400 AMOUNT_OUT_OF_RANGE), are refused although each field alone is valid.
    ("GET", "/orders"): [positive_data_acceptance],
    ("POST", "/orders"): [positive_data_acceptance],
    # These call other services, which do not run here: their documented 503 is right.
    ("POST", "/checkouts"): [not_a_server_error],
    ("POST", "/orders/{id}/cancel"): [not_a_server_error],
}


def _check(case: schemathesis.Case, on_backend: str) -> None:
    # A valid Idempotency-Key is made unique per request: generated keys repeat ("0"), and
    # a key reused with another request is refused with 422 by design (its own tests).
    if case.headers and VALID_KEY.fullmatch(str(case.headers.get("Idempotency-Key", ""))):
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    # The same for the key a payment void names (POST /payment-voids).
    key = case.body.get("key") if case.path == "/payment-voids" and isinstance(case.body, dict) else None
    if isinstance(key, str) and VALID_KEY.fullmatch(key):
        case.body["key"] = uuid.uuid4().hex
    case.call_and_validate(excluded_checks=EXCLUDED.get((case.method.upper(), case.path), []))


def _test(name: str, doc: str) -> Any:
    test = BOUNDED(SCHEMAS[name].parametrize()(_check))
    test.__doc__ = doc
    return test


test_customers_match_their_document = _test("customers", "customers answers every generated request as its document says.")
test_catalog_matches_its_document = _test("catalog", "catalog answers every generated request as its document says.")
test_inventory_matches_its_document = _test("inventory", "inventory answers every generated request as its document says.")
test_orders_match_their_document = _test("orders", "orders answers every generated request as its document says.")
test_payments_match_their_document = _test("payments", "payments answers every generated request as its document says.")
test_shipping_matches_its_document = _test("shipping", "shipping answers every generated request as its document says.")
