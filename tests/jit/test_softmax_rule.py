"""The end-of-softmax rule every CUDA/HIP attention kernel applies (``csrc/include/kpt/softmax.h``),
run on the host and checked against the Python references (issue 27).

The header is compiled into a small host program twice: by the host C++ compiler (its plain
``inline`` path) and by nvcc (its ``__host__ __device__`` path, the one the kernels use). The
program applies ``row_end`` and ``MergeLse`` to (max, sum) pairs that this test forms from rows
of log2-unit logits exactly as the kernels form them: max skipping NaN, shift 0 while the max is
-inf, float32 sums, and for a +inf max both sums the kernels reach (NaN from inf - inf; 0 from
sm90's fused multiply-add). Out and lse must then equal the flash_attention reference's on the
same rows, unsplit, split into normalised parts (the paged split-KV combine) and into
unnormalised parts (the paged kernel's merge of its warps).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from kpt.jit import compilers, csrc_dir
from kpt.ops.flash_attention.reference import _probs

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kpt/softmax.h"

static void put(float x) {
  if (x != x) printf(" nan");
  else if (x == INFINITY) printf(" inf");
  else if (x == -INFINITY) printf(" -inf");
  else printf(" %a", (double)x);
}

static float get() {
  char word[64];
  if (scanf("%63s", word) != 1) exit(2);
  return strtof(word, nullptr);
}

// Commands on stdin, one answer line each:
//   row m l                     -> inv lse2
//   merge n mx p1 .. pn         -> w1 .. wn inv lse2   (normalised parts: MergeLse::add)
//   merge_sum n mx m1 l1 ..     -> w1 .. wn inv lse2   (unnormalised: MergeLse::add_sum)
int main() {
  char cmd[16];
  while (scanf("%15s", cmd) == 1) {
    if (strcmp(cmd, "row") == 0) {
      const float m = get(), l = get();
      const kpt::RowEnd end = kpt::row_end(m, l);
      put(end.inv);
      put(end.lse2);
    } else {
      const bool sums = strcmp(cmd, "merge_sum") == 0;
      const int n = (int)get();
      kpt::MergeLse merge(get());
      for (int i = 0; i < n; ++i) {
        const float part = get();
        put(sums ? merge.add_sum(part, get()) : merge.add(part));
      }
      const kpt::RowEnd end = merge.end();
      put(end.inv);
      put(end.lse2);
    }
    printf("\n");
  }
  return 0;
}
"""

F32 = np.float32
INF = math.inf


def _require(tool: str | None, name: str) -> str:
    if tool is None:
        if os.environ.get("KPT_REQUIRE_COMPILERS", "0") not in ("", "0"):
            pytest.fail(f"{name} not found and KPT_REQUIRE_COMPILERS=1")
        pytest.skip(f"{name} not found")
    return tool


@pytest.fixture(scope="module", params=["c++", "nvcc"])
def rule(request, tmp_path_factory):
    """A function sending command lines to the compiled program, returning its answers."""
    if request.param == "c++":
        tool = _require(shutil.which("c++"), "c++")
        flags = ["-x", "c++"]
    else:
        tool = _require(compilers()["nvcc"], "nvcc")
        flags = ["-x", "cu"]
    root = tmp_path_factory.mktemp(f"softmax-{request.param}")
    (root / "rule.cpp").write_text(PROGRAM)
    exe = root / "rule"
    # No -ffast-math or --use_fast_math: the rule is about infs and NaNs.
    subprocess.run([tool, *flags, "-std=c++17", "-O2", f"-I{csrc_dir() / 'include'}",
                    str(root / "rule.cpp"), "-o", str(exe)], check=True, capture_output=True)

    def ask(lines: list[str]) -> list[list[float]]:
        done = subprocess.run([str(exe)], input="\n".join(lines) + "\n", text=True,
                              capture_output=True, check=True, timeout=60)
        return [[float.fromhex(w) if w.startswith(("0x", "-0x")) else float(w)
                 for w in line.split()] for line in done.stdout.splitlines()]

    return ask


def _arg(x: float) -> str:
    return float(x).hex() if math.isfinite(x) else repr(float(x))


def _state(s: np.ndarray, v: np.ndarray) -> tuple[float, list[float], np.ndarray]:
    """A kernel's (max, possible sums, unnormalised o) after the logits s of one row."""
    finite_or_inf = s[~np.isnan(s)]
    m = F32(finite_or_inf.max()) if finite_or_inf.size else F32(-INF)
    shift = F32(0.0) if m == -INF else m
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp2(s - shift).astype(F32)
        o = (e[:, None] * v).sum(0, dtype=F32)
    sums = [float(e.sum(dtype=F32))]
    if m == INF:
        sums.append(0.0)  # sm90: exp2(fma(s, fold, -inf)) is 0 for every finite product
    return float(m), sums, o


def _reference(s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
    st = torch.from_numpy(s.astype(np.float32))[None]
    visible = torch.ones_like(st, dtype=torch.bool)
    p, lse = _probs(st, visible)
    out = (p.double() @ torch.from_numpy(v).double())[0].numpy()
    return out, float(lse[0])


def _check(name: str, out: np.ndarray, lse2: float, ref_out: np.ndarray, ref_lse: float):
    lse = lse2 * math.log(2.0)
    if math.isnan(ref_lse) or math.isinf(ref_lse):
        assert (math.isnan(lse) and math.isnan(ref_lse)) or lse == ref_lse, (name, lse, ref_lse)
    else:
        assert lse == pytest.approx(ref_lse, rel=1e-5, abs=1e-5), (name, lse, ref_lse)
    assert np.array_equal(np.isnan(out), np.isnan(ref_out)), (name, out, ref_out)
    ok = ~np.isnan(ref_out)
    # float32 sums of a dozen terms against float64: a few ulps of float32.
    np.testing.assert_allclose(out[ok], ref_out[ok], rtol=1e-5, atol=1e-6, err_msg=name)


def _rows(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    n = 13
    base = (g.standard_normal(n) * 4).astype(F32)

    def put(at, value):
        row = base.copy()
        row[list(at)] = value
        return row

    return {
        "finite": base,
        "one +inf": put([5], INF),
        "two +inf": put([2, 9], INF),
        "+inf beside NaN": np.where(np.arange(n) == 7, F32(np.nan), put([3], INF)),
        "NaN": put([4], np.nan),
        "leading -inf": put(range(6), -INF),
        "all -inf": np.full(n, -INF, F32),
        "very negative": np.full(n, -160.0, F32) - np.arange(n, dtype=F32),
        "-inf and NaN only": np.where(np.arange(n) % 2 == 0, -INF, np.nan).astype(F32),
        "no key": np.zeros(0, F32),
    }


@pytest.mark.parametrize("seed", range(3))
def test_row_end_matches_the_reference(rule, seed):
    g = np.random.default_rng(100 + seed)
    for name, s in _rows(seed).items():
        v = g.standard_normal((s.size, 5)).astype(F32)
        ref_out, ref_lse = _reference(s, v) if s.size else (np.zeros(5), -INF)
        m, sums, o = _state(s, v)
        answers = rule([f"row {_arg(m)} {_arg(total)}" for total in sums])
        for total, (inv, lse2) in zip(sums, answers, strict=True):
            with np.errstate(invalid="ignore"):
                _check(f"{name}, sum={total}", (o * F32(inv)).astype(np.float64), lse2,
                       ref_out, ref_lse)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_merged_parts_match_the_unsplit_reference(rule, seed, parts):
    g = np.random.default_rng(200 + seed)
    for name, s in _rows(seed).items():
        if not s.size:
            continue
        v = g.standard_normal((s.size, 5)).astype(F32)
        ref_out, ref_lse = _reference(s, v)
        pieces = [(s[c], v[c]) for c in np.array_split(np.arange(s.size), parts)]
        states = [_state(ps, pv) for ps, pv in pieces]
        # Unnormalised parts (the paged kernel's warps): (max, sum, o).
        maxima = [m for m, _, _ in states]
        mx = max((m for m in maxima if not math.isnan(m)), default=-INF)
        args = " ".join(f"{_arg(m)} {_arg(sums[0])}" for m, sums, _ in states)
        *w, inv, lse2 = rule([f"merge_sum {parts} {_arg(mx)} {args}"])[0]
        with np.errstate(invalid="ignore", over="ignore"):
            out = sum(F32(wi) * o for wi, (_, _, o) in zip(w, states)) * F32(inv)
        _check(f"{name}, {parts} unnormalised parts", out.astype(np.float64), lse2, ref_out,
               ref_lse)
        # Normalised parts (the split-KV workspace): each ended by row_end first.
        ends = rule([f"row {_arg(m)} {_arg(sums[0])}" for m, sums, _ in states])
        lses = [lse for _, lse in ends]
        mx = max((x for x in lses if not math.isnan(x)), default=-INF)
        *w, inv, lse2 = rule([f"merge {parts} {_arg(mx)} " + " ".join(map(_arg, lses))])[0]
        with np.errstate(invalid="ignore", over="ignore"):
            normalised = [o * F32(i) for (_, _, o), (i, _) in zip(states, ends)]
            out = sum(F32(wi) * o for wi, o in zip(w, normalised)) * F32(inv)
        _check(f"{name}, {parts} normalised parts", out.astype(np.float64), lse2, ref_out,
               ref_lse)
