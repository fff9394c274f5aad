"""The tuner on CPU with a fake clock: checks, invalid configs, storage, lookup of the result."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from autotune_helpers import FAKE_OP

from kpt.autotune import db, lookup
from kpt.autotune.tuner import tune
from kpt.ops._registry import Problem


def test_tune_keeps_going_past_broken_configs_and_stores_the_winner(fingerprint, fake_op):
    results = tune(fake_op.op, [{"n": 8}, {"n": 1000}], torch.float32, "cpu", warmup_ms=0.02,
                   rep_ms=0.1, progress=False, timer=fake_op.timer)
    assert [r.bucket for r in results] == ["n8", "n1000"]
    first = results[0]
    # The fake clock counts in seconds, so times come back within rounding of the set costs.
    assert (first.backend, first.config) == ("fast", {"block": 1})
    assert (first.default_backend, first.default_config) == ("slow", {})
    assert (first.time_us, first.default_us) == pytest.approx((5.0, 10.0))
    assert first.speedup == pytest.approx(2.0)
    errors = {config: error for _, config, error in first.invalid}
    assert set(errors) == {'{"block":2}', '{"block":4}'}
    assert "differs from the reference" in errors['{"block":2}']  # wrong values: rejected
    assert "ptxas error" in errors['{"block":4}']  # raised: recorded, tune went on

    with db.ResultsDB.open() as database:
        rows = database.rows(op=FAKE_OP)
    assert len(rows) == 10  # 2 shapes x (reference, slow, 3 fast configs)
    by_config = {(r["bucket"], r["backend"], r["config"]): r for r in rows}
    ok = by_config[("n8", "fast", '{"block":1}')]
    assert (ok["valid"], ok["fingerprint"]) == (1, fingerprint)
    assert (ok["median_us"], ok["spread"]) == pytest.approx((5.0, 0.0), abs=1e-9)
    assert ok["samples"] >= 5 and ok["source_hash"] and ok["kpt_version"]
    assert json.loads(ok["shape"]) == {"n": 8}
    assert by_config[("n8", "slow", "{}")]["is_default"] == 1
    assert by_config[("n8", "fast", '{"block":4}')]["valid"] == 0
    assert by_config[("n8", "reference", "{}")]["median_us"] == pytest.approx(50.0)

    problem = Problem("cpu", 0, torch.float32, (("n", 8),))
    assert lookup(FAKE_OP, problem, "n8") == ("fast", {"block": 1})


def test_retuning_a_bucket_replaces_its_rows(fingerprint, fake_op):
    tune(fake_op.op, [{"n": 8}], torch.float32, "cpu", progress=False, timer=fake_op.timer,
         warmup_ms=0.02, rep_ms=0.1)
    fake_op.op.backends = fake_op.op.backends[1:]  # "fast" is gone in the new version
    (result,) = tune(fake_op.op, [{"n": 8}], torch.float32, "cpu", progress=False,
                     timer=fake_op.timer, warmup_ms=0.02, rep_ms=0.1)
    assert (result.backend, result.speedup) == ("slow", pytest.approx(1.0))
    with db.ResultsDB.open() as database:
        assert {r["backend"] for r in database.rows(op=FAKE_OP)} == {"slow", "reference"}


def test_a_backend_whose_configs_fail_is_skipped(fingerprint, fake_op):
    def no_configs(problem):
        raise ModuleNotFoundError("No module named 'kpt.ops.fake_scale._triton'")

    op = fake_op.op
    op.backends = (dataclasses.replace(op.backends[0], configs=no_configs),) + op.backends[1:]
    (result,) = tune(op, [{"n": 8}], torch.float32, "cpu", progress=False,
                     timer=fake_op.timer, warmup_ms=0.02, rep_ms=0.1)
    assert result.backend == "slow"
    assert [(name, "_triton" in why) for name, why in result.skipped] == [("fast", True)]


def test_tune_refuses_devices_without_fingerprint(fake_op):
    with pytest.raises(ValueError, match="only CUDA/ROCm"):
        tune(fake_op.op, [{"n": 8}], torch.float32, "cpu", progress=False)


_REAL_OP_SCRIPT = textwrap.dedent("""
    import importlib
    import json

    import torch
    from kpt.autotune import provenance
    from kpt.autotune.tuner import tune
    from kpt.autotune.timing import Timing

    provenance.device_fingerprint = lambda device=None: "Test GPU"
    mod = importlib.import_module("kpt.ops.rmsnorm_qkv_rope")
    op = mod.SPEC

    def once(fn, warmup_ms, rep_ms):  # the interpreter is slow: run once, report a fixed time
        fn()
        return Timing(7.0, 0.0, 1)

    config = {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64,
              "head_dim": 16, "model_type": "qwen3"}
    shapes = op.tuning.shapes(config, [3])
    (result,) = tune(op, shapes, torch.float32, "cpu", progress=False, timer=once)
    print(json.dumps({"backend": result.backend, "skipped": [n for n, _ in result.skipped],
                      "rows": [[r["backend"], r["valid"], r["error"]] for r in result.rows]}))
""")


def test_real_op_with_reference_and_interpreted_triton(tmp_path):
    # A subprocess, because TRITON_INTERPRET must be set before Triton kernels are defined.
    env = {**os.environ, "TRITON_INTERPRET": "1", db.ENV_PATH: str(tmp_path / "real.db")}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _REAL_OP_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # CPU problem: no CUDA there, xla needs an XLA device and xpu IPEX (not in this venv).
    assert out["skipped"] == ["cuda", "hip", "xla", "xpu"]
    backends = [backend for backend, _, _ in out["rows"]]
    assert backends.count("reference") == 1 and backends.count("triton") >= 1
    for backend, valid, error in out["rows"]:
        assert valid or error, f"{backend}: invalid without an error text"
    # The interpreted kernels must compute the right values: a tune where every Triton config
    # came out invalid is a broken backend (or tuner), not a pass.
    triton_errors = [error for backend, valid, error in out["rows"]
                     if backend == "triton" and not valid]
    assert backends.count("triton") > len(triton_errors), (
        "every Triton row is invalid:\n" + "\n".join(triton_errors))
    # Equal fake times: the reference, the static default on CPU, keeps its place.
    assert out["backend"] == "reference"
