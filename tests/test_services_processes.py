"""`bookvault services`: six processes; one can die while the others serve; SIGINT stops all.

SQLite only: this one is about --data-dir, where each service keeps its SQLite file; `bookvault
services --database-url` on PostgreSQL is tests/test_services_databases.py's."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from mock_services import SERVICES

LISTED = re.compile(r"\s+(?P<name>\w+)\s+(?P<url>\S+)\s+\(pid (?P<pid>\d+)\)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _line(process: asyncio.subprocess.Process, timeout: float = 30) -> str:
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode()
    assert line, "bookvault services closed its output"
    return line


async def test_bookvault_services_survives_one_death_and_stops_on_sigint(data_dir, unused_ports):
    """Six processes on the ports the env names; kill one and five serve on; SIGINT ends them all."""
    urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(SERVICES, unused_ports(len(SERVICES)))}
    env = os.environ | {f"BOOKVAULT_{name.upper()}_URL": url for name, url in urls.items()}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("bookvault")), "services", "--data-dir", str(data_dir), "--scale", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    pids: dict[str, int] = {}
    stopped_cleanly = False
    try:
        while not (line := await _line(process)).startswith("ready"):
            if match := LISTED.match(line):
                assert match["url"] == urls[match["name"]]
                pids[match["name"]] = int(match["pid"])
        assert set(pids) == set(SERVICES)
        assert len(set(pids.values()) | {process.pid}) == 7

        async with httpx.AsyncClient(timeout=2) as client:
            for name, url in urls.items():
                assert (await client.get(f"{url}/healthz")).json() == {"status": "ok", "service": name}

            os.kill(pids["catalog"], signal.SIGKILL)
            assert (await _line(process, 10)).startswith("catalog exited")
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{urls['catalog']}/healthz")
            for name, url in urls.items():
                if name != "catalog":
                    assert (await client.get(f"{url}/_meta")).json()["service"] == name

        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        stopped_cleanly = True
        assert [name for name, pid in pids.items() if _alive(pid)] == []
        async with httpx.AsyncClient(timeout=1) as client:
            for url in urls.values():
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"{url}/healthz")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if not stopped_cleanly:  # the children run in their own sessions: end them by pid
            for pid in pids.values():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
