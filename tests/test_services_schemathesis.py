"""Property-based: schemathesis generates requests from each service's own /openapi.json
(valid and invalid ones) and checks every answer against the document: no 5xx, documented
statuses, content types, headers and bodies; valid data accepted, invalid data refused."""

from __future__ import annotations

import re
import tempfile
import uuid

import schemathesis
from hypothesis import HealthCheck, settings

from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from mock_services import SERVICES, create_app

# Seeded once per test session in a directory of its own; schemathesis runs each app's
# lifespan over ASGI, in process. SQLite only: the apps are made at import, when the tests
# are collected, before any fixture can make a PostgreSQL database; the garbage sweep
# (test_services_input.py) and the OpenAPI response checks run on both backends.
_DATA = tempfile.mkdtemp(prefix="bookvault-schemathesis-")
SCHEMAS = {
    # The orders service's checkout calls other services; here none listens, so it answers
    # 503 CATALOG_UNAVAILABLE (documented) quickly instead of waiting out a timeout.
    name: schemathesis.openapi.from_asgi("/openapi.json", create_app(spec, data_dir=f"{_DATA}/{name}", options={
        "urls": {n: "http://127.0.0.1:9" for n in ("catalog", "inventory", "payments", "shipping")}}))
    # A long-poll with `wait` up to 30 s would dominate the run; the feed has its own tests.
    .exclude(path="/events")
    for name, spec in SERVICES.items()
}
BOUNDED = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


VALID_KEY = re.compile(r"[!-~]{1,255}")
# What a document cannot say, left out where it applies:
EXCLUDED = {
    # Rules across fields that JSON Schema cannot state: ids together with customerId, and
    # items in several currencies, are refused (400) although each field alone is valid.
    ("GET", "/orders"): [positive_data_acceptance],
    ("POST", "/orders"): [positive_data_acceptance],
    # These call other services, which do not run here: their documented 503 is right.
    ("POST", "/checkouts"): [not_a_server_error],
    ("POST", "/orders/{id}/cancel"): [not_a_server_error],
}


def _check(case: schemathesis.Case) -> None:
    # A valid Idempotency-Key is made unique per request: generated keys repeat ("0"), and
    # a key reused with another request is refused with 422 by design (its own tests).
    if case.headers and VALID_KEY.fullmatch(str(case.headers.get("Idempotency-Key", ""))):
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    case.call_and_validate(excluded_checks=EXCLUDED.get((case.method.upper(), case.path), []))


test_customers_match_their_document = BOUNDED(SCHEMAS["customers"].parametrize()(_check))
test_customers_match_their_document.__doc__ = "customers answers every generated request as its document says."
test_catalog_matches_its_document = BOUNDED(SCHEMAS["catalog"].parametrize()(_check))
test_catalog_matches_its_document.__doc__ = "catalog answers every generated request as its document says."
test_inventory_matches_its_document = BOUNDED(SCHEMAS["inventory"].parametrize()(_check))
test_inventory_matches_its_document.__doc__ = "inventory answers every generated request as its document says."
test_orders_match_their_document = BOUNDED(SCHEMAS["orders"].parametrize()(_check))
test_orders_match_their_document.__doc__ = "orders answers every generated request as its document says."
test_payments_match_their_document = BOUNDED(SCHEMAS["payments"].parametrize()(_check))
test_payments_match_their_document.__doc__ = "payments answers every generated request as its document says."
test_shipping_matches_its_document = BOUNDED(SCHEMAS["shipping"].parametrize()(_check))
test_shipping_matches_its_document.__doc__ = "shipping answers every generated request as its document says."
