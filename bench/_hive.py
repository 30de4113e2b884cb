"""Hive Gateway + GraphQL Mesh over the six services, for bench/versus_hive.py: install the
pinned npm packages, turn each service's /openapi.json into a document Mesh can compose,
compose a supergraph, start and stop Hive Gateway.

Everything npm-side lives in bench/versus_hive/ (package.json, package-lock.json,
mesh.config.ts); node_modules is installed there with `npm ci` from the committed lock
file when it is missing, from the npm registry only. The facts behind each step are in
the README's "Benchmarks" section (what composing the services needed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["HIVE_DIR", "HiveError", "HiveGateway", "compose_supergraph", "ensure_installed", "installed_versions",
           "mesh_document"]

HIVE_DIR = Path(__file__).resolve().parent / "versus_hive"
NPM_REGISTRY = "https://registry.npmjs.org/"
# Routes every service shares: composition fails on them, and they are not data.
SHARED_ROUTES = frozenset({"/_meta", "/healthz", "/events", "/openapi.json"})
# The batch routes' comma-separated id parameters (README, "The services").
ID_LIST_PARAMS = frozenset({"ids", "bookIds", "orderIds"})
# Query field names given to each read route (Mesh would derive them from the operationIds).
FIELD_NAMES = {
    "/customers/{id}": "customer", "/customers": "customers",
    "/books/{id}": "book", "/books": "books", "/authors/{id}": "author", "/authors": "authors",
    "/stock/{bookId}": "stockOfBook", "/stock": "stock",
    "/orders/{id}": "order", "/orders": "orders",
    "/payments/{id}": "payment", "/payments": "payments",
    "/shipments/{id}": "shipment", "/shipments": "shipments",
}
PACKAGES = ("@graphql-hive/gateway", "@graphql-mesh/compose-cli", "@omnigraph/openapi", "graphql",
            "@graphql-tools/delegate")


class HiveError(RuntimeError):
    """Installing, composing or starting Hive Gateway failed."""


# -- installation ------------------------------------------------------------------------


def ensure_installed(log: Path) -> bool:
    """`npm ci` from the committed lock file when node_modules is missing; True when it ran.
    Only the npm registry is used (`--registry`); install scripts are not run."""
    if (HIVE_DIR / "node_modules" / "@graphql-hive" / "gateway" / "dist" / "bin.js").exists():
        return False
    npm = shutil.which("npm")
    if npm is None:
        raise HiveError("npm not found: Node.js 20 with npm is needed for Hive Gateway")
    with open(log, "ab") as out:
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--registry", NPM_REGISTRY],
                                  cwd=HIVE_DIR, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HiveError("npm ci took more than 15 minutes") from exc
    if done.returncode != 0:
        raise HiveError(f"npm ci failed (exit {done.returncode}); see {log}")
    return True


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = json.loads((HIVE_DIR / "node_modules" / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = None
    try:
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["node"] = None
    return out


# -- the services' OpenAPI documents, as Mesh can compose them -----------------------------


def _page_or_batch(schema: dict[str, Any]) -> dict[str, Any]:
    """GET /orders answers a page ({data, nextCursor, totalCount}) or a batch ({data,
    missing}): one object with the union of the properties, only `data` required, so the
    batch link can follow `result: "data"` (it cannot follow a GraphQL union). `nextCursor`
    is OpenAPI 3.1 `["string", "null"]`, which Mesh reads as `String!`: declared nullable,
    else the last page of a customer's orders is an error."""
    if "oneOf" not in schema:
        return schema
    properties: dict[str, Any] = {}
    for variant in schema["oneOf"]:
        items = variant.get("properties", {}).get("data", {}).get("items", {})
        if "customerId" in items.get("properties", {}):
            continue  # many customers' first pages (customerIds=): BookVault's own batch route, not Mesh's
        properties.update(variant.get("properties", {}))
    if "nextCursor" in properties:
        properties["nextCursor"] = {"type": "string", "nullable": True,
                                    "description": properties["nextCursor"].get("description", "")}
    return {"type": "object", "title": "OrderPage", "required": ["data"], "properties": properties}


def mesh_document(document: dict[str, Any]) -> dict[str, Any]:
    """One service's OpenAPI document reduced to what Mesh can compose: its read routes
    only (the shared /_meta, /healthz, /events make composition fail), an operationId per
    route naming its Query field, the comma-separated id parameters declared as arrays of
    integers (`style: form, explode: false` keeps `1,2,3` on the wire, and the keys taken
    from integer fields such as `bookId` pass as they are), GET /orders as one object, and
    path ids as plain strings (Mesh makes a scalar type per `pattern`, `queryInput_order_id`;
    the service still checks the pattern), and without `include`, which only BookVault uses."""
    doc = copy.deepcopy(document)
    paths: dict[str, Any] = {}
    for path, operations in doc.get("paths", {}).items():
        get = operations.get("get")
        if path in SHARED_ROUTES or get is None:
            continue
        get["operationId"] = FIELD_NAMES.get(path, get.get("operationId", path.strip("/").replace("/", "_")))
        # BookVault's own: `include` (a book's author sent with it) and the `included` it answers.
        get["parameters"] = [p for p in get.get("parameters", []) if p.get("name") != "include"]
        for param in get.get("parameters", []):
            if param.get("in") == "path":
                param["schema"].pop("pattern", None)
            if param.get("in") == "query" and param.get("name") in ID_LIST_PARAMS:
                param["schema"] = {"type": "array", "items": {"type": "integer"}}
                param["style"], param["explode"] = "form", False
        content = get.get("responses", {}).get("200", {}).get("content", {}).get("application/json")
        if content and "schema" in content:
            content["schema"] = _page_or_batch(content["schema"])
            content["schema"].get("properties", {}).pop("included", None)
        paths[path] = {"get": get}
    doc["paths"] = paths
    return doc


def compose_supergraph(service_urls: dict[str, str], workdir: Path, log: Path) -> Path:
    """Fetch each service's /openapi.json, write its Mesh document into `workdir`, compose
    with mesh.config.ts (the services' URLs are baked into the supergraph); the file."""
    docs = workdir / "openapi"
    docs.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=10.0) as client:
        for name, url in service_urls.items():
            response = client.get(f"{url}/openapi.json")
            response.raise_for_status()
            (docs / f"{name}.json").write_text(json.dumps(mesh_document(response.json()), indent=1))
    output = workdir / "supergraph.graphql"
    env = {**os.environ, "VERSUS_HIVE_OPENAPI_DIR": str(docs),
           **{f"VERSUS_HIVE_{name.upper()}_URL": url for name, url in service_urls.items()}}
    command = ["node", str(HIVE_DIR / "node_modules" / "@graphql-mesh" / "compose-cli" / "esm" / "bin.js"),
               "-c", str(HIVE_DIR / "mesh.config.ts"), "-o", str(output)]
    with open(log, "ab") as out:
        try:
            done = subprocess.run(command, cwd=HIVE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise HiveError("mesh-compose took more than 5 minutes") from exc
    if done.returncode != 0 or not output.exists():
        raise HiveError(f"mesh-compose failed (exit {done.returncode}); see {log}")
    return output


# -- the gateway process ---------------------------------------------------------------------


class HiveGateway:
    """`hive-gateway supergraph FILE --port P`, started with node directly so that the PID
    held is the gateway's own (for its CPU time and peak RSS)."""

    def __init__(self, supergraph: Path, port: int, log: Path, host: str = "127.0.0.1") -> None:
        self.supergraph, self.port, self.log, self.host = supergraph, port, log, host
        self.url = f"http://{host}:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "Hive Gateway was not started"
        return self.process.pid

    def start(self, timeout: float = 90.0) -> None:
        command = ["node", str(HIVE_DIR / "node_modules" / "@graphql-hive" / "gateway" / "dist" / "bin.js"),
                   "supergraph", str(self.supergraph), "--port", str(self.port), "--host", self.host,
                   "--config-path", str(HIVE_DIR / "gateway.config.ts")]
        env = {**os.environ, "NODE_ENV": "production"}
        with open(self.log, "ab") as out:
            # Not in HIVE_DIR: the gateway would also read mesh.config.ts from its working directory.
            self.process = subprocess.Popen(command, cwd=self.supergraph.parent, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise HiveError(f"Hive Gateway exited with status {self.process.returncode}; see {self.log}")
                with contextlib.suppress(httpx.TransportError):
                    ready = client.post(f"{self.url}/graphql", json={"query": "{ __typename }"})
                    if ready.status_code == 200:
                        return
                time.sleep(0.1)
        raise HiveError(f"Hive Gateway not ready after {timeout:g}s; see {self.log}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
