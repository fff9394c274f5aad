"""``python -m kpt.info`` (and ``kpt-autotune doctor``) say "ok" exactly where a call runs:
they ask dispatch's own reasons about a typical call of every op."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kpt.info import backend_rows, example_problem, main
from kpt.ops import flex_attention
from kpt.ops._common import triton_unavailable
from kpt.ops._registry import NoBackendError, all_ops
from kpt.ops.flex_attention import create_block_mask, mods


def test_every_op_describes_a_typical_call():
    for name, op in all_ops().items():
        problem = example_problem(op, torch.device("cpu"), torch.bfloat16)
        assert problem is not None and problem.device_type == "cpu", name
    assert not [row for row in backend_rows("cpu") if row[2].startswith("not checked")]


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_flex_status_agrees_with_what_a_call_does(interpret, monkeypatch):
    if interpret == "1" and torch.cuda.is_available():
        pytest.skip("Triton kernels were set up for the GPU in this process")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    said = {backend: status for op, backend, status in backend_rows("cpu")
            if op == "flex_attention"}
    q = torch.randn(1, 4, 128, 64, dtype=torch.bfloat16)
    mask = create_block_mask(mods.causal(), 1, None, 128, 128, device="cpu")
    for backend, status in said.items():
        try:
            flex_attention(q, q, q, block_mask=mask, backend=backend)
            ran = "ok"
        except (ValueError, NoBackendError) as err:
            ran = str(err)
        assert (status == "ok") == (ran == "ok"), (backend, status, ran)
    assert said["reference"] == "ok"
    assert (said["triton"] == "ok") == (interpret == "1")


def test_info_prints_one_table(capsys):
    assert main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["op", "backend", "status"] and set(lines[2]) <= {"-", " "}
    assert len(lines) == 3 + len(backend_rows("cpu"))


def test_create_block_mask_defaults_to_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mask = create_block_mask(mods.causal(), 1, None, 64, 64, BLOCK_SIZE=16)
    assert mask.kv_num_blocks.device.type == "cpu"


@pytest.mark.parametrize(("version", "reason"), [
    ("3.2.0", "older than 3.3"),
    ("3.3.0+git1a2b3c", None),
    ("3.10.1", None),  # not "3.1" < "3.3": compared as numbers
    ("3.3.0rc1", None),
    ("not a version", "cannot be read"),
])
def test_triton_version_is_compared_as_a_version(version, reason, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton",
                        types.SimpleNamespace(__version__=version))
    triton_unavailable.cache_clear()
    try:
        found = triton_unavailable()
    finally:
        triton_unavailable.cache_clear()
    assert (found is None) if reason is None else (reason in found), found
