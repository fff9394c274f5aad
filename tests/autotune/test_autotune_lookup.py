"""Lookup: one load per device, then memory only; stale rows ignored; never raises."""

from __future__ import annotations

import logging
import sqlite3
import sys

import pytest
import torch
from autotune_helpers import FAKE_OP, make_row

from kpt.autotune import db, invalidate, lookup
from kpt.ops._registry import Problem


def _problem(n: int = 8, index: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    return Problem("cuda", index, dtype, (("n", n),))


def _store(*rows) -> None:
    with db.ResultsDB.open() as database:
        database.write(rows)


@pytest.fixture
def tuned(fingerprint, fake_op):
    """bucket n8: fast wins clearly; bucket n16: only the default was measured."""
    _store(make_row("slow", is_default=1, median_us=10.0),
           make_row("fast", '{"block":1}', median_us=5.0),
           make_row("slow", is_default=1, median_us=10.0, bucket="n16"))
    return fake_op


def test_lookup_returns_the_winner(tuned):
    assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})
    assert lookup(FAKE_OP, _problem(16), "n16") == ("slow", {})
    assert lookup(FAKE_OP, _problem(32), "n32") is None
    assert lookup(FAKE_OP, _problem(8, dtype=torch.bfloat16), "n8") is None
    assert lookup("no_such_op", _problem(8), "n8") is None


def test_lookup_does_no_file_access_after_the_first_load(tuned, autotune_db, monkeypatch):
    assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})

    def forbidden(*args, **kwargs):
        raise AssertionError("file or database access after the first lookup")

    autotune_db.unlink()
    monkeypatch.setattr(sqlite3, "connect", forbidden)
    monkeypatch.setattr(db, "shipped_rows", forbidden)
    monkeypatch.setattr(db.ResultsDB, "open", forbidden)
    for _ in range(3):
        assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})
        assert lookup(FAKE_OP, _problem(16), "n16") == ("slow", {})
        assert lookup(FAKE_OP, _problem(64), "n64") is None


def test_lookup_hands_out_fresh_config_dicts(tuned):
    lookup(FAKE_OP, _problem(8), "n8")[1]["block"] = 99
    assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})


def test_stale_rows_are_ignored(fingerprint, fake_op, monkeypatch):
    _store(make_row("slow", is_default=1, median_us=10.0),
           make_row("fast", '{"block":1}', median_us=1.0, source_hash="0123456789abcdef"),
           make_row("fast", '{"block":2}', median_us=2.0, torch_version="1.0.0"),
           # kpt's own version is recorded, not compared: the source hash says which kernel ran.
           make_row("reference", median_us=4.0, kpt_version="0.0.1"))
    assert lookup(FAKE_OP, _problem(8), "n8") == ("reference", {})
    # After a torch upgrade these (PyTorch-level) backends' rows are all stale, the default's
    # included: static dispatch decides.
    monkeypatch.setattr(torch, "__version__", "99.0")
    invalidate()
    assert lookup(FAKE_OP, _problem(8), "n8") is None


def test_invalidate_reloads(tuned):
    assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})
    with db.ResultsDB.open() as database:
        database.delete(op=FAKE_OP)
    assert lookup(FAKE_OP, _problem(8), "n8") == ("fast", {"block": 1})  # still in memory
    invalidate()
    assert lookup(FAKE_OP, _problem(8), "n8") is None


def test_missing_sqlite_utils_warns_once_and_never_raises(tuned, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sqlite_utils", None)  # import fails
    with caplog.at_level(logging.WARNING, logger="kpt"):
        assert lookup(FAKE_OP, _problem(8, index=0), "n8") is None
        assert lookup(FAKE_OP, _problem(8, index=1), "n8") is None
    warnings = [r for r in caplog.records if "sqlite-utils" in r.message]
    assert len(warnings) == 1


def test_unreadable_database_warns_and_never_raises(tuned, monkeypatch, caplog):
    def broken(self, **kwargs):
        raise sqlite3.DatabaseError("disk I/O error")

    monkeypatch.setattr(db.ResultsDB, "rows", broken)
    with caplog.at_level(logging.WARNING, logger="kpt"):
        assert lookup(FAKE_OP, _problem(8), "n8") is None
    assert any("not used" in r.message for r in caplog.records)


def test_no_fingerprint_means_no_choice(tuned, monkeypatch):
    from kpt.autotune import provenance

    monkeypatch.setattr(provenance, "device_fingerprint", lambda device=None: None)
    assert lookup(FAKE_OP, _problem(8), "n8") is None


def test_dispatch_uses_the_tuned_choice(tuned, monkeypatch):
    # The registry skips the database on CPU; drive its lookup hook directly on a cuda problem.
    from kpt.ops._registry import _tuned_choice

    monkeypatch.delenv("KPT_AUTOTUNE", raising=False)
    assert _tuned_choice(tuned.op, _problem(8)) == ("fast", {"block": 1})
