"""Real clients against a gateway on a real port: Apollo Client's automatic persisted queries
(createPersistedQueryLink over HttpLink) and the graphql-http audit suite (GraphQL over HTTP
conformance), both from the npm registry at the versions tests/js/package-lock.json pins."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shop import STAFF, Shop, on_a_real_port, running_gateway

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    """node, with tests/js's locked packages installed (`.ci/run` runs `npm ci`; a checkout without them gets it here)."""
    found = shutil.which("node")
    assert found, "node 20 and npm are needed: .ci/run installs them (apt-get install nodejs npm)"
    if not (JS / "node_modules" / "@apollo" / "client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    return found


async def run_node(node: str, script: str, url: str) -> Any:
    token = STAFF["authorization"].removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(node, script, url, cwd=JS, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE,
                                                   env={**os.environ, "BOOKVAULT_TOKEN": token})
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_apollo_client_persisted_queries_register_then_run_by_hash(node: str, shop: Shop) -> None:
    """Apollo Client sends the hash alone, gets PERSISTED_QUERY_NOT_FOUND, retries with the query; the next time the hash alone is answered."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url:
        out = await run_node(node, "apollo_apq.mjs", f"{url}/graphql")
    wire = [(w["method"], w["sha256Hash"] is not None, w["withQuery"], w["status"], w["codes"]) for w in out["wire"]]
    assert wire == [
        ("POST", True, False, 200, ["PERSISTED_QUERY_NOT_FOUND"]),  # hash only: not found
        ("POST", True, True, 200, []),  # hash + query: registered and answered
        ("POST", True, False, 200, []),  # the second query: hash only, answered
    ]
    assert len({w["sha256Hash"] for w in out["wire"]}) == 1  # one document, one hash
    async with shop.client("orders") as client:
        order = (await client.get("/orders/4850")).json()
    async with shop.client("customers") as client:
        customer = (await client.get(f"/customers/{order['customerId']}")).json()
    expected = {"__typename": "Order", "id": "4850", "status": order["status"],
                "customer": {"__typename": "Customer", "name": customer["name"]}}
    assert out["wire"][1]["data"] == out["wire"][2]["data"] == {"order": expected}
    assert [r["error"] for r in out["results"]] == [None, None]
    assert all(r["data"]["order"]["customer"]["name"] == customer["name"] for r in out["results"])


async def test_the_graphql_http_audit_suite_passes_every_audit(node: str, shop: Shop) -> None:
    """Every graphql-http server audit is ok: requirements, recommendations and notices alike."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url:
        results = await run_node(node, "audit.mjs", f"{url}/graphql")
    failing = [f"{r['status']}: {r['name']} ({r['reason']})" for r in results if r["status"] != "ok"]
    assert len(results) > 30
    assert failing == []
