"""Fixtures for the autotune tests: a private database per test, a fake fingerprint, a fake op."""

from __future__ import annotations

import pytest
from autotune_helpers import FAKE_OP, FINGERPRINT, FakeClock, FakeOp

import kpt.autotune as autotune
from kpt.autotune import db, provenance
from kpt.ops import _registry


@pytest.fixture(autouse=True)
def autotune_db(tmp_path, monkeypatch):
    """Every test gets its own database file, no shipped rows, and clean in-memory state."""
    path = tmp_path / "autotune.db"
    monkeypatch.setenv(db.ENV_PATH, str(path))
    monkeypatch.setattr(db, "_MEMORY", {})
    monkeypatch.setattr(db, "SHIPPED_DIR", tmp_path / "shipped")
    autotune.invalidate()
    yield path
    autotune.invalidate()


@pytest.fixture
def fingerprint(monkeypatch):
    """Pretend every device (the CPU included) is one GPU model."""
    monkeypatch.setattr(provenance, "device_fingerprint", lambda device=None: FINGERPRINT)
    return FINGERPRINT


@pytest.fixture
def fake_op():
    """The fake op, registered for the duration of one test."""
    fake = FakeOp(FakeClock())
    yield fake
    _registry._OPS.pop(FAKE_OP, None)
