"""scripts/sanitize.py (the compute-sanitizer sweep of the CUDA kernels) on the CPU: with
``--backend reference --device cpu`` every case builds its inputs and runs (the reference
against itself), and every problem the cases make is one the cuda backend's ``supports()``
accepts, so the GPU run never fails for a case that should not exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "sanitize.py"
# Each op's cases, at least: its edge cases are what the sweep is for.
MIN_CASES = {"flash_attention": 20, "flex_attention": 8, "rmsnorm_qkv_rope": 10,
             "paged_attention": 10, "cascade_attention": 3, "merge_attention_states": 3,
             "fp8_gemm": 10, "int4_gemm": 8, "moe_route": 5, "fused_moe": 10}
LINE = re.compile(r"^(\S+)\s+(\S+)\s+(PASS|FAIL)\s+max_abs_err=")


def _run(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_vars}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_case_runs_on_the_cpu_reference():
    proc = _run("--backend", "reference", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [m.groups() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert all(status == "PASS" for _, _, status in results)
    per_op = Counter(op for op, _, _ in results)
    for op, least in MIN_CASES.items():
        assert per_op[op] >= least, (op, per_op[op])
    assert set(per_op) == set(MIN_CASES)
    assert re.search(rf"{len(results)} runs of {len(results)} cases .*: {len(results)} passed, "
                     r"0 failed", proc.stdout)


def test_list_and_filters():
    proc = _run("--list", "--ops", "fp8_gemm,int4_gemm", "--only", "m1-")
    assert proc.returncode == 0, proc.stderr
    keys = proc.stdout.split()
    assert keys and all(re.fullmatch(r"(fp8_gemm|int4_gemm)/m1-\S+", k) for k in keys), keys
    assert {k.split("/")[0] for k in keys} == {"fp8_gemm", "int4_gemm"}
    bad = _run("--list", "--ops", "no_such_op")
    assert bad.returncode == 2 and "unknown ops" in bad.stderr


def test_a_case_that_raises_fails_the_run():
    # Triton on the CPU without its interpreter: the forced backend cannot run the call.
    proc = _run("--backend", "triton", "--device", "cpu", "--only", "flash_attention/len1",
                TRITON_INTERPRET="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "raised ValueError" in proc.stdout
    assert re.search(r"2 runs of 2 cases .*: 0 passed, 2 failed", proc.stdout), proc.stdout
