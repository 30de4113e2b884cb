"""Tests never export to a collector that a developer's shell points at: a test that needs
an OTEL_* variable sets it itself."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in os.environ if key.startswith("OTEL_")]:
        monkeypatch.delenv(key)
