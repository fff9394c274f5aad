"""A Triton row holds for the Triton that compiled it: another installed version makes it stale
(and lookup drops it), while CUDA rows, like the shipped ones, do not depend on Triton."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from autotune_helpers import FAKE_OP, make_row

from kpt.autotune import db, invalidate, lookup, provenance
from kpt.ops._registry import Problem

PROBLEM = Problem("cuda", 0, torch.float32, (("n", 8),))


def test_triton_rows_record_the_installed_triton():
    triton = pytest.importorskip("triton")
    provenance.clear_caches()
    recorded = provenance.provenance("rmsnorm_qkv_rope", "triton")
    assert recorded["triton_version"] == triton.__version__ != ""
    assert provenance.STALE_FIELDS["triton"] == ("source_hash", "triton_version")


def test_a_triton_row_goes_stale_when_the_installed_triton_changes(fingerprint, fake_op,
                                                                   monkeypatch):
    triton = pytest.importorskip("triton")
    invalidate()
    rows = [make_row("slow", is_default=1, median_us=10.0),
            make_row("triton", '{"block":1}', median_us=4.0)]
    cuda = make_row("cuda", op="rmsnorm_qkv_rope")
    with db.ResultsDB.open() as database:
        database.write(rows)
    assert lookup(FAKE_OP, PROBLEM, "n8") == ("triton", {"block": 1})
    assert provenance.stale_reason(rows[1]) is None

    # The version as provenance finds it: the imported module's, else the distribution's.
    monkeypatch.setattr(triton, "__version__", "0.0.0-other")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.0-other")
    invalidate()  # a new process would see the new version; this one forgets its caches
    reason = provenance.stale_reason(rows[1])
    assert reason is not None and "triton_version" in reason and "0.0.0-other" in reason
    assert lookup(FAKE_OP, PROBLEM, "n8") == ("slow", {})  # the stale Triton row dropped out
    assert provenance.stale_reason(rows[0]) is None  # not a Triton row
    assert provenance.stale_reason(cuda) is None  # CUDA kernels do not depend on Triton


def test_a_triton_row_without_its_version_is_stale():
    row = make_row("triton", op="rmsnorm_qkv_rope", triton_version="")
    assert "triton_version not recorded" in provenance.stale_reason(row)
    row = make_row("triton", op="rmsnorm_qkv_rope", triton_version=None)
    assert "triton_version not recorded" in provenance.stale_reason(row)
