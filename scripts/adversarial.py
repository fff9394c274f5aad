"""Adversarial scenarios for kpt on a CPU machine (project issue 27).

Re-runs, the way a hostile or careless user would, a few hundred small scenarios against the
public surface of kpt: ``flash_attention`` and ``flex_attention`` (reference backend and the
Triton interpreter), ``rmsnorm_qkv_rope``, the ``kpt.nn`` layer, the HuggingFace patch
(``kpt.integrations.hf``), the autotune database and its ``kpt-autotune`` command line, the
JIT build cache (``kpt.jit``, with a tiny toy extension; no real op is compiled), and from the
sibling files ``adversarial_gemm.py`` (``fp8_gemm``, ``int4_gemm``), ``adversarial_quant.py``
(``kpt.quant``),
``adversarial_moe.py`` (``moe_route``, ``fused_moe``, ``moe.align``) and
``adversarial_paged.py`` (``paged_attention``, ``append_paged_kv``, ``plan``,
``cascade_attention``). Each scenario gets one of five outcomes:

(a) clear error       ValueError / TypeError naming the op (or the constraint), raised before
                      any backend launched; for the CLI one line on stderr, a non-zero exit
                      and no traceback
(b) handled correctly result equal to an independent float64 computation, to HF's own model,
                      or the documented behaviour
(c) wrong answer      a silent difference from the reference, rows reported written but
    or lost data      missing, an invalid argument silently turned into something else
(d) obscure error     an exception that names neither the op nor the constraint (a bare
                      KeyError / IndexError / RuntimeError from deep inside), an error raised
                      only after a backend launched, a CLI "unexpected" exit (status 4)
(e) crash, hang       the process died (signal), timed out, or the CLI printed a traceback
    or traceback

Scenarios run in worker subprocesses (this file, ``--worker``), many per process; a scenario
that kills or hangs its worker is charged (e) and the worker is restarted for the rest, so one
crash never hides the other results. Every worker gets a private ``KPT_CACHE_DIR`` and
``KPT_AUTOTUNE_DB`` under a temporary directory (nothing touches ``~/.cache/kpt``), one torch
thread, and ``TRITON_INTERPRET=1``. Read-only locations are made with ``chattr +i`` when running
as root (``chmod`` otherwise); a scenario that cannot set its situation up is reported as not
covered, never counted.

The report is markdown: one table (rows: areas; columns: the five outcomes and the total), then
every scenario in (c), (d) and (e) with what was observed, then valid calls that were rejected
with a clear error (counted in (a)) and what was not covered.

Where a scenario in (c), (d) or (e) has a known minimal reproducer (``REPROS`` near the end of
this file), the report prints it under the scenario.

Usage (from the repository root; about 960 scenarios in about two minutes on 2 CPU cores)::

    TRITON_INTERPRET=1 .venv/bin/python scripts/adversarial.py [--area NAME] [--out FILE.md]
        [--jobs N] [--only TEXT] [--list] [--full]

``--area`` takes an area name or its short name (flash, flex, rope, nn, hf, autotune, jit, and
from the sibling files fp8, int4, quant, moe, paged, cascade) and may be repeated; ``--only``
keeps scenarios whose key contains TEXT; ``--list`` prints the scenarios without running them;
``--full`` appends every scenario's outcome to the report.
Progress goes to stderr, the report to stdout (and ``--out``). The exit status is 0 whatever
the outcomes (this is a report, not a test), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# ---- outcomes and scenarios ------------------------------------------------------------------

CLASSES = {
    "a": "clear error",
    "b": "handled correctly",
    "c": "wrong answer or lost data",
    "d": "obscure error",
    "e": "crash, hang or traceback",
}
SKIPPED = "s"  # the situation could not be set up here: reported as not covered
HARNESS = "x"  # this script failed (a bug here, not in kpt): reported, never counted

AREAS = {
    "flash": "flash_attention",
    "flex": "flex_attention",
    "rope": "rmsnorm_qkv_rope",
    "nn": "nn",
    "hf": "HF patch",
    "autotune": "autotune DB/CLI",
    "jit": "JIT cache",
}
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What one scenario did: its class (``a``-``e``, or ``s`` / ``x``), a one-line detail and,
    for a valid call answered with a clear error, a note saying so."""

    cls: str
    detail: str
    rejected_valid: bool = False


@dataclass(frozen=True)
class Scenario:
    """One adversarial scenario. ``run(tmp)`` gets a private empty directory and returns the
    outcome; scenarios of one ``group`` share a worker process (an empty group: its own)."""

    key: str
    area: str
    description: str
    run: Callable[[Path], Outcome]
    group: str
    timeout: float = DEFAULT_TIMEOUT_S
    repro: str = ""


SCENARIOS: dict[str, Scenario] = {}


def add(area: str, name: str, description: str, run: Callable[[Path], Outcome], *,
        group: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, repro: str = "") -> None:
    """Register a scenario of ``area`` (a key of :data:`AREAS`); ``group`` defaults to the
    area, so an area's scenarios share one worker unless told otherwise."""
    key = f"{area}/{name}"
    if key in SCENARIOS:
        raise ValueError(f"duplicate scenario {key}")
    SCENARIOS[key] = Scenario(key, area, description, run, area if group is None else group,
                              timeout, repro)


def scenario(area: str, name: str, description: str, **options: Any
             ) -> Callable[[Callable[[Path], Outcome]], Callable[[Path], Outcome]]:
    """Decorator form of :func:`add`."""

    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        add(area, name, description, fn, **options)
        return fn

    return register


def one_line(text: object, limit: int = 220) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_error(err: BaseException) -> str:
    return one_line(f"{type(err).__name__}: {err}")


# ---- classifying Python calls ----------------------------------------------------------------

# Exception types that count as a clear error when their message names the op or constraint.
CLEAR_TYPES: tuple[type[BaseException], ...] = (ValueError, TypeError)
# Raised by dispatch with every backend's reasons: a clear error too (checked by name, so that
# classifying needs no import of kpt).
CLEAR_TYPE_NAMES = frozenset({"NoBackendError"})

_LAUNCHES = [0]


def launches() -> int:
    """How many times a backend ran in this process so far: on first use, every registered
    backend's ``run`` is wrapped to count (dispatch keeps the same Backend objects)."""
    from kpt.ops._registry import all_ops

    for op in all_ops().values():
        for backend in op.backends:
            if getattr(backend.run, "_adversarial_counted", False):
                continue
            real = backend.run

            def counted(call: Any, config: Any, _real: Any = real) -> Any:
                _LAUNCHES[0] += 1
                return _real(call, config)

            counted._adversarial_counted = True
            object.__setattr__(backend, "run", counted)  # Backend is a frozen dataclass
    return _LAUNCHES[0]


def classify_error(err: BaseException, names: Sequence[str], *, launched: bool = False,
                   types: tuple[type[BaseException], ...] = CLEAR_TYPES) -> Outcome:
    """(a) for an error of a clear type naming one of ``names`` before any launch, else (d)."""
    text = describe_error(err)
    clear_type = isinstance(err, types) or type(err).__name__ in CLEAR_TYPE_NAMES
    named = any(name in str(err) for name in names)
    if clear_type and named and not launched:
        return Outcome("a", text)
    if clear_type and named:
        return Outcome("d", f"{text} (raised only after a backend launched)")
    return Outcome("d", text)


def expect_error(call: Callable[[], Any], names: Sequence[str], *,
                 types: tuple[type[BaseException], ...] = CLEAR_TYPES,
                 track_launches: bool = True) -> Outcome:
    """For a call that must be refused: (a)/(d) by the error it raises, (c) if it returns."""
    before = launches() if track_launches else 0
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - what is classified
        launched = track_launches and launches() > before
        return classify_error(err, names, launched=launched, types=types)
    return Outcome("c", f"accepted, returned {summarize(result)}")


def summarize(value: Any) -> str:
    """A short description of a returned value (tensors by shape and dtype)."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(summarize(v) for v in value[:4])
        return f"({inner}{', ...' if len(value) > 4 else ''})"
    return one_line(repr(value), 120)


def mismatch(got: Any, want: Any, tol: float, name: str = "output") -> str | None:
    """None when ``got`` matches ``want`` (tensors or sequences of them), else why not.

    Compared in float64: equal shapes; the same non-finite entries (NaN where NaN, equal
    infinities); finite entries within ``tol * max(1, max|want|)``."""
    import torch

    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{name}: got {summarize(got)}, expected {len(want)} outputs"
        for i, (g, w) in enumerate(zip(got, want)):
            reason = mismatch(g, w, tol, f"{name}[{i}]")
            if reason:
                return reason
        return None
    if not isinstance(got, torch.Tensor):
        return f"{name}: got {summarize(got)}, expected a tensor"
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if g.numel() == 0:
        return None
    g_bad, w_bad = ~torch.isfinite(g), ~torch.isfinite(w)
    if not torch.equal(g_bad, w_bad):
        n = int((g_bad != w_bad).sum())
        return f"{name}: {n} entries non-finite in one and finite in the other"
    if w_bad.any():
        same = (g[w_bad] == w[w_bad]) | (torch.isnan(g[w_bad]) & torch.isnan(w[w_bad]))
        if not bool(same.all()):
            return f"{name}: non-finite entries differ (inf vs -inf or nan)"
    finite = ~w_bad
    if not finite.any():
        return None
    err = (g[finite] - w[finite]).abs().max().item()
    peak = w[finite].abs().max().item()
    if err > tol * max(1.0, peak):
        return f"{name}: max abs error {err:.3g} > {tol:.1g} * max(1, {peak:.3g})"
    return None


def expect_close(call: Callable[[], Any], want: Any, tol: float, names: Sequence[str]) -> Outcome:
    """For a valid call: (b) when its result matches ``want``, (c) when it does not, and by
    its error when it raises (a clear one is flagged as a valid call rejected)."""
    try:
        got = call()
    except Exception as err:  # noqa: BLE001 - what is classified
        outcome = classify_error(err, names)
        if outcome.cls == "a":
            return Outcome("a", outcome.detail, rejected_valid=True)
        return outcome
    reason = mismatch(got, want, tol)
    return Outcome("b", "matches") if reason is None else Outcome("c", reason)


def expect_ok(call: Callable[[], str | None], names: Sequence[str]) -> Outcome:
    """For a valid call checked by ``call`` itself: it returns None when all is as documented,
    else a one-line reason (c); its errors are classified like :func:`expect_close`'s."""
    try:
        reason = call()
    except Exception as err:  # noqa: BLE001 - what is classified
        outcome = classify_error(err, names)
        if outcome.cls == "a":
            return Outcome("a", outcome.detail, rejected_valid=True)
        return outcome
    return Outcome("b", "as documented") if reason is None else Outcome("c", one_line(reason))


# ---- situations: read-only places, child processes -------------------------------------------

_IMMUTABLE: list[Path] = []


class CannotSetUp(Exception):
    """The situation a scenario needs cannot be created here (it is then not covered)."""


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` (a file or folder) unwritable for this process, root included (``chattr +i``
    as root, ``chmod`` otherwise), restored afterwards."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None:
            raise CannotSetUp("running as root without chattr: nothing is read-only for root")
        done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise CannotSetUp(f"chattr +i failed here: {one_line(done.stderr)}")
        _IMMUTABLE.append(path)
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(path)], capture_output=True)
            _IMMUTABLE.remove(path)
        return
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        path.chmod(mode)


def release_read_only(root: Path) -> None:
    """Undo every ``chattr +i`` under ``root`` (after a worker was killed mid-scenario)."""
    chattr = shutil.which("chattr")
    if os.geteuid() == 0 and chattr is not None and root.exists():
        subprocess.run([chattr, "-R", "-i", str(root)], capture_output=True)


def child_env(**extra: str | None) -> dict[str, str]:
    """This process's environment with ``extra`` set (None removes a variable)."""
    env = dict(os.environ)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a timeout is reported as returncode ``-9``."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(err.cmd, -9, out, f"timed out after {timeout} s")


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


# =============================================================================================
# Reference math (float64, written independently of kpt's reference backends)
# =============================================================================================


def naive_attention(q: Any, k: Any, v: Any, *, causal: bool = False,
                    window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    scale: float | None = None) -> tuple[Any, Any]:
    """Exact attention on (B, S, H, D) tensors with bottom-right masks: (out, lse) in float64,
    lse (B, H, Sq); a query that sees no key gets out 0 and lse -inf."""
    import torch

    q, k, v = (t.detach().double() for t in (q, k, v))
    batch, sq, heads, dim = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads if kv_heads else 1
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = dim**-0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    right = 0 if causal else right
    big = 1 << 40  # windows wider than any sequence here mean "unbounded"
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if 0 <= right < big:
        visible &= j <= i + (sk - sq) + right
    if 0 <= left < big:
        visible &= j >= i + (sk - sq) - left
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(visible, torch.exp(s - lse[..., None]), torch.zeros((), dtype=s.dtype))
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out, lse


def naive_varlen(q: Any, k: Any, v: Any, cu_q: list[int], cu_k: list[int],
                 **options: Any) -> tuple[Any, Any]:
    """``naive_attention`` per packed sequence of (T, H, D) tensors: out (Tq, H, D), lse (H, Tq);
    tokens outside every sequence get out 0 and lse -inf."""
    import torch

    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if cu_q[b + 1] == cu_q[b]:
            continue
        o, s = naive_attention(q[None, sq], k[None, sk], v[None, sk], **options)
        out[sq], lse[:, sq] = o[0], s[0]
    return out, lse


def naive_flex(q: Any, k: Any, v: Any, score_mod: Callable | None = None,
               mask_mod: Callable | None = None, scale: float | None = None) -> tuple[Any, Any]:
    """torch-flex semantics on (B, H, S, D) tensors in float64: mods evaluated on broadcast
    index tensors; fully masked rows give out 0 and lse -inf."""
    import torch

    q, k, v = (t.detach().double() for t in (q, k, v))
    batch, heads, sq, _ = q.shape
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, 1).expand(batch, -1, -1, -1)
    v = v.repeat_interleave(group, 1).expand(batch, -1, -1, -1)
    sk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    qi = torch.arange(sq).view(1, 1, -1, 1)
    ki = torch.arange(sk).view(1, 1, 1, -1)
    if score_mod is not None:
        s = torch.as_tensor(score_mod(s, b, h, qi, ki), dtype=torch.float64).expand(s.shape)
    keep = torch.ones(s.shape, dtype=torch.bool)
    if mask_mod is not None:
        keep = torch.as_tensor(mask_mod(b, h, qi, ki)).bool().expand(s.shape)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep, torch.exp(s - lse[..., None]), torch.zeros((), dtype=s.dtype))
    return p @ v, lse


def naive_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> Any:
    """RoPE inverse frequencies in float64, with HF's linear and llama3 scaling."""
    import torch

    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], \
            scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv = torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, out)
    return inv


def naive_rmsnorm_qkv_rope(x: Any, norm_weight: Any, qkv_weight: Any, positions: Any, *,
                           num_q_heads: int, num_kv_heads: int, head_dim: int,
                           eps: float = 1e-6, qkv_bias: Any = None, q_norm_weight: Any = None,
                           k_norm_weight: Any = None, rope_theta: float = 10000.0,
                           rope_scaling: dict | None = None, rotary_dim: int | None = None,
                           rope_style: str = "neox", residual: Any = None) -> tuple:
    """The op's documented math in float64: (q, k, v) or (q, k, v, new residual)."""
    import torch

    def wide(t: Any) -> Any:  # float64, keeping the autograd graph of float64 leaves
        return None if t is None else t.double()

    x, residual = wide(x), wide(residual)
    h = x if residual is None else x + residual

    def rms(t: Any, weight: Any) -> Any:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * wide(weight)

    qkv = rms(h, norm_weight) @ wide(qkv_weight).T
    if qkv_bias is not None:
        qkv = qkv + wide(qkv_bias)
    lead = x.shape[:-1]
    nq, nkv = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :nq].reshape(*lead, num_q_heads, head_dim)
    k = qkv[..., nq:nq + nkv].reshape(*lead, num_kv_heads, head_dim)
    v = qkv[..., nq + nkv:].reshape(*lead, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms(q, q_norm_weight), rms(k, k_norm_weight)
    rd = head_dim if rotary_dim is None else rotary_dim
    freqs = positions.double().expand(lead)[..., None] * naive_inv_freq(rd, rope_theta,
                                                                         rope_scaling)
    cos, sin = freqs.cos()[..., None, :], freqs.sin()[..., None, :]

    def rope(t: Any) -> Any:
        rot, rest = t[..., :rd], t[..., rd:]
        if rope_style == "neox":
            a, b = rot[..., : rd // 2], rot[..., rd // 2:]
            rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
        return torch.cat([rotated, rest], -1)

    out = (rope(q), rope(k), v)
    return out if residual is None else (*out, h)


# Tolerances, relative to max(1, max|expected|): a float32 result against float64 math, and
# half-precision kernels against float64 math of the same (rounded) inputs.
# (float64 inputs still get a float32 lse: documented for flex_attention.)
TOL = {"float32": 1e-4, "float64": 1e-6, "bfloat16": 3e-2, "float16": 5e-3}


def dtype_of(name: str) -> Any:
    import torch

    return getattr(torch, name)


def randn(*shape: int, dtype: str = "float32", seed: int = 0, scale: float = 1.0) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype_of(dtype))


# =============================================================================================
# flash_attention
# =============================================================================================

FA = "flash_attention"


def flash(*args: Any, **kwargs: Any) -> Any:
    from kpt.ops import flash_attention

    return flash_attention(*args, **kwargs)


def fa_inputs(B: int = 1, Sq: int = 17, Sk: int | None = None, H: int = 2, Hkv: int | None = None,
              D: int = 16, dtype: str = "bfloat16", seed: int = 0) -> tuple[Any, Any, Any]:
    sk = Sq if Sk is None else Sk
    hkv = H if Hkv is None else Hkv
    return (randn(B, Sq, H, D, dtype=dtype, seed=seed),
            randn(B, sk, hkv, D, dtype=dtype, seed=seed + 1),
            randn(B, sk, hkv, D, dtype=dtype, seed=seed + 2))


def fa_case(shape: dict, backend: str, dtype: str, **options: Any) -> Callable[[Path], Outcome]:
    """A valid call on random inputs: out and lse against float64 attention of the same
    (rounded) inputs."""

    def run(_tmp: Path) -> Outcome:
        q, k, v = fa_inputs(**shape, dtype=dtype)
        want = naive_attention(q, k, v, **{n: options[n] for n in
                                           ("causal", "window", "softcap", "scale")
                                           if n in options})
        return expect_close(lambda: flash(q, k, v, backend=backend, return_lse=True, **options),
                            want, TOL[dtype], (FA,))

    return run


def _fa_valid_cases() -> None:
    small = dict(B=2, Sq=17, H=2, D=16)
    cases: dict[str, tuple[dict, str, str, dict]] = {
        "basic fp32 reference": (small, "reference", "float32", {}),
        "basic bf16 triton": (small, "triton", "bfloat16", {}),
        "basic fp16 triton": (small, "triton", "float16", {}),
        "basic bf16 reference": (small, "reference", "bfloat16", {}),
        "causal, more queries than keys (rows without keys), reference":
            (dict(Sq=33, Sk=17), "reference", "float32", dict(causal=True)),
        "causal, more queries than keys (rows without keys), triton":
            (dict(Sq=33, Sk=17), "triton", "bfloat16", dict(causal=True)),
        "causal, fewer queries than keys, triton":
            (dict(Sq=5, Sk=40), "triton", "bfloat16", dict(causal=True)),
        "GQA 6 query heads over 3 kv heads, triton":
            (dict(H=6, Hkv=3), "triton", "bfloat16", {}),
        "MQA 4 query heads over 1 kv head, triton": (dict(H=4, Hkv=1), "triton", "bfloat16", {}),
        "window (7, 3), triton": (dict(Sq=40), "triton", "bfloat16", dict(window=(7, 3))),
        "window (0, 0): each query sees only its diagonal key, triton":
            (dict(Sq=20), "triton", "bfloat16", dict(window=(0, 0))),
        "window (2**31, 0) (wider than int32), triton":
            (dict(Sq=33), "triton", "bfloat16", dict(window=(2**31, 0))),
        "window (2**62, 2**62), reference":
            (dict(Sq=9), "reference", "float32", dict(window=(2**62, 2**62))),
        "window as a list [3, 0], triton":
            (dict(Sq=17), "triton", "bfloat16", dict(window=[3, 0])),
        "softcap 1e-30 (s / softcap overflows), triton":
            (dict(Sq=9), "triton", "bfloat16", dict(softcap=1e-30)),
        "softcap 1e30 (no capping), triton": (dict(Sq=9), "triton", "bfloat16",
                                              dict(softcap=1e30)),
        "softcap 1e6, triton": (dict(Sq=9), "triton", "bfloat16", dict(softcap=1e6)),
        "softcap 1e30, reference": (dict(Sq=9), "reference", "float32", dict(softcap=1e30)),
        "softcap 2 with causal and GQA, triton":
            (dict(Sq=17, H=4, Hkv=2), "triton", "bfloat16", dict(softcap=2.0, causal=True)),
        "scale 0 (uniform attention), triton": (dict(Sq=9), "triton", "bfloat16",
                                                dict(scale=0.0)),
        "negative scale, triton": (dict(Sq=9), "triton", "bfloat16", dict(scale=-0.7)),
        "integer scale 1 (an int, not a float), reference":
            (dict(Sq=9), "reference", "float32", dict(scale=1)),
        "head_dim 1, triton": (dict(D=1), "triton", "bfloat16", {}),
        "head_dim 24 (not a power of two), triton": (dict(D=24), "triton", "bfloat16", {}),
        "head_dim 256 (the kernels' limit), triton": (dict(Sq=9, D=256), "triton", "bfloat16",
                                                      {}),
        "head_dim 300 on the reference (no limit there)":
            (dict(Sq=9, D=300), "reference", "float32", {}),
        "one query over 300 keys (decode-like), triton":
            (dict(Sq=1, Sk=300), "triton", "bfloat16", dict(causal=True)),
        "no queries (Sq = 0), triton": (dict(Sq=0, Sk=9), "triton", "bfloat16", {}),
        "no keys (Sk = 0: out 0, lse -inf), triton": (dict(Sq=9, Sk=0), "triton", "bfloat16",
                                                      {}),
        "no keys (Sk = 0), reference": (dict(Sq=9, Sk=0), "reference", "float32", {}),
        "empty batch (B = 0), triton": (dict(B=0), "triton", "bfloat16", {}),
        "64 sequences of one token, triton": (dict(B=64, Sq=1), "triton", "bfloat16", {}),
    }
    for name, (shape, backend, dtype, options) in cases.items():
        add("flash", name, f"flash_attention {name}: out and lse against float64 math",
            fa_case(shape, backend, dtype, **options))


_fa_valid_cases()


@scenario("flash", "transposed (B, H, S, D) views, triton",
          "flash_attention on q/k/v that are .transpose(1, 2) views of (B, H, S, D) tensors")
def _fa_transposed(_tmp: Path) -> Outcome:
    q, k, v = (randn(1, 2, 17, 16, dtype="bfloat16", seed=s).transpose(1, 2) for s in range(3))
    return expect_close(lambda: flash(q, k, v, causal=True, backend="triton"),
                        naive_attention(q, k, v, causal=True)[0], TOL["bfloat16"], (FA,))


@scenario("flash", "last dim strided (stride 2), triton",
          "flash_attention on q[..., ::2] views (last dim not contiguous)")
def _fa_strided(_tmp: Path) -> Outcome:
    q, k, v = (randn(1, 17, 2, 32, dtype="bfloat16", seed=s)[..., ::2] for s in range(3))
    return expect_close(lambda: flash(q, k, v, backend="triton"), naive_attention(q, k, v)[0],
                        TOL["bfloat16"], (FA,))


@scenario("flash", "k/v expanded over the batch (stride 0), triton",
          "flash_attention with k, v = k1.expand(3, ...) (batch stride 0)")
def _fa_expanded(_tmp: Path) -> Outcome:
    q = randn(3, 9, 2, 16, dtype="bfloat16")
    k, v = (randn(1, 9, 2, 16, dtype="bfloat16", seed=s).expand(3, -1, -1, -1) for s in (1, 2))
    return expect_close(lambda: flash(q, k, v, backend="triton"), naive_attention(q, k, v)[0],
                        TOL["bfloat16"], (FA,))


def _fa_grads(backend: str, dtype: str, varlen: bool = False) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        if varlen:
            q, k, v = (randn(14, 2, 16, dtype=dtype, seed=s) for s in range(3))
            bounds = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
            kw = dict(cu_seqlens_q=bounds, cu_seqlens_k=bounds, causal=True)
        else:
            q, k, v = fa_inputs(Sq=17, H=4, Hkv=2, dtype=dtype)
            kw = dict(causal=True, softcap=3.0)
        dout = randn(*q.shape, seed=9)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        truth = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = _naive_grads(truth, dout, varlen)

        def call() -> Any:
            got = flash(*leaves, backend=backend, **kw)
            return torch.autograd.grad((got.float() * dout).sum(), leaves)

        return expect_close(call, want, 2 * TOL[dtype], (FA,))

    return run


def _naive_grads(truth: list, dout: Any, varlen: bool) -> tuple:
    """Gradients of sum(out * dout) of float64 attention (materialised scores, autograd)."""
    import torch

    q, k, v = truth

    def attend(q: Any, k: Any, v: Any, softcap: float) -> Any:
        group = q.shape[-2] // k.shape[-2]
        kk, vv = k.repeat_interleave(group, -2), v.repeat_interleave(group, -2)
        s = torch.einsum("ihd,jhd->hij", q, kk) * q.shape[-1] ** -0.5
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        n, m = q.shape[0], k.shape[0]
        keep = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        return torch.einsum("hij,jhd->ihd", p, vv)

    if varlen:
        parts = [attend(q[a:b], k[a:b], v[a:b], 0.0) for a, b in ((0, 5), (5, 14))]
        out = torch.cat(parts)
    else:
        out = attend(q[0], k[0], v[0], 3.0)[None]
    return torch.autograd.grad((out * dout.double()).sum(), (q, k, v))


add("flash", "gradients bf16 triton", "flash_attention backward (causal, soft-cap, GQA) on "
    "triton against float64 autograd", _fa_grads("triton", "bfloat16"))
add("flash", "gradients fp32 reference", "flash_attention backward on the reference against "
    "float64 autograd", _fa_grads("reference", "float32"))
add("flash", "varlen gradients bf16 triton", "varlen flash_attention backward (an empty "
    "sequence inside) on triton against float64 autograd", _fa_grads("triton", "bfloat16", True))


@scenario("flash", "deterministic gradients are bitwise equal, triton",
          "two backward passes with deterministic=True give identical gradients")
def _fa_deterministic(_tmp: Path) -> Outcome:
    import torch

    q, k, v = (t.requires_grad_() for t in fa_inputs(Sq=33, H=4, Hkv=2))

    def grads() -> tuple:
        out = flash(q, k, v, causal=True, deterministic=True, backend="triton")
        return torch.autograd.grad(out.float().square().sum(), (q, k, v))

    def check() -> str | None:
        first, second = grads(), grads()
        same = all(torch.equal(a, b) for a, b in zip(first, second))
        return None if same else "gradients differ between two deterministic runs"

    return expect_ok(check, (FA,))


@scenario("flash", "double backward is refused",
          "torch.autograd.grad of flash_attention's gradient (create_graph=True): documented "
          "error 'second derivatives (double backward) are not implemented'")
def _fa_double_backward(_tmp: Path) -> Outcome:
    import torch

    q, k, v = (t.requires_grad_() for t in fa_inputs(dtype="float32"))
    out = flash(q, k, v)
    (gq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    return expect_error(lambda: torch.autograd.grad(gq.sum(), (q,)), (FA,),
                        types=(ValueError, TypeError, RuntimeError), track_launches=False)


@scenario("flash", "lse is the natural-log logsumexp (B, H, Sq)",
          "flash_attention(return_lse=True) returns (out, lse) with lse float32 (B, H, Sq)")
def _fa_return_types(_tmp: Path) -> Outcome:
    def check() -> str | None:
        q, k, v = fa_inputs(B=2, Sq=5, Sk=7, H=4, Hkv=2, dtype="bfloat16")
        result = flash(q, k, v, return_lse=True, backend="triton")
        if not isinstance(result, tuple) or len(result) != 2:
            return f"returned {summarize(result)}"
        out, lse = result
        if out.dtype != q.dtype or tuple(lse.shape) != (2, 4, 5) or str(lse.dtype) != \
                "torch.float32":
            return f"out {summarize(out)}, lse {summarize(lse)}"
        plain = flash(q, k, v, backend="triton")
        if isinstance(plain, tuple):
            return "return_lse=False returned a tuple"
        return mismatch(lse, naive_attention(q, k, v)[1], 1e-3, "lse")

    return expect_ok(check, (FA,))


# -- varlen ------------------------------------------------------------------------------------


def cu(*values: int, dtype: str = "int32") -> Any:
    import torch

    return torch.tensor(values, dtype=dtype_of(dtype))


def fa_varlen_case(lengths: Sequence[int], total: int, backend: str, dtype: str,
                   hint: int | None = None, **options: Any) -> Callable[[Path], Outcome]:
    """Packed sequences of ``lengths`` in ``total`` tokens (the rest outside every sequence)."""

    def run(_tmp: Path) -> Outcome:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        q, k, v = (randn(total, 4, 16, dtype=dtype, seed=s) for s in range(3))
        kq, kv_ = k[:, :2], v[:, :2]  # GQA: 4 query heads over 2 kv heads
        kq, kv_ = kq.contiguous(), kv_.contiguous()
        want = naive_varlen(q, kq, kv_, bounds, bounds, **options)
        c = cu(*bounds)
        return expect_close(
            lambda: flash(q, kq, kv_, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=hint,
                          max_seqlen_k=hint, return_lse=True, backend=backend, **options),
            want, TOL[dtype], (FA,))

    return run


for _name, _args in {
    "varlen fp32 reference (an empty sequence inside)": ([5, 0, 12], 17, "reference",
                                                         "float32"),
    "varlen bf16 triton, causal": ([5, 0, 12], 17, "triton", "bfloat16"),
    "varlen tokens past cu_seqlens[-1] (out 0, lse -inf), triton": ([4, 6], 14, "triton",
                                                                     "bfloat16"),
    "varlen zero sequences (cu_seqlens = [0]), triton": ([], 5, "triton", "bfloat16"),
    "varlen no tokens at all (T = 0), triton": ([0, 0], 0, "triton", "bfloat16"),
}.items():
    add("flash", _name, f"flash_attention {_name}: out and lse against float64 math per "
        "sequence", fa_varlen_case(*_args, causal="causal" in _name))
add("flash", "varlen max_seqlen hint 10**9 (clamped), triton", "varlen flash_attention with "
    "max_seqlen_q/k = 10**9 over sequences of 6 and 11 tokens",
    fa_varlen_case([6, 11], 17, "triton", "bfloat16", hint=10**9, causal=True))
add("flash", "varlen max_seqlen hint 2**70, reference", "varlen flash_attention with "
    "max_seqlen_q/k = 2**70 (beyond int64)",
    fa_varlen_case([6, 11], 17, "reference", "float32", hint=2**70))


@scenario("flash", "NaN in a value row a causal query cannot see, reference",
          "flash_attention(q, k, v, causal=True) with v[0, 7] = NaN: queries 0..6 do not see "
          "key 7, and the documented math sums over visible keys only")
def _fa_nan_masked_ref(_tmp: Path) -> Outcome:
    return _fa_nan_masked("reference", "float32")


@scenario("flash", "NaN in a value row a causal query cannot see, triton",
          "as above on the triton backend (bf16)")
def _fa_nan_masked_triton(_tmp: Path) -> Outcome:
    return _fa_nan_masked("triton", "bfloat16")


def _fa_nan_masked(backend: str, dtype: str) -> Outcome:
    import torch

    def check() -> str | None:
        q, k, v = fa_inputs(Sq=8, H=1, dtype=dtype)
        v[0, 7] = float("nan")
        out = flash(q, k, v, causal=True, backend=backend)
        bad = int(torch.isnan(out[0, :7]).any(-1).any(-1).sum())
        return f"{bad} of the 7 queries that cannot see key 7 got NaN" if bad else None

    return expect_ok(check, (FA,))


@scenario("flash", "NaN in one query row stays in that row, triton",
          "flash_attention with q[0, 3] = NaN: only output row 3 may be NaN")
def _fa_nan_query(_tmp: Path) -> Outcome:
    import torch

    def check() -> str | None:
        q, k, v = fa_inputs(Sq=17)
        q[0, 3] = float("nan")
        out = flash(q, k, v, backend="triton")
        rows = torch.isnan(out[0]).any(-1).any(-1)
        others = int(rows.sum()) - int(rows[3])
        return f"{others} other rows got NaN" if others else None

    return expect_ok(check, (FA,))


# -- logits past float32's range: one documented rule on every backend -------------------------


def overflow_truth(q: Any, k: Any, v: Any, scale: float, causal: bool = False,
                   natural: bool = False) -> tuple[Any, Any]:
    """(out float64, lse float64 (B, H, Sq)) of the documented overflow rule, from (B, S, H, D)
    inputs, computed here without kpt: the float32 logits the kernels form (``q . k`` times
    ``scale * log2(e)`` rounded to float32 once; with ``natural``, flex's ``(q . k * scale) *
    log2(e)``), then per row: a +inf logit gives lse +inf and out NaN; else a NaN logit NaN;
    else no logit above -inf gives out 0 and lse -inf; else the base-2 softmax."""
    import torch

    log2e = 1.4426950408889634
    group = q.shape[2] // k.shape[2]
    qd = q.double().permute(0, 2, 1, 3)
    kd = k.double().repeat_interleave(group, 2).permute(0, 2, 1, 3)
    vd = v.double().repeat_interleave(group, 2).permute(0, 2, 1, 3)
    dot = (qd @ kd.transpose(-1, -2)).float()
    if natural:
        s = (dot * torch.tensor(scale, dtype=torch.float32)) * torch.tensor(log2e)
    else:
        s = dot * torch.tensor(scale * log2e, dtype=torch.float32)
    s = s.double()
    sq, sk = s.shape[-2:]
    if causal:
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + sk - sq, -math.inf)
    out = torch.zeros(*s.shape[:-1], vd.shape[-1], dtype=torch.float64)
    lse = torch.full(s.shape[:-1], -math.inf, dtype=torch.float64)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in s.shape[:-1])).tolist():
        row, b, h = s[tuple(idx)], idx[0], idx[1]
        if (row == math.inf).any():
            lse[tuple(idx)], out[tuple(idx)] = math.inf, math.nan
        elif row.isnan().any():
            lse[tuple(idx)], out[tuple(idx)] = math.nan, math.nan
        elif (row > -math.inf).any():
            m = row.max()
            w = torch.exp2(row - m)
            lse[tuple(idx)] = (m + torch.log2(w.sum())) * math.log(2.0)
            out[tuple(idx)] = (w / w.sum()) @ vd[b, h]
    return out.permute(0, 2, 1, 3), lse


def overflow_inputs(seed: int, d: int = 16) -> tuple[Any, Any, Any]:
    """q rows and keys of either sign, |q . k| >= d: every logit +-inf at scale 1e38."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(1, 9, 2, d, generator=gen) + 1
    k = torch.rand(1, 13, 1, d, generator=gen) + 1
    q[:, ::3] *= -1
    k[:, 5:] *= -1  # a row of either sign sees logits of one sign among the first 5 keys
    v = torch.randn(1, 13, 1, d, generator=gen)
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


def _fa_overflow(backend: str, causal: bool) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        q, k, v = overflow_inputs(1)
        want = overflow_truth(q, k, v, 1e38, causal)
        return expect_close(lambda: flash(q, k, v, scale=1e38, causal=causal,
                                          return_lse=True, backend=backend), want, 2e-2, (FA,))

    return run


# -- calls that must be refused ------------------------------------------------------------------


@dataclass(frozen=True)
class Lazy:
    """An argument built when the call runs (tensors are made in the worker, not at import)."""

    make: Callable[[], Any]


def resolve(args: dict[str, Any]) -> dict[str, Any]:
    return {name: value.make() if isinstance(value, Lazy) else value
            for name, value in args.items()}


def fa_bad(**override: Any) -> Callable[[], Any]:
    """A flash_attention call on fp32 GQA inputs (1, 17, 4/2, 16) with ``override`` applied."""

    def call() -> Any:
        q, k, v = fa_inputs(H=4, Hkv=2, dtype="float32")
        args = {"q": q, "k": k, "v": v, **resolve(override)}
        return flash(args.pop("q"), args.pop("k"), args.pop("v"), **args)

    return call


def T(*shape: int, dtype: str = "float32") -> Lazy:
    """A random tensor of ``shape``, made when the call runs."""
    return Lazy(lambda: randn(*shape, dtype=dtype))


def C(*values: int, dtype: str = "int32") -> Lazy:
    """A ``cu_seqlens``-like tensor of ``values``, made when the call runs."""
    return Lazy(lambda: cu(*values, dtype=dtype))


def meta(*shape: int, dtype: str = "float32") -> Lazy:
    """An empty tensor of ``shape`` on the meta device, made when the call runs."""

    def make() -> Any:
        import torch

        return torch.empty(*shape, dtype=dtype_of(dtype), device="meta")

    return Lazy(make)


def _varlen(**override: Any) -> dict:
    """A varlen call of 17 tokens (sequences of 5 and 12) with ``override`` applied."""
    return {**dict(q=T(17, 4, 16), k=T(17, 2, 16), v=T(17, 2, 16), cu_seqlens_q=C(0, 5, 17),
                   cu_seqlens_k=C(0, 5, 17)), **override}


def _both_cu(*values: int, dtype: str = "int32") -> dict:
    return dict(cu_seqlens_q=C(*values, dtype=dtype), cu_seqlens_k=C(*values, dtype=dtype))


FA_BAD: dict[str, tuple[str, dict]] = {
    "q float64": ("q float64 (fp16/bf16/fp32 only)", dict(q=T(1, 17, 4, 16, dtype="float64"))),
    "q int32": ("q int32", dict(q=Lazy(lambda: randn(1, 17, 4, 16).int()))),
    "mixed dtypes": ("q bf16, k/v fp32", dict(q=T(1, 17, 4, 16, dtype="bfloat16"))),
    "q 2-D": ("q of shape (17, 16)", dict(q=T(17, 16))),
    "q 5-D": ("q of shape (1, 1, 17, 4, 16)", dict(q=T(1, 1, 17, 4, 16))),
    "k a list": ("k = [1.0]", dict(k=[1.0])),
    "k and v shapes differ": ("v with 16 keys, k with 17", dict(v=T(1, 16, 2, 16))),
    "batch mismatch": ("q batch 1, k/v batch 2", dict(k=T(2, 17, 2, 16), v=T(2, 17, 2, 16))),
    "head_dim mismatch": ("q head_dim 16, k/v 8", dict(k=T(1, 17, 2, 8), v=T(1, 17, 2, 8))),
    "heads not a multiple": ("4 query heads over 3 kv heads",
                             dict(k=T(1, 17, 3, 16), v=T(1, 17, 3, 16))),
    "more kv heads than query heads": ("4 query heads, 8 kv heads",
                                       dict(k=T(1, 17, 8, 16), v=T(1, 17, 8, 16))),
    "head_dim 0": ("q/k/v with head_dim 0", dict(q=T(1, 17, 4, 0), k=T(1, 17, 2, 0),
                                                 v=T(1, 17, 2, 0))),
    "window (-2, 0)": ("window=(-2, 0)", dict(window=(-2, 0))),
    "window float": ("window=(1.5, 0)", dict(window=(1.5, 0))),
    "window of 3 ints": ("window=(1, 2, 3)", dict(window=(1, 2, 3))),
    "window a string": ("window='le'", dict(window="le")),
    "window (2**64, 0)": ("window=(2**64, 0): an int no kernel argument holds",
                          dict(window=(2**64, 0))),
    "causal with a right window": ("causal=True, window=(4, 2)",
                                   dict(causal=True, window=(4, 2))),
    "causal=1": ("causal=1 (an int)", dict(causal=1)),
    "deterministic='yes'": ("deterministic='yes'", dict(deterministic="yes")),
    "return_lse=1": ("return_lse=1", dict(return_lse=1)),
    "softcap -1": ("softcap=-1.0", dict(softcap=-1.0)),
    "softcap inf": ("softcap=inf", dict(softcap=math.inf)),
    "softcap nan": ("softcap=nan", dict(softcap=math.nan)),
    "softcap True": ("softcap=True", dict(softcap=True)),
    "scale nan": ("scale=nan", dict(scale=math.nan)),
    "scale inf": ("scale=inf", dict(scale=math.inf)),
    "scale a tensor": ("scale=torch.tensor(0.3)", dict(scale=Lazy(lambda: cu(3)[0] / 10))),
    "scale a string": ("scale='0.3'", dict(scale="0.3")),
    "max_seqlen without cu_seqlens": ("max_seqlen_q=17 on a batched call",
                                      dict(max_seqlen_q=17)),
    "backend 'magic'": ("backend='magic'", dict(backend="magic")),
    "triton on float32": ("backend='triton' on float32 (triton takes fp16/bf16)",
                          dict(backend="triton")),
    "cuda on the CPU": ("backend='cuda' on CPU tensors", dict(backend="cuda")),
    "triton head_dim 300": ("backend='triton' with head_dim 300 (> 256)",
                            dict(q=T(1, 9, 4, 300, dtype="bfloat16"),
                                 k=T(1, 9, 2, 300, dtype="bfloat16"),
                                 v=T(1, 9, 2, 300, dtype="bfloat16"), backend="triton")),
    "tensors on meta": ("q, k, v on the meta device",
                        dict(q=meta(1, 17, 4, 16), k=meta(1, 17, 2, 16), v=meta(1, 17, 2, 16))),
    "k on meta, q on cpu": ("q on cpu, k and v on meta",
                            dict(k=meta(1, 17, 2, 16), v=meta(1, 17, 2, 16))),
    "cu_seqlens int64": ("varlen with int64 cu_seqlens",
                         _varlen(**_both_cu(0, 5, 17, dtype="int64"))),
    "cu_seqlens float": ("varlen with float32 cu_seqlens",
                         _varlen(**_both_cu(0, 5, 17, dtype="float32"))),
    "cu_seqlens 2-D": ("cu_seqlens of shape (1, 3)", _varlen(
        cu_seqlens_q=Lazy(lambda: cu(0, 5, 17)[None]),
        cu_seqlens_k=Lazy(lambda: cu(0, 5, 17)[None]))),
    "cu_seqlens not contiguous": ("cu_seqlens = tensor([0, 0, 5, 5, 17, 17])[::2]", _varlen(
        cu_seqlens_q=Lazy(lambda: cu(0, 0, 5, 5, 17, 17)[::2]),
        cu_seqlens_k=Lazy(lambda: cu(0, 0, 5, 5, 17, 17)[::2]))),
    "cu_seqlens empty": ("cu_seqlens of shape (0,)", _varlen(**_both_cu())),
    "cu_seqlens lengths differ": ("cu_seqlens_q with 2 sequences, cu_seqlens_k with 3",
                                  _varlen(cu_seqlens_k=C(0, 5, 9, 17))),
    "only cu_seqlens_q": ("cu_seqlens_q without cu_seqlens_k", _varlen(cu_seqlens_k=None)),
    "cu_seqlens with 4-D q": ("cu_seqlens with (B, S, H, D) tensors", _both_cu(0, 17)),
    "cu_seqlens negative start": ("cu_seqlens = [-2, 9, 17]", _varlen(**_both_cu(-2, 9, 17))),
    "cu_seqlens decreasing": ("cu_seqlens = [0, 11, 9, 17]",
                              _varlen(**_both_cu(0, 11, 9, 17))),
    "cu_seqlens past the tokens": ("cu_seqlens = [0, 9, 18] over 17 tokens",
                                   _varlen(**_both_cu(0, 9, 18))),
    "cu_seqlens huge": ("cu_seqlens = [0, 2**31 - 1] over 17 tokens",
                        _varlen(**_both_cu(0, 2**31 - 1))),
    "max_seqlen hint too small": ("max_seqlen_q/k = 11 with a 12-token sequence",
                                  _varlen(max_seqlen_q=11, max_seqlen_k=11)),
    "max_seqlen negative": ("max_seqlen_q=-1", _varlen(max_seqlen_q=-1, max_seqlen_k=12)),
    "max_seqlen True": ("max_seqlen_q=True", _varlen(max_seqlen_q=True, max_seqlen_k=12)),
    "max_seqlen 12.0": ("max_seqlen_q=12.0 (a float)",
                        _varlen(max_seqlen_q=12.0, max_seqlen_k=12)),
}


def _fa_bad_cases() -> None:
    for name, (what, override) in FA_BAD.items():
        call = fa_bad(**override)
        add("flash", f"refuse {name}", f"flash_attention with {what}: must be refused",
            lambda _tmp, call=call: expect_error(call, (FA,)))


_fa_bad_cases()



def compiled_case(op: str, make: Callable[[], tuple[Callable, tuple]]
                  ) -> Callable[[Path], Outcome]:
    """``torch.compile(fn, backend="eager", fullgraph=True)`` (tracing only, no codegen) of a
    call: the same result as eager."""

    def run(_tmp: Path) -> Outcome:
        import torch

        fn, args = make()
        want = fn(*args)
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        return expect_close(lambda: compiled(*args), want, 1e-6, (op,))

    return run


def _compiled_flash() -> tuple[Callable, tuple]:
    return (lambda q, k, v: flash(q, k, v, causal=True, window=(5, 0), softcap=3.0),
            fa_inputs(H=4, Hkv=2, dtype="float32"))


add("flash", "torch.compile(fullgraph=True)", "flash_attention(causal, window, softcap, GQA) "
    "inside torch.compile(backend='eager', fullgraph=True): equal to eager",
    compiled_case(FA, _compiled_flash), timeout=120)

# =============================================================================================
# flex_attention
# =============================================================================================

FX = "flex_attention"


def flex(*args: Any, **kwargs: Any) -> Any:
    from kpt.ops.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


def block_mask(mask_mod: Callable | None, B: int | None, H: int | None, q_len: int, kv_len: int,
               **kwargs: Any) -> Any:
    from kpt.ops.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, H, q_len, kv_len, device="cpu", **kwargs)


def named_mods() -> Any:
    from kpt.ops.flex_attention import mods

    return mods


def fx_inputs(B: int = 1, H: int = 2, Sq: int = 33, Skv: int | None = None,
              Hkv: int | None = None, D: int = 16, Dv: int | None = None, Bkv: int | None = None,
              dtype: str = "float32") -> tuple[Any, Any, Any]:
    skv = Sq if Skv is None else Skv
    hkv = H if Hkv is None else Hkv
    bkv = B if Bkv is None else Bkv
    return (randn(B, H, Sq, D, dtype=dtype, seed=1), randn(bkv, hkv, skv, D, dtype=dtype, seed=2),
            randn(bkv, hkv, skv, D if Dv is None else Dv, dtype=dtype, seed=3))


def fx_case(backend: str | None, *, dtype: str = "float32", shape: dict | None = None,
            score: Callable[[], Callable | None] = lambda: None,
            mask: Callable[[], Callable | None] = lambda: None, block_size: int = 16,
            truth_score: Callable[[], Callable | None] | None = None,
            **options: Any) -> Callable[[Path], Outcome]:
    """A valid flex_attention call (mods made by the ``score``/``mask`` factories when the
    scenario runs): out and lse against :func:`naive_flex` of the same inputs."""

    def run(_tmp: Path) -> Outcome:
        q, k, v = fx_inputs(**(shape or {}), dtype=dtype)
        score_mod, mask_mod = score(), mask()
        bm = None if mask_mod is None else block_mask(mask_mod, q.shape[0], None, q.shape[2],
                                                      k.shape[2], BLOCK_SIZE=block_size)
        want = naive_flex(q, k, v, (truth_score or score)(), mask_mod,
                          scale=options.get("scale"))
        kw = dict(options, backend=backend, return_lse=True)
        return expect_close(lambda: flex(q, k, v, score_mod, bm, **kw), want, TOL[dtype], (FX,))

    return run


def _softcap_mod() -> Callable:
    return named_mods().softcap(2.0)


def _alibi_mod() -> Callable:
    return named_mods().alibi(named_mods().alibi_slopes(2))


def _doc_ids() -> Any:
    return cu(*([0] * 10 + [1] * 13 + [2] * 10), dtype="int64")


def _doc_ids_per_row() -> Any:
    import torch

    return torch.stack([_doc_ids(), _doc_ids().flip(0)])


FX_VALID: dict[str, dict] = {
    "no mods, fp32 reference": dict(backend="reference"),
    "no mods, fp32 triton": dict(backend="triton"),
    "no mods, bf16 triton": dict(backend="triton", dtype="bfloat16"),
    "no mods, fp16 triton": dict(backend="triton", dtype="float16"),
    "causal block mask, bf16 triton": dict(backend="triton", dtype="bfloat16",
                                           mask=lambda: named_mods().causal()),
    "no mods, float64 reference": dict(backend="reference", dtype="float64"),
    "causal block mask, reference": dict(backend="reference",
                                         mask=lambda: named_mods().causal()),
    "causal block mask, triton": dict(backend="triton", mask=lambda: named_mods().causal()),
    "sliding_window(5), triton": dict(backend="triton",
                                      mask=lambda: named_mods().sliding_window(5)),
    "prefix_lm(4), triton": dict(backend="triton", mask=lambda: named_mods().prefix_lm(4)),
    "prefix_lm with per-row lengths, triton": dict(
        backend="triton", shape=dict(B=2), mask=lambda: named_mods().prefix_lm(cu(3, 20))),
    "document ids (1-D), triton": dict(backend="triton",
                                       mask=lambda: named_mods().document(_doc_ids())),
    "document ids per row (2-D), triton": dict(
        backend="triton", shape=dict(B=2),
        mask=lambda: named_mods().document(_doc_ids_per_row())),
    "and_masks(document, causal), triton": dict(
        backend="triton",
        mask=lambda: named_mods().and_masks(named_mods().document(_doc_ids()),
                                            named_mods().causal())),
    "or_masks(causal, prefix_lm(3)), reference": dict(
        backend="reference",
        mask=lambda: named_mods().or_masks(named_mods().causal(), named_mods().prefix_lm(3))),
    "softcap(2) score_mod, triton": dict(backend="triton", score=_softcap_mod),
    "alibi score_mod, triton": dict(backend="triton", score=_alibi_mod),
    "compose(softcap, alibi) with causal, triton": dict(
        backend="triton", mask=lambda: named_mods().causal(),
        score=lambda: named_mods().compose(_softcap_mod(), _alibi_mod())),
    "score_mod returning an integer tensor (q_idx - kv_idx), triton": dict(
        backend="triton", score=lambda: (lambda s, b, h, q, kv: q - kv)),
    "score_mod returning a Python float (0.0), reference": dict(
        backend="reference", score=lambda: (lambda s, b, h, q, kv: 0.0)),
    "mask_mod returning a Python True, triton": dict(
        backend="triton", mask=lambda: (lambda b, h, q, kv: True)),
    "every row fully masked (out 0, lse -inf), triton": dict(
        backend="triton", mask=lambda: (lambda b, h, q, kv: q < 0)),
    "torch.erf score_mod (not translatable) under auto dispatch": dict(
        backend=None, score=lambda: (lambda s, b, h, q, kv: torch_erf(s))),
    "GQA, enable_gqa=True (4 over 2 heads), triton": dict(
        backend="triton", shape=dict(H=4, Hkv=2), enable_gqa=True),
    "key/value batch 1 broadcast over batch 2, triton": dict(backend="triton",
                                                             shape=dict(B=2, Bkv=1)),
    "value head dim 8, query/key head dim 16, triton": dict(backend="triton", shape=dict(Dv=8)),
    "17 queries over 40 keys, causal (top-left), triton": dict(
        backend="triton", shape=dict(Sq=17, Skv=40), mask=lambda: named_mods().causal()),
    "BLOCK_SIZE 7 (not a power of two), reference": dict(
        backend="reference", block_size=7, mask=lambda: named_mods().causal()),
    "BLOCK_SIZE 256 (larger than the sequence), triton": dict(
        backend="triton", block_size=256, mask=lambda: named_mods().causal()),
    "negative scale, triton": dict(backend="triton", scale=-0.5),
    "and_masks(causal, document) as varlen sequences, bf16 flash": dict(
        backend="flash", dtype="bfloat16",
        mask=lambda: named_mods().and_masks(named_mods().causal(),
                                            named_mods().document(_doc_ids()))),
    "document ids per row (2-D) as varlen sequences, GQA, bf16 flash": dict(
        backend="flash", dtype="bfloat16", shape=dict(B=2, H=4, Hkv=2), enable_gqa=True,
        mask=lambda: named_mods().document(_doc_ids_per_row())),
}


def torch_erf(x: Any) -> Any:
    import torch

    return torch.erf(x)


for _name, _spec in FX_VALID.items():
    add("flex", _name, f"flex_attention {_name}: out and lse against float64 math",
        fx_case(**_spec))


def _short_bias_case(backend: str) -> Callable[[Path], Outcome]:
    """score_mod reading bias[q_idx] with a bias shorter than the queries: the kernels read the
    missing entries as 0 (their masked loads exist for padding past the sequence); eager
    code raises IndexError. Either silently changes the math or fails obscurely: refused."""

    def run(_tmp: Path) -> Outcome:
        q, k, v = fx_inputs()
        bias = randn(8, seed=7)
        return expect_error(lambda: flex(q, k, v, lambda s, b, h, q_, kv: s + bias[q_],
                                         backend=backend), (FX,))

    return run


add("flex", "refuse captured bias shorter than the queries, reference",
    "flex_attention with score_mod s + bias[q_idx], bias of 8 entries, 33 queries: must be "
    "refused (it used to read the missing entries as 0)", _short_bias_case("reference"))
add("flex", "refuse captured bias shorter than the queries, triton",
    "as above on the triton backend", _short_bias_case("triton"))


def _scalar_change_case(kind: str) -> Callable[[Path], Outcome]:
    """A mod whose captured Python scalar changes between two calls: the second call must use
    the new value (the generated kernel is cached by the mod's code)."""

    def run(_tmp: Path) -> Outcome:
        q, k, v = fx_inputs()
        holder = {"value": 1.0}

        class Scale:
            factor = 1.0

            def __call__(self, s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
                return s * self.factor

        obj = Scale()
        cell = 1.0

        def cell_mod(s: Any, b: Any, h: Any, q_: Any, kv: Any) -> Any:
            return s * cell

        def make(c: float) -> Callable:
            nonlocal cell
            if kind == "closure":
                return lambda s, b, h, q_, kv: s * c
            if kind == "dict":
                holder["value"] = c
                return lambda s, b, h, q_, kv: s * holder["value"]
            if kind == "cell":
                cell = c
                return cell_mod
            if kind == "global":
                globals()["_FX_GLOBAL_SCALE"] = c
                return _fx_global_mod
            obj.factor = c
            return obj

        def check() -> str | None:
            for c in (1.0, 3.0):
                mod = make(c)
                got = flex(q, k, v, mod, backend="triton")
                reason = mismatch(got, naive_flex(q, k, v, lambda s, *_, c=c: s * c)[0], 1e-4)
                if reason:
                    return f"with the scalar at {c}: {reason}"
            return None

        return expect_ok(check, (FX,))

    return run


_FX_GLOBAL_SCALE = 1.0


def _fx_global_mod(s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
    return s * _FX_GLOBAL_SCALE


for _kind, _what in {"closure": "a new closure over a new value",
                     "cell": "the closure cell of one function object, rebound",
                     "global": "a module global, reassigned",
                     "dict": "a captured dict entry",
                     "object": "an attribute of a callable object"}.items():
    add("flex", f"captured scalar changes between calls ({_kind}), triton",
        f"flex_attention twice with score_mod s * c, c {_what} going from 1.0 to 3.0",
        _scalar_change_case(_kind))


@scenario("flex", "captured tensor mutated in place between calls, triton",
          "flex_attention with mask_mod ids[q] == ids[kv], ids changed in place between calls")
def _fx_mutated_buffer(_tmp: Path) -> Outcome:
    ids = _doc_ids()

    def mask(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return ids[q] == ids[kv]

    def check() -> str | None:
        q, k, v = fx_inputs()
        for _ in range(2):
            bm = block_mask(mask, 1, None, 33, 33, BLOCK_SIZE=16)
            got = flex(q, k, v, block_mask=bm, backend="triton")
            reason = mismatch(got, naive_flex(q, k, v, mask_mod=mask)[0], 1e-4)
            if reason:
                return reason
            ids.copy_(ids.flip(0))
        return None

    return expect_ok(check, (FX,))


@scenario("flex", "gradients, fp32 triton",
          "flex_attention backward with alibi + causal on triton against float64 autograd")
def _fx_grads(_tmp: Path) -> Outcome:
    return _fx_grad_check("triton", with_buffer_grad=False)


@scenario("flex", "gradient of a captured tensor that requires grad",
          "flex_attention with score_mod s + bias[h] where bias.requires_grad: bias.grad "
          "against float64 autograd")
def _fx_buffer_grads(_tmp: Path) -> Outcome:
    return _fx_grad_check(None, with_buffer_grad=True)


def _fx_grad_check(backend: str | None, with_buffer_grad: bool) -> Outcome:
    import torch

    q, k, v = (t.requires_grad_() for t in fx_inputs(Sq=17))
    bias = randn(2, seed=5).requires_grad_()
    slopes = randn(2, seed=6).abs()
    causal = named_mods().causal()
    if with_buffer_grad:
        def score(s: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return s + bias[h]
    else:
        score = named_mods().alibi(slopes)
    bm = block_mask(causal, 1, None, 17, 17, BLOCK_SIZE=16)
    leaves = (q, k, v, bias) if with_buffer_grad else (q, k, v)
    dout = randn(1, 2, 17, 16, seed=8)

    def call() -> Any:
        out = flex(q, k, v, score, bm, backend=backend)
        return torch.autograd.grad((out * dout).sum(), leaves)

    wide = [t.detach().double().requires_grad_() for t in leaves]
    if with_buffer_grad:
        def truth_score(s: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return s + wide[3][h]
    else:
        def truth_score(s: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return s + slopes.double()[h] * (ki - qi)
    want = torch.autograd.grad((_flex_graph(*wide[:3], truth_score, causal) * dout).sum(), wide)
    return expect_close(call, want, 1e-4, (FX,))


def _flex_graph(q: Any, k: Any, v: Any, score: Callable, mask: Callable) -> Any:
    """Differentiable float64 flex attention (materialised scores) for gradients."""
    import torch

    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    idx = [torch.arange(n).view(*([1] * i), n, *([1] * (3 - i)))
           for i, n in enumerate(s.shape)]
    s = score(s, *idx)
    s = s.masked_fill(~mask(*idx), float("-inf"))
    return torch.softmax(s, -1) @ v


@scenario("flex", "torch's own BlockMask (create_block_mask _compile=False)",
          "flex_attention with a causal BlockMask from torch.nn.attention.flex_attention")
def _fx_torch_block_mask(_tmp: Path) -> Outcome:
    from torch.nn.attention import flex_attention as torch_flex

    q, k, v = fx_inputs()

    def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return q_idx >= kv_idx

    bm = torch_flex.create_block_mask(causal, 1, 1, 33, 33, device="cpu", _compile=False)
    return expect_close(lambda: flex(q, k, v, block_mask=bm, backend="triton"),
                        naive_flex(q, k, v, mask_mod=causal)[0], 1e-4, (FX,))


def _compiled_flex() -> tuple[Callable, tuple]:
    score = named_mods().alibi(named_mods().alibi_slopes(2))
    return (lambda q, k, v: flex(q, k, v, score), fx_inputs())


add("flex", "torch.compile(fullgraph=True) with an alibi score_mod", "flex_attention with "
    "mods.alibi inside torch.compile(backend='eager', fullgraph=True): equal to eager",
    compiled_case(FX, _compiled_flex), timeout=120)


@scenario("flex", "transposed (non-contiguous) query, triton",
          "flex_attention on a query that is a .transpose(1, 2) view")
def _fx_transposed(_tmp: Path) -> Outcome:
    q = randn(1, 33, 2, 16, seed=1).transpose(1, 2)
    _, k, v = fx_inputs()
    return expect_close(lambda: flex(q, k, v, backend="triton"), naive_flex(q, k, v)[0], 1e-4,
                        (FX,))


def _fx_overflow(backend: str, nan_scores: bool) -> Callable[[Path], Outcome]:
    """flex at scale 1e38: rows at lse +inf (out NaN) or -inf (out 0), optionally beside NaN
    scores (a score_mod adding -inf to the first keys: +inf - inf is NaN), against the rule in
    float64 (flex forms the exp2-domain score as (q . k * scale) * log2(e))."""

    def run(_tmp: Path) -> Outcome:
        import torch

        q, k, v = overflow_inputs(3)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        score = None
        if nan_scores:
            def score(s, b, h, q_idx, kv_idx):
                return torch.where(kv_idx < 3, s - math.inf, s)
        want_o, want_lse = overflow_truth(q, k, v, 1e38, natural=True)
        if nan_scores:  # +inf where a row has one, else NaN (the first keys of any sign)
            want_o = torch.full_like(want_o, math.nan)
            want_lse = torch.where(torch.isposinf(want_lse), math.inf, math.nan)
        return expect_close(lambda: flex(qt, kt, vt, score, scale=1e38, enable_gqa=True,
                                         return_lse=True, backend=backend),
                            (want_o.transpose(1, 2), want_lse), 2e-2, (FX,))

    return run


# flash (flag: causal) and flex (flag: NaN scores beside the +inf ones), both backends.
for _backend in ("reference", "triton"):
    for _flag in (False, True):
        add("flash", f"logits past float32 (scale 1e38){', causal' if _flag else ''}, "
            f"{_backend}", "rows with a +inf logit (lse +inf, out NaN) and rows whose logits "
            "are all -inf (out 0, lse -inf) against the rule computed in float64",
            _fa_overflow(_backend, _flag))
        add("flex", f"scores past float32 (scale 1e38){' beside NaN scores' if _flag else ''}, "
            f"{_backend}", "the same rule for flex_attention's scores",
            _fx_overflow(_backend, _flag))


@scenario("flex", "return_lse='no' (a non-bool flag)",
          "flex_attention(..., return_lse='no'): flash_attention refuses non-bool flags; here "
          "the caller asked 'no' and must not get a tuple")
def _fx_return_lse_str(_tmp: Path) -> Outcome:
    q, k, v = fx_inputs()

    def check() -> str | None:
        out = flex(q, k, v, return_lse="no")
        return f"returned {summarize(out)}" if isinstance(out, tuple) else None

    return expect_ok(check, (FX,))


def _fx_nan_masked(backend: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        def check() -> str | None:
            q, k, v = fx_inputs(Sq=40)
            v[0, :, 7] = float("nan")
            bm = block_mask(named_mods().causal(), 1, None, 40, 40, BLOCK_SIZE=16)
            out = flex(q, k, v, block_mask=bm, backend=backend)
            bad = int(torch.isnan(out[0, :, :7]).any(-1).any(0).sum())
            return f"{bad} of the 7 queries that cannot see key 7 got NaN" if bad else None

        return expect_ok(check, (FX,))

    return run


for _backend in ("reference", "triton"):
    add("flex", f"NaN in a value row a causal block mask hides, {_backend}",
        "flex_attention with a causal block mask and v[:, :, 7] = NaN: queries 0..6 do not "
        "see key 7 and must stay finite", _fx_nan_masked(_backend))


# -- mods and calls that must be refused ---------------------------------------------------------


def fx_bad(score: Callable[[], Any] = lambda: None, mask: Callable[[], Any] | None = None,
           inputs: Callable[[], tuple] | None = None, **options: Any) -> Callable[[], Any]:
    """A flex_attention call (fp32 (1, 2, 33, 16)) with a bad mod or argument."""

    def call() -> Any:
        q, k, v = fx_inputs() if inputs is None else inputs()
        bm = None if mask is None else mask()
        return flex(q, k, v, score(), bm, **resolve(options))

    return call


def _meta_block_mask() -> Any:
    from kpt.ops.flex_attention import create_block_mask

    return create_block_mask(None, 1, None, 33, 33, device="meta")


def _meta_bias_mod() -> Callable:
    bias = meta(2).make()
    return lambda s, b, h, q, kv: s + bias[h]


def mod(fn: Callable) -> Callable[[], Callable]:
    """A factory returning ``fn`` (mods are made when the scenario runs)."""
    return lambda: fn


FX_BAD_SCORE = {
    "score_mod sums the scores": (lambda s, b, h, q, kv: s.sum()),
    "score_mod takes a row maximum": (lambda s, b, h, q, kv: s - s.amax(-1, keepdim=True)),
    "score_mod returns a tuple": (lambda s, b, h, q, kv: (s, s)),
    "score_mod returns None": (lambda s, b, h, q, kv: None),
    "score_mod returns a string": (lambda s, b, h, q, kv: "x"),
    "score_mod returns a bool mask": (lambda s, b, h, q, kv: q >= kv),
    "score_mod branches on the score (if s > 0)": (lambda s, b, h, q, kv: s if s > 0 else -s),
    "score_mod branches on the head (if h == 0)": (lambda s, b, h, q, kv: s if h == 0 else -s),
    "score_mod indexes a Python list with h": (lambda s, b, h, q, kv: s + [0.0, 1.0][h]),
    "score_mod takes one argument": (lambda s: s),
    "score_mod divides by zero": (lambda s, b, h, q, kv: 1 / 0),
    "score_mod returns a numpy array": (lambda s, b, h, q, kv: s.numpy()),
    "score_mod transposes the scores": (lambda s, b, h, q, kv: s.transpose(-1, -2)),
    "score_mod slices the scores": (lambda s, b, h, q, kv: s[..., :1]),
    "score_mod returns a complex score": (lambda s, b, h, q, kv: s * 1j),
}
for _name, _fn in FX_BAD_SCORE.items():
    add("flex", f"refuse {_name}", f"flex_attention with a {_name}: must be refused",
        lambda _tmp, fn=_fn: expect_error(fx_bad(score=mod(fn)), (FX,)))

FX_BAD_MASK = {
    "mask_mod returns an integer": (lambda b, h, q, kv: q - kv),
    "mask_mod branches (if q > kv)": (lambda b, h, q, kv: True if q > kv else False),
    "mask_mod reduces (.any())": (lambda b, h, q, kv: (q >= kv).any()),
    "mask_mod takes two arguments": (lambda b, h: True),
    "mask_mod returns a string": (lambda b, h, q, kv: "yes"),
    "mask_mod slices its result": (lambda b, h, q, kv: (q >= kv)[..., :1]),
}
for _name, _fn in FX_BAD_MASK.items():
    add("flex", f"refuse {_name}", f"create_block_mask with a {_name}: must be refused",
        lambda _tmp, fn=_fn: expect_error(lambda: block_mask(fn, 1, None, 33, 33), (FX,)))

FX_BAD_CALLS: dict[str, tuple[str, Callable[[], Any], tuple[str, ...]]] = {
    "score_mod not callable": ("score_mod=5", fx_bad(score=lambda: 5), (FX,)),
    "BLOCK_SIZE 0": ("create_block_mask(..., BLOCK_SIZE=0)",
                     lambda: block_mask(None, 1, None, 33, 33, BLOCK_SIZE=0), (FX,)),
    "BLOCK_SIZE -1": ("create_block_mask(..., BLOCK_SIZE=-1)",
                      lambda: block_mask(None, 1, None, 33, 33, BLOCK_SIZE=-1), (FX,)),
    "BLOCK_SIZE 16.5": ("create_block_mask(..., BLOCK_SIZE=16.5)",
                        lambda: block_mask(None, 1, None, 33, 33, BLOCK_SIZE=16.5), (FX,)),
    "BLOCK_SIZE '16'": ("create_block_mask(..., BLOCK_SIZE='16') (a string)",
                        lambda: block_mask(None, 1, None, 33, 33, BLOCK_SIZE="16"), (FX,)),
    "Q_LEN negative": ("create_block_mask(causal, 1, None, -5, 33)",
                       lambda: block_mask(named_mods().causal(), 1, None, -5, 33), (FX,)),
    "B negative": ("create_block_mask(causal, -2, None, 33, 33)",
                   lambda: block_mask(named_mods().causal(), -2, None, 33, 33), (FX,)),
    "document ids shorter than the sequence": (
        "create_block_mask(mods.document(ids of 10 tokens), 1, None, 33, 33)",
        lambda: block_mask(named_mods().document(cu(*[0] * 10, dtype="int64")), 1, None,
                           33, 33), (FX,)),
    "block mask built for other lengths": (
        "a block mask for 40 x 40 with 33-token q/k/v",
        fx_bad(mask=lambda: block_mask(named_mods().causal(), 1, None, 40, 40)), (FX,)),
    "block mask a string": ("block_mask='causal'", fx_bad(mask=lambda: "causal"), (FX,)),
    "block mask batch 3 for batch 1": (
        "a block mask with B=3 for a batch of 1",
        fx_bad(mask=lambda: block_mask(named_mods().causal(), 3, None, 33, 33)), (FX,)),
    "block mask on meta": ("a block mask built on the meta device", fx_bad(
        mask=lambda: _meta_block_mask()), (FX,)),
    "different heads without enable_gqa": (
        "2 query heads, 1 kv head, enable_gqa=False",
        fx_bad(inputs=lambda: fx_inputs(Hkv=1)), (FX,)),
    "heads not a multiple": ("3 query heads over 2 kv heads, enable_gqa=True",
                             fx_bad(inputs=lambda: fx_inputs(H=3, Hkv=2), enable_gqa=True),
                             (FX,)),
    "no queries": ("q with 0 queries", fx_bad(inputs=lambda: fx_inputs(Sq=0, Skv=33)), (FX,)),
    "scale nan": ("scale=nan", fx_bad(scale=math.nan), (FX,)),
    "scale a string": ("scale='1'", fx_bad(scale="1"), (FX,)),
    "int32 inputs": ("int32 q/k/v", fx_bad(inputs=lambda: tuple(
        t.int() for t in fx_inputs())), (FX,)),
    "mixed dtypes": ("q fp32, k/v fp64", fx_bad(inputs=lambda: (
        fx_inputs()[0], *(t.double() for t in fx_inputs()[1:]))), (FX,)),
    "3-D inputs": ("(H, S, D) inputs", fx_bad(inputs=lambda: tuple(
        t[0] for t in fx_inputs())), (FX,)),
    "backend 'bad'": ("backend='bad'", fx_bad(backend="bad"), (FX,)),
    "triton on float64": ("backend='triton' on float64", fx_bad(
        inputs=lambda: tuple(t.double() for t in fx_inputs()), backend="triton"), (FX,)),
    "triton with BLOCK_SIZE 7": ("backend='triton' with a BLOCK_SIZE 7 block mask", fx_bad(
        mask=lambda: block_mask(named_mods().causal(), 1, None, 33, 33, BLOCK_SIZE=7),
        backend="triton"), (FX,)),
    "cuda on the CPU": ("backend='cuda' on CPU tensors", fx_bad(
        inputs=lambda: tuple(t.bfloat16() for t in fx_inputs()), backend="cuda"), (FX,)),
    "captured tensor on meta": ("score_mod s + bias[h] with bias on the meta device",
                                fx_bad(score=lambda: _meta_bias_mod()), (FX,)),
    "flash with a document in two runs": (
        "backend='flash' with document ids 0 0 1 1 0 0 (document 0 split by document 1)",
        fx_bad(inputs=lambda: tuple(t.bfloat16() for t in fx_inputs()), backend="flash",
               mask=lambda: block_mask(named_mods().document(
                   cu(*([0] * 10 + [1] * 13 + [0] * 10), dtype="int64")), 1, None, 33, 33)),
        (FX,)),
    "mods.softcap(0)": ("mods.softcap(0)", lambda: named_mods().softcap(0), (FX,)),
    "mods.sliding_window(-1)": ("mods.sliding_window(-1)",
                                lambda: named_mods().sliding_window(-1), (FX,)),
    "mods.prefix_lm(-1)": ("mods.prefix_lm(-1)", lambda: named_mods().prefix_lm(-1), (FX,)),
    "mods.alibi of a list": ("mods.alibi([0.5, 0.25])",
                             lambda: named_mods().alibi([0.5, 0.25]), (FX,)),
    "mods.document of floats": ("mods.document(float ids)",
                                lambda: named_mods().document(randn(33)), (FX,)),
    "mods.and_masks()": ("mods.and_masks() with no masks", lambda: named_mods().and_masks(),
                         (FX,)),
    "mods.compose(None)": ("mods.compose(None)", lambda: named_mods().compose(None), (FX,)),
    "mods.alibi_slopes(0)": ("mods.alibi_slopes(0)", lambda: named_mods().alibi_slopes(0),
                             (FX, "alibi_slopes")),
    "mods.alibi_slopes(-3)": ("mods.alibi_slopes(-3)", lambda: named_mods().alibi_slopes(-3),
                              (FX, "alibi_slopes")),
}
for _name, (_what, _call, _names) in FX_BAD_CALLS.items():
    add("flex", f"refuse {_name}", f"{_what}: must be refused",
        lambda _tmp, call=_call, names=_names: expect_error(call, names))


# =============================================================================================
# rmsnorm_qkv_rope
# =============================================================================================

RQ = "rmsnorm_qkv_rope"
HIDDEN, NQ, NKV, HD = 64, 4, 2, 16
HEADS = dict(num_q_heads=NQ, num_kv_heads=NKV, head_dim=HD)


def rope_op(*args: Any, **kwargs: Any) -> Any:
    from kpt.ops import rmsnorm_qkv_rope

    return rmsnorm_qkv_rope(*args, **kwargs)


def rq_inputs(lead: tuple[int, ...] = (1, 8), dtype: str = "float32", hidden: int = HIDDEN,
              rows: int = (NQ + 2 * NKV) * HD) -> tuple[Any, Any, Any]:
    """x (*lead, hidden), norm_weight (hidden,), qkv_weight (rows, hidden)."""
    x = randn(*lead, hidden, dtype=dtype, seed=11)
    norm = (1 + randn(hidden, seed=12, scale=0.1)).to(dtype_of(dtype))
    weight = randn(rows, hidden, dtype=dtype, seed=13, scale=hidden**-0.5)
    return x, norm, weight


def positions(*values: int, shape: tuple[int, ...] | None = None, dtype: str = "int64") -> Any:
    t = cu(*values, dtype=dtype)
    return t if shape is None else t.reshape(shape)


def rq_case(backend: str, dtype: str = "float32", lead: tuple[int, ...] = (1, 8),
            pos: Callable[[], Any] | None = None, extras: Callable[[], dict] | None = None,
            versus_reference: bool = False, heads: dict | None = None, hidden: int = HIDDEN,
            **options: Any) -> Callable[[Path], Outcome]:
    """A valid call: outputs against the float64 math of the same inputs, or (for kernels
    whose rounding the float64 math does not model: huge positions) against the reference
    backend with the kernel tolerance."""

    def run(_tmp: Path) -> Outcome:
        import torch

        shape = heads or HEADS
        rows = (shape["num_q_heads"] + 2 * shape["num_kv_heads"]) * shape["head_dim"]
        x, norm, weight = rq_inputs(lead, dtype, hidden, rows)
        p = pos() if pos is not None else torch.arange(math.prod(lead)).reshape(lead)
        kw = {**shape, **options, **(extras() if extras is not None else {})}
        kw = {name: value.to(x.dtype) if _is_float_tensor(value) else value
              for name, value in kw.items()}
        if versus_reference:
            want = rope_op(x, norm, weight, p, backend="reference", **kw)
        else:
            want = naive_rmsnorm_qkv_rope(x, norm, weight, p, **kw)
        tol = TOL[dtype] if dtype != "float32" or backend == "reference" else 4e-3
        return expect_close(lambda: rope_op(x, norm, weight, p, backend=backend, **kw), want,
                            tol, (RQ,))

    return run


def _is_float_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _qk_norm() -> dict:
    return dict(q_norm_weight=1 + randn(HD, seed=14, scale=0.1),
                k_norm_weight=1 + randn(HD, seed=15, scale=0.1))


def _bias() -> dict:
    return dict(qkv_bias=randn((NQ + 2 * NKV) * HD, seed=16, scale=0.1))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

RQ_VALID: dict[str, dict] = {
    "basic fp32 reference": dict(backend="reference"),
    "basic fp32 triton": dict(backend="triton"),
    "basic bf16 triton": dict(backend="triton", dtype="bfloat16"),
    "basic fp16 triton": dict(backend="triton", dtype="float16"),
    "basic bf16 reference": dict(backend="reference", dtype="bfloat16"),
    "positions 0-d (tensor(7)) for x (1, 8, 64), reference": dict(
        backend="reference", pos=lambda: positions(7, shape=())),
    "positions 0-d (tensor(7)) for x (1, 8, 64), triton": dict(
        backend="triton", pos=lambda: positions(7, shape=())),
    "positions [7] for x (1, 8, 64), reference": dict(backend="reference",
                                                      pos=lambda: positions(7)),
    "positions [7] for x (1, 8, 64), triton": dict(backend="triton", pos=lambda: positions(7)),
    "positions [[7]] for x (1, 8, 64), reference": dict(
        backend="reference", pos=lambda: positions(7, shape=(1, 1))),
    "positions [[7]] for x (1, 8, 64), triton": dict(
        backend="triton", pos=lambda: positions(7, shape=(1, 1))),
    "positions (8,) for x (1, 8, 64), triton": dict(backend="triton",
                                                    pos=lambda: positions(*range(8))),
    "positions int32, triton": dict(backend="triton",
                                    pos=lambda: positions(*range(8), shape=(1, 8),
                                                          dtype="int32")),
    "negative positions, triton": dict(backend="triton",
                                       pos=lambda: positions(*range(-8, 0), shape=(1, 8))),
    "positions 2**31 + 5 (beyond int32), triton vs reference": dict(
        backend="triton", versus_reference=True, pos=lambda: positions(2**31 + 5)),
    "positions 2**40, triton vs reference": dict(backend="triton", versus_reference=True,
                                                 pos=lambda: positions(2**40)),
    "rope_scaling linear (factor 4), triton": dict(
        backend="triton", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_scaling legacy key {'type': 'linear'}, reference": dict(
        backend="reference", rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_scaling llama3, triton": dict(backend="triton", rope_scaling=LLAMA3,
                                        pos=lambda: positions(*range(0, 800, 100))),
    "rope_scaling {} (default), reference": dict(backend="reference", rope_scaling={}),
    "rope_theta 0.5 (below 1), triton": dict(backend="triton", rope_theta=0.5),
    "rope_theta 500000 as an int, reference": dict(backend="reference", rope_theta=500000),
    "partial rotary_dim 8 of 16, triton": dict(backend="triton", rotary_dim=8),
    "rope_style gptj, triton": dict(backend="triton", rope_style="gptj"),
    "rope_style gptj with rotary_dim 6, reference": dict(backend="reference",
                                                         rope_style="gptj", rotary_dim=6),
    "q/k norm (Qwen3), triton": dict(backend="triton", extras=_qk_norm),
    "qkv bias (Qwen2), triton": dict(backend="triton", extras=_bias),
    "everything (bias, q/k norm, gptj, partial, llama3), bf16 triton": dict(
        backend="triton", dtype="bfloat16", rope_style="gptj", rotary_dim=8,
        rope_scaling=LLAMA3, extras=lambda: {**_qk_norm(), **_bias()}),
    "x (2, 5, 64) with positions (2, 5), triton": dict(backend="triton", lead=(2, 5)),
    "no tokens (x (0, 64)), triton": dict(backend="triton", lead=(0,)),
    "no tokens (x (0, 64)), reference": dict(backend="reference", lead=(0,)),
    "head_dim 288 on the reference (no kernel limit)": dict(
        backend="reference", heads=dict(num_q_heads=2, num_kv_heads=1, head_dim=288)),
    "hidden 20 (not a multiple of 8), triton": dict(backend="triton", hidden=20),
    "eps 1.0, reference": dict(backend="reference", eps=1.0),
    "GQA 8 over 1 kv head, triton": dict(backend="triton",
                                         heads=dict(num_q_heads=8, num_kv_heads=1, head_dim=8)),
}
for _name, _spec in RQ_VALID.items():
    add("rope", _name, f"rmsnorm_qkv_rope {_name}: q, k, v against float64 math"
        if not _spec.get("versus_reference") else f"rmsnorm_qkv_rope {_name}", rq_case(**_spec))


def _rq_blocks(kind: str) -> Callable[[Path], Outcome]:
    """q/k/v weights (and biases) passed as row blocks: same result as the stacked matrix."""

    def run(_tmp: Path) -> Outcome:
        import torch

        x, norm, weight = rq_inputs()
        bias = _bias()["qkv_bias"]
        p = torch.arange(8)[None]
        split = (NQ * HD, NKV * HD, NKV * HD)
        want = naive_rmsnorm_qkv_rope(x, norm, weight, p, qkv_bias=bias, **HEADS)
        if kind == "copies":
            blocks = tuple(b.clone() for b in weight.split(split))
        elif kind == "views":
            blocks = tuple(weight.split(split))  # adjacent rows of one storage
        elif kind == "reversed storage":
            store = torch.cat(list(reversed(weight.split(split))))  # v, k, q in memory
            v_, k_, q_ = store.split(tuple(reversed(split)))
            blocks = (q_, k_, v_)
        else:  # non-contiguous blocks
            blocks = tuple(b.t().contiguous().t() for b in weight.split(split))
        biases = tuple(bias.split(split))
        return expect_close(lambda: rope_op(x, norm, blocks, p, qkv_bias=biases,
                                            backend="triton", **HEADS), want, 4e-3, (RQ,))

    return run


for _kind in ("copies", "views", "reversed storage", "non-contiguous"):
    add("rope", f"weight and bias as row blocks ({_kind}), triton",
        f"rmsnorm_qkv_rope with qkv_weight=(q, k, v) blocks ({_kind}) and bias blocks",
        _rq_blocks(_kind))


def _compiled_rope() -> tuple[Callable, tuple]:
    import torch

    x, norm, weight = rq_inputs()
    return (lambda x, p: rope_op(x, norm, weight, p, **HEADS, rope_scaling=LLAMA3),
            (x, torch.arange(8)[None]))


add("rope", "torch.compile(fullgraph=True)", "rmsnorm_qkv_rope (llama3 RoPE) inside "
    "torch.compile(backend='eager', fullgraph=True): equal to eager",
    compiled_case(RQ, _compiled_rope), timeout=120)


@scenario("rope", "residual: 4 outputs, new residual is x + residual",
          "rmsnorm_qkv_rope(..., residual=r) returns (q, k, v, x + r) on triton")
def _rq_residual(_tmp: Path) -> Outcome:
    import torch

    x, norm, weight = rq_inputs()
    res = randn(1, 8, HIDDEN, seed=17)
    p = torch.arange(8)[None]
    want = naive_rmsnorm_qkv_rope(x, norm, weight, p, residual=res, **HEADS)
    return expect_close(lambda: rope_op(x, norm, weight, p, residual=res, backend="triton",
                                        **HEADS), want, 4e-3, (RQ,))


@scenario("rope", "x non-contiguous (a transposed view), triton",
          "rmsnorm_qkv_rope on x = y.transpose(0, 1) (tokens not contiguous)")
def _rq_noncontiguous(_tmp: Path) -> Outcome:
    import torch

    _, norm, weight = rq_inputs()
    x = randn(8, 2, HIDDEN, seed=18).transpose(0, 1)
    p = torch.arange(16).reshape(2, 8)
    return expect_close(lambda: rope_op(x, norm, weight, p, backend="triton", **HEADS),
                        naive_rmsnorm_qkv_rope(x, norm, weight, p, **HEADS), 4e-3, (RQ,))


def _rq_grads(backend: str, pos_shape: tuple[int, ...]) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        x, norm, weight = rq_inputs()
        extras = {**_qk_norm(), **_bias()}
        res = randn(1, 8, HIDDEN, seed=19)
        p = torch.full(pos_shape, 5) if pos_shape else torch.tensor(5)
        tensors = [x, res, norm, weight, *extras.values()]
        leaves = [t.clone().requires_grad_() for t in tensors]
        wide = [t.detach().double().requires_grad_() for t in tensors]
        names = list(extras)

        def grads(ts: list, op: Callable) -> tuple:
            outs = op(ts[0], ts[2], ts[3], p, residual=ts[1], **dict(zip(names, ts[4:])),
                      **HEADS)
            loss = sum((o * (i + 1.0)).sin().sum() for i, o in enumerate(outs))
            return torch.autograd.grad(loss, ts)

        want = grads(wide, naive_rmsnorm_qkv_rope)
        return expect_close(lambda: grads(leaves, lambda *a, **k: rope_op(*a, backend=backend,
                                                                           **k)),
                            want, 1e-4 if backend == "reference" else 4e-3, (RQ,))

    return run


add("rope", "gradients of every input, reference", "rmsnorm_qkv_rope backward (residual, bias, "
    "q/k norm) against float64 autograd", _rq_grads("reference", (1, 8)))
add("rope", "gradients of every input, triton forward", "as above with the triton forward",
    _rq_grads("triton", (1, 8)))
add("rope", "gradients with 0-d positions, reference", "rmsnorm_qkv_rope backward with "
    "positions = tensor(5)", _rq_grads("reference", ()))


def rq_bad(**override: Any) -> Callable[[], Any]:
    """An fp32 call (x (1, 8, 64), 4/2 heads of 16) with ``override`` applied."""

    def call() -> Any:
        import torch

        x, norm, weight = rq_inputs()
        args = dict(x=x, norm_weight=norm, qkv_weight=weight,
                    positions=torch.arange(8)[None], **HEADS)
        args.update(resolve(override))
        return rope_op(args.pop("x"), args.pop("norm_weight"), args.pop("qkv_weight"),
                       args.pop("positions"), **args)

    return call


RQ_BAD: dict[str, tuple[str, dict]] = {
    "rope_theta 0": ("rope_theta=0", dict(rope_theta=0)),
    "rope_theta -1": ("rope_theta=-1", dict(rope_theta=-1.0)),
    "rope_theta nan": ("rope_theta=nan", dict(rope_theta=math.nan)),
    "rope_theta inf": ("rope_theta=inf", dict(rope_theta=math.inf)),
    "rope_theta a string": ("rope_theta='1e4'", dict(rope_theta="1e4")),
    "rope_theta True": ("rope_theta=True", dict(rope_theta=True)),
    "rope_theta a list": ("rope_theta=[10000.0]", dict(rope_theta=[10000.0])),
    "rope_theta a tensor": ("rope_theta=torch.tensor(10000.0)",
                            dict(rope_theta=Lazy(lambda: cu(10000)[0].float()))),
    "rope_scaling a string": ("rope_scaling='linear'", dict(rope_scaling="linear")),
    "rope_scaling a list of pairs": ("rope_scaling=[('rope_type', 'linear')]",
                                     dict(rope_scaling=[("rope_type", "linear")])),
    "rope_scaling linear without factor": ("rope_scaling={'rope_type': 'linear'}",
                                           dict(rope_scaling={"rope_type": "linear"})),
    "rope_scaling factor 0": ("rope_scaling linear with factor 0",
                              dict(rope_scaling={"rope_type": "linear", "factor": 0})),
    "rope_scaling factor nan": ("rope_scaling linear with factor nan",
                                dict(rope_scaling={"rope_type": "linear", "factor": math.nan})),
    "rope_scaling factor a string": ("rope_scaling linear with factor '2'",
                                     dict(rope_scaling={"rope_type": "linear", "factor": "2"})),
    "rope_scaling yarn": ("rope_scaling={'rope_type': 'yarn', 'factor': 2.0}",
                          dict(rope_scaling={"rope_type": "yarn", "factor": 2.0})),
    "rope_scaling rope_type None": ("rope_scaling={'rope_type': None}",
                                    dict(rope_scaling={"rope_type": None})),
    "rope_scaling llama3 low >= high": ("llama3 with low_freq_factor 4 > high_freq_factor 1",
                                        dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0,
                                                           "high_freq_factor": 1.0})),
    "rope_scaling llama3 missing keys": ("rope_scaling={'rope_type': 'llama3', 'factor': 8}",
                                         dict(rope_scaling={"rope_type": "llama3",
                                                            "factor": 8.0})),
    "positions float": ("float32 positions", dict(positions=Lazy(lambda: randn(1, 8)))),
    "positions bool": ("bool positions", dict(positions=Lazy(lambda: randn(1, 8) > 0))),
    "positions a list": ("positions=[[0, 1, ...]] (a list)",
                         dict(positions=[list(range(8))])),
    "positions (2, 8) for x (1, 8, 64)": ("positions of shape (2, 8)",
                                          dict(positions=Lazy(lambda: cu(*range(16)).reshape(
                                              2, 8)))),
    "positions (1, 1, 8) for x (1, 8, 64)": ("positions with more dims than x's tokens",
                                             dict(positions=Lazy(lambda: cu(*range(8)).reshape(
                                                 1, 1, 8)))),
    "positions on meta": ("positions on the meta device",
                          dict(positions=Lazy(lambda: meta(1, 8, dtype="int64").make()))),
    "residual (64,)": ("residual of shape (64,) (broadcastable, not equal)",
                       dict(residual=T(HIDDEN))),
    "residual (8, 64) for x (1, 8, 64)": ("residual of shape (8, 64)",
                                          dict(residual=T(8, HIDDEN))),
    "residual bf16 for fp32 x": ("residual in another dtype",
                                 dict(residual=T(1, 8, HIDDEN, dtype="bfloat16"))),
    "x 1-D": ("x of shape (64,)", dict(x=T(HIDDEN), positions=Lazy(lambda: cu(0)[0]))),
    "x int32": ("integer x", dict(x=Lazy(lambda: randn(1, 8, HIDDEN).int()))),
    "x float64": ("float64 x (and weights)", dict(
        x=T(1, 8, HIDDEN, dtype="float64"), norm_weight=T(HIDDEN, dtype="float64"),
        qkv_weight=T(128, HIDDEN, dtype="float64"))),
    "hidden size 0": ("x (4, 0), norm_weight (0,), qkv_weight (128, 0)", dict(
        x=T(4, 0), norm_weight=T(0), qkv_weight=T(128, 0),
        positions=Lazy(lambda: cu(*range(4), dtype="int64")))),
    "num_q_heads 0": ("num_q_heads=0", dict(num_q_heads=0)),
    "num_q_heads '4'": ("num_q_heads='4'", dict(num_q_heads="4")),
    "heads not a multiple": ("num_q_heads=3, num_kv_heads=2", dict(num_q_heads=3,
                                                                   qkv_weight=T(112, HIDDEN))),
    "head_dim 0": ("head_dim=0", dict(head_dim=0)),
    "rotary_dim odd": ("rotary_dim=7", dict(rotary_dim=7)),
    "rotary_dim above head_dim": ("rotary_dim=32 with head_dim 16", dict(rotary_dim=32)),
    "rotary_dim 0": ("rotary_dim=0", dict(rotary_dim=0)),
    "eps 0": ("eps=0", dict(eps=0.0)),
    "eps negative": ("eps=-1e-6", dict(eps=-1e-6)),
    "eps nan": ("eps=nan", dict(eps=math.nan)),
    "rope_style 'GPTJ'": ("rope_style='GPTJ' (upper case)", dict(rope_style="GPTJ")),
    "q_norm_weight without k_norm_weight": ("only q_norm_weight",
                                            dict(q_norm_weight=T(HD))),
    "q_norm_weight of 8": ("q/k_norm_weight of 8 elements for head_dim 16",
                           dict(q_norm_weight=T(8), k_norm_weight=T(8))),
    "qkv_weight with 100 rows": ("qkv_weight of 100 rows (128 needed)",
                                 dict(qkv_weight=T(100, HIDDEN))),
    "qkv_weight blocks summing to 120 rows": ("blocks of 64, 32, 24 rows", dict(
        qkv_weight=Lazy(lambda: (randn(64, HIDDEN), randn(32, HIDDEN), randn(24, HIDDEN))))),
    "qkv_weight an empty list": ("qkv_weight=[]", dict(qkv_weight=[])),
    "qkv_weight a generator": ("qkv_weight=(w for w in [weight])", dict(
        qkv_weight=Lazy(lambda: (w for w in [randn(128, HIDDEN)])))),
    "qkv_weight bf16 for fp32 x": ("qkv_weight in another dtype",
                                   dict(qkv_weight=T(128, HIDDEN, dtype="bfloat16"))),
    "qkv_weight hidden mismatch": ("qkv_weight with 32 columns for hidden 64",
                                   dict(qkv_weight=T(128, 32))),
    "qkv_bias wrong size": ("qkv_bias of 100 elements", dict(qkv_bias=T(100))),
    "norm_weight wrong size": ("norm_weight of 32 elements", dict(norm_weight=T(32))),
    "backend 'bogus'": ("backend='bogus'", dict(backend="bogus")),
    "backend 'cuda' on the CPU": ("backend='cuda' on CPU tensors", dict(backend="cuda")),
    "triton with an odd head_dim": ("backend='triton', head_dim 15 (kernels need even)",
                                    dict(head_dim=15, rotary_dim=14, qkv_weight=T(120, HIDDEN),
                                         backend="triton")),
}
for _name, (_what, _override) in RQ_BAD.items():
    _call = rq_bad(**_override)
    add("rope", f"refuse {_name}", f"rmsnorm_qkv_rope with {_what}: must be refused",
        lambda _tmp, call=_call: expect_error(call, (RQ,)))


# =============================================================================================
# HuggingFace models (shared by the nn and HF patch areas)
# =============================================================================================

HF = "kpt.integrations.hf"
VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
FAMILIES = {  # family: (config class, model class, overrides, attention implementation)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"attention_bias": True}, "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 4, "attn_logit_softcapping": 5.0,
                "query_pre_attn_scalar": 16}, "eager"),
}


def tiny_model(family: str, *, model_class: str | None = None, attn: str | None = None,
               **overrides: Any) -> Any:
    """A 2-layer random-weight model of ``family`` in float32 eval mode (seeded); HF leaves
    biases at zero, so they are made to count."""
    import torch
    import transformers

    config_name, model_name, extra, default_attn = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides},
                                                attn_implementation=attn or default_attn)
    torch.manual_seed(0)
    model = getattr(transformers, model_class or model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_bert() -> Any:
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def hf_patch() -> Any:
    import kpt.integrations.hf as kpt_hf

    return kpt_hf


def token_batch(lengths: Sequence[int], total: int | None = None, left: bool = False,
                seed: int = 0) -> tuple[Any, Any]:
    """Random ids (B, total) and a 0/1 padding mask with the given real lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def model_output(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def patched_vs_hf(model: Any, inputs: dict, *, real: Any = None, tol: float = 1e-4,
                  **patch_options: Any) -> Outcome:
    """The model's outputs on ``inputs`` before and while patched (on the ``real`` tokens when
    a mask is given: pads are don't-care), then unpatched again (bitwise as before)."""
    import torch

    kpt_hf = hf_patch()
    with torch.no_grad():
        want = model_output(model(**inputs))

        def patched() -> Any:
            with kpt_hf.patch(model, **patch_options):
                return model_output(model(**inputs))

        outcome = expect_close(lambda: _pick(patched(), real), _pick(want, real), tol,
                               (HF, FA, RQ))
        if outcome.cls != "b":
            return outcome
        after = model_output(model(**inputs))
    if not torch.equal(after, want):
        return Outcome("c", "outputs after unpatch differ from before patch")
    return outcome


def _pick(t: Any, real: Any) -> Any:
    return t if real is None else t[real.bool()]


# =============================================================================================
# kpt.nn
# =============================================================================================

NN = ("RMSNormQKVRoPE", RQ)


def nn_module(*args: Any, **kwargs: Any) -> Any:
    from kpt.nn import RMSNormQKVRoPE

    return RMSNormQKVRoPE(*args, **kwargs)


def _filled(module: Any) -> Any:
    """Random (seeded) values in every parameter, so that norms and biases count."""
    import torch

    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * (0.1 if base or "bias" in name
                                                                  else p.shape[-1] ** -0.5))
    return module


def _module_truth(module: Any, x: Any, pos: Any, residual: Any = None) -> tuple:
    return naive_rmsnorm_qkv_rope(
        x, module.norm_weight, module.qkv_weight, pos, num_q_heads=module.num_q_heads,
        num_kv_heads=module.num_kv_heads, head_dim=module.head_dim, eps=module.eps,
        qkv_bias=module.qkv_bias, q_norm_weight=module.q_norm_weight,
        k_norm_weight=module.k_norm_weight, rope_theta=module.rope_theta,
        rope_scaling=module.rope_scaling, rotary_dim=module.rotary_dim,
        rope_style=module.rope_style, residual=residual)


def nn_case(dtype: str = "float32", residual: bool = False, **options: Any
            ) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        module = _filled(nn_module(HIDDEN, NQ, NKV, HD, **options))
        if dtype != "float32":
            module = module.to(dtype_of(dtype))
        x = randn(2, 5, HIDDEN, dtype=dtype, seed=22)
        res = randn(2, 5, HIDDEN, dtype=dtype, seed=23) if residual else None
        pos = torch.arange(10).reshape(2, 5)
        with torch.no_grad():
            want = _module_truth(module, x, pos, res)
            return expect_close(lambda: module(x, pos, res), want,
                                TOL[dtype] if dtype != "float32" else 1e-4, NN)

    return run


for _name, _spec in {
    "forward, plain": {},
    "forward with bias, q/k norm, gptj, partial rotary, llama3 scaling": dict(
        bias=True, qk_norm=True, rope_style="gptj", rotary_dim=8, rope_scaling=LLAMA3),
    "forward with a residual": dict(residual=True),
    "bf16 module on the triton backend": dict(dtype="bfloat16", backend="triton"),
    "rope_scaling={} (default RoPE)": dict(rope_scaling={}),
}.items():
    add("nn", _name, f"RMSNormQKVRoPE {_name}: against float64 math", nn_case(**_spec))


@scenario("nn", "parameter gradients", "RMSNormQKVRoPE(bias, qk_norm) backward: every "
          "parameter's gradient against float64 autograd")
def _nn_grads(_tmp: Path) -> Outcome:
    import torch

    module = _filled(nn_module(HIDDEN, NQ, NKV, HD, bias=True, qk_norm=True))
    x = randn(2, 5, HIDDEN, seed=24)
    pos = torch.arange(10).reshape(2, 5)
    params = [p for _, p in module.named_parameters()]
    wide = [p.detach().double().requires_grad_() for p in params]
    names = [n for n, _ in module.named_parameters()]
    kw = dict(zip(names, wide))
    outs = naive_rmsnorm_qkv_rope(
        x, kw["norm_weight"], kw["qkv_weight"], pos, num_q_heads=NQ, num_kv_heads=NKV,
        head_dim=HD, qkv_bias=kw["qkv_bias"], q_norm_weight=kw["q_norm_weight"],
        k_norm_weight=kw["k_norm_weight"])
    want = torch.autograd.grad(sum(o.sin().sum() for o in outs), wide)

    def call() -> Any:
        return torch.autograd.grad(sum(o.sin().sum() for o in module(x, pos)), params)

    return expect_close(call, want, 1e-4, NN)


@scenario("nn", "state_dict round trip", "a fresh RMSNormQKVRoPE loaded with another's "
          "state_dict gives the same outputs")
def _nn_state_dict(_tmp: Path) -> Outcome:
    import torch

    first = _filled(nn_module(HIDDEN, NQ, NKV, HD, bias=True, qk_norm=True))
    second = nn_module(HIDDEN, NQ, NKV, HD, bias=True, qk_norm=True)
    second.load_state_dict(first.state_dict())
    x, pos = randn(1, 4, HIDDEN), torch.arange(4)[None]
    with torch.no_grad():
        return expect_close(lambda: second(x, pos), first(x, pos), 0.0, NN)


@scenario("nn", "deepcopy", "copy.deepcopy of a module gives the same outputs")
def _nn_deepcopy(_tmp: Path) -> Outcome:
    import copy

    import torch

    module = _filled(nn_module(HIDDEN, NQ, NKV, HD, qk_norm=True))
    x, pos = randn(1, 4, HIDDEN), torch.arange(4)[None]
    with torch.no_grad():
        return expect_close(lambda: copy.deepcopy(module)(x, pos), module(x, pos), 0.0, NN)


def hf_qkv(model: Any, x: Any, pos: Any) -> tuple:
    """HF's own q, k, v of layer 0 for hidden states x (B, S, hidden): input norm,
    projections, q/k norm, the model's rotary embedding; returned (B, S, heads, head_dim)."""
    layer = model.model.layers[0]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    batch, seq = x.shape[:2]

    def heads(t: Any) -> Any:
        return t.view(batch, seq, -1, attn.head_dim)

    q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = model.model.rotary_emb(x, pos)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v


def from_hf_case(family: str, as_dict: bool = False, **overrides: Any
                 ) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        from kpt.nn import RMSNormQKVRoPE

        model = tiny_model(family, **overrides)
        layer = model.model.layers[0]
        x = randn(2, 6, 64, seed=25)
        pos = torch.arange(12).reshape(2, 6)
        with torch.no_grad():
            want = hf_qkv(model, x, pos)

            def call() -> Any:
                config = model.config.to_dict() if as_dict else None
                fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, layer.self_attn, config)
                return fused(x, pos)

            return expect_close(call, want, 1e-4, NN)

    return run


for _name, (_family, _over) in {
    "llama": ("llama", {}),
    "qwen2 (bias)": ("qwen2", {}),
    "qwen3 (q/k norm)": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "llama with llama3 rope scaling": ("llama", dict(rope_parameters={
        **LLAMA3, "rope_theta": 500000.0})),
    "llama with partial_rotary_factor=0.5 (which HF's Llama ignores)": (
        "llama", dict(partial_rotary_factor=0.5)),
    "gemma2 (its norms scale by 1 + weight)": ("gemma2", {}),
}.items():
    add("nn", f"from_hf {_name}", f"RMSNormQKVRoPE.from_hf(layer.input_layernorm, "
        f"layer.self_attn) of a tiny {_name} model: q, k, v equal HF's own (or a clear "
        "refusal)", from_hf_case(_family, **_over))
add("nn", "from_hf with the config as a dict", "RMSNormQKVRoPE.from_hf(norm, attn, "
    "config.to_dict()) of a tiny llama: q, k, v equal HF's", from_hf_case("llama", as_dict=True))


@scenario("nn", "from_hf of a yarn model is refused", "RMSNormQKVRoPE.from_hf of a llama with "
          "yarn RoPE, then a forward: must be refused clearly")
def _nn_from_hf_yarn(_tmp: Path) -> Outcome:
    import torch

    from kpt.nn import RMSNormQKVRoPE

    model = tiny_model("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                 "rope_theta": 10000.0})
    layer = model.model.layers[0]

    def call() -> Any:
        fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, layer.self_attn)
        return fused(randn(1, 3, 64), torch.arange(3)[None])

    return expect_error(call, NN)


def nn_bad(args: tuple, options: dict, forward: bool = True) -> Callable[[], Any]:
    def call() -> Any:
        import torch

        module = nn_module(*args, **options)
        if not forward:
            return module
        return module(randn(1, 3, args[0]), torch.arange(3)[None])

    return call


for _name, (_args, _options) in {
    "negative head_dim": ((HIDDEN, NQ, NKV, -16), {}),
    "rope_scaling 'linear' (a string)": ((HIDDEN, NQ, NKV, HD), dict(rope_scaling="linear")),
    "rope_scaling yarn": ((HIDDEN, NQ, NKV, HD), dict(rope_scaling={"rope_type": "yarn",
                                                                    "factor": 2.0})),
    "3 query heads over 2 kv heads": ((HIDDEN, 3, 2, HD), {}),
    "rope_style 'x'": ((HIDDEN, NQ, NKV, HD), dict(rope_style="x")),
    "odd rotary_dim": ((HIDDEN, NQ, NKV, HD), dict(rotary_dim=5)),
    "rope_theta 0": ((HIDDEN, NQ, NKV, HD), dict(rope_theta=0.0)),
    "eps 0": ((HIDDEN, NQ, NKV, HD), dict(eps=0.0)),
    "backend 'bogus'": ((HIDDEN, NQ, NKV, HD), dict(backend="bogus")),
}.items():
    _call = nn_bad(_args, _options)
    add("nn", f"refuse {_name}", f"RMSNormQKVRoPE with {_name} (construction or first "
        "forward): must be refused", lambda _tmp, call=_call: expect_error(call, NN))


@scenario("nn", "refuse float positions", "RMSNormQKVRoPE forward with float positions")
def _nn_float_positions(_tmp: Path) -> Outcome:
    module = nn_module(HIDDEN, NQ, NKV, HD)
    return expect_error(lambda: module(randn(1, 3, HIDDEN), randn(1, 3)), NN)


# =============================================================================================
# HF patch
# =============================================================================================


def hf_case(family: str, inputs: Callable[[], tuple[dict, Any]], *, tol: float = 1e-4,
            dtype: str = "float32", patch_options: dict | None = None,
            **overrides: Any) -> Callable[[Path], Outcome]:
    """Patched outputs of a tiny model against HF's own on ``inputs() -> (kwargs, real)``."""

    def run(_tmp: Path) -> Outcome:
        model = tiny_bert() if family == "bert" else tiny_model(family, **overrides)
        model = model.to(dtype_of(dtype))
        kwargs, real = inputs()
        return patched_vs_hf(model, kwargs, real=real, tol=tol, **(patch_options or {}))

    return run


def padded() -> tuple[dict, Any]:
    ids, mask = token_batch([9, 4, 7, 1])
    return dict(input_ids=ids, attention_mask=mask), mask


def left_padded() -> tuple[dict, Any]:
    ids, mask = token_batch([9, 4, 6], left=True, seed=1)
    return dict(input_ids=ids, attention_mask=mask), mask


def unpadded() -> tuple[dict, Any]:
    ids, _ = token_batch([7, 7], seed=2)
    return dict(input_ids=ids), None


def with_positions(*rows: Sequence[int]) -> Callable[[], tuple[dict, Any]]:
    """Explicit position_ids (one row per sequence), no padding."""

    def make() -> tuple[dict, Any]:
        ids, _ = token_batch([len(rows[0])] * len(rows), seed=3)
        return dict(input_ids=ids, position_ids=cu(*[p for r in rows for p in r],
                                                   dtype="int64").reshape(len(rows), -1)), None

    return make


HF_MATCH: dict[str, tuple[str, Callable[[], tuple[dict, Any]], dict]] = {
    "llama, padded batch": ("llama", padded, {}),
    "qwen2 (bias), padded batch": ("qwen2", padded, {}),
    "qwen3 (q/k norm), padded batch": ("qwen3", padded, {}),
    "mistral (sliding window 4), padded batch": ("mistral", padded, {}),
    "gemma2 (soft-cap, sliding window), padded batch": ("gemma2", padded, {}),
    "bert (encoder), padded batch": ("bert", padded, {}),
    "llama, left-padded batch": ("llama", left_padded, {}),
    "llama, no padding": ("llama", unpadded, {}),
    "llama with partial_rotary_factor=0.5 (HF ignores it)": (
        "llama", padded, dict(partial_rotary_factor=0.5)),
    "qwen3 with partial_rotary_factor=0.5": ("qwen3", padded, dict(partial_rotary_factor=0.5)),
    "llama with llama3 rope scaling": ("llama", padded, dict(rope_parameters={
        **LLAMA3, "rope_theta": 500000.0})),
    "llama with linear rope scaling": ("llama", padded, dict(rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama with dynamic rope scaling (layers skipped, attention patched)": (
        "llama", padded, dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                               "rope_theta": 10000.0})),
    "llama with attention_bias=True": ("llama", padded, dict(attention_bias=True)),
    "llama MQA (one kv head)": ("llama", padded, dict(num_key_value_heads=1)),
    "llama head_dim 288 (attention falls back to SDPA)": ("llama", padded,
                                                          dict(head_dim=288)),
    "qwen2 with use_sliding_window on one layer": ("qwen2", padded, dict(
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "llama, position_ids offset by 3 (consecutive)": (
        "llama", with_positions(range(3, 10)), {}),
    "llama, position_ids with a gap [0..3, 10..12] (batch 1)": (
        "llama", with_positions([0, 1, 2, 3, 10, 11, 12]), {}),
    "llama, position_ids repeated [0, 0, 1, 1, 2, 2, 3]": (
        "llama", with_positions([0, 0, 1, 1, 2, 2, 3]), {}),
    "llama, batch of 2, second row's position_ids jump [0, 1, 5, 6, 7]": (
        "llama", with_positions([0, 1, 2, 3, 4], [0, 1, 5, 6, 7]), {}),
    "llama, mask with a hole [1, 1, 0, 1, 1, 1, 1]": ("llama", lambda: (
        dict(input_ids=token_batch([7], seed=4)[0], attention_mask=cu(1, 1, 0, 1, 1, 1, 1,
                                                                      dtype="int64")[None]),
        cu(1, 1, 0, 1, 1, 1, 1, dtype="int64")[None]), {}),
    "llama, a row that is all padding": ("llama", lambda: (
        dict(input_ids=token_batch([7, 7])[0], attention_mask=token_batch([7, 0], total=7)[1]),
        token_batch([7, 0], total=7)[1]), {}),
    "llama, boolean attention mask": ("llama", lambda: (
        dict(input_ids=token_batch([9, 4])[0], attention_mask=token_batch([9, 4])[1].bool()),
        token_batch([9, 4])[1]), {}),
}
for _name, (_family, _inputs, _over) in HF_MATCH.items():
    add("hf", _name, f"patch(model) of a tiny {_name}: outputs equal HF's own on the real "
        "tokens, and unpatch restores them bitwise", hf_case(_family, _inputs, **_over))
add("hf", "qwen3 bf16 with backend='triton'", "patch(model, backend='triton') of a bf16 qwen3: "
    "logits within bf16 rounding of HF's", hf_case("qwen3", padded, tol=6e-2, dtype="bfloat16",
                                                   patch_options=dict(backend="triton")))
add("hf", "llama fp16 model", "patch(model) of an fp16 llama: logits within fp16 rounding of "
    "HF's", hf_case("llama", padded, tol=5e-3, dtype="float16"))


@scenario("hf", "all-padding batch stays finite", "patch(model) of a llama, a batch whose "
          "rows are all padding: no NaN, no error (HF gives finite garbage)")
def _hf_all_pad(_tmp: Path) -> Outcome:
    import torch

    model = tiny_model("llama")
    ids, mask = token_batch([0, 0], total=6)

    def check() -> str | None:
        with torch.no_grad(), hf_patch().patch(model):
            out = model(ids, attention_mask=mask).logits
        return None if bool(torch.isfinite(out).all()) else "NaN or inf in the logits"

    return expect_ok(check, (HF, FA))


@scenario("hf", "packed batch through the collator's cu_seq_lens kwargs",
          "patch(qwen3); packed sequences of 5, 3, 6 tokens with cu_seq_lens_q/k: each equals "
          "the sequence run alone")
def _hf_packed_kwargs(_tmp: Path) -> Outcome:
    return _hf_packed(use_kwargs=True)


@scenario("hf", "packed batch through restarting position_ids",
          "patch(qwen3); packed sequences with position_ids [0..4, 0..2, 0..5], no KV cache: "
          "each equals the sequence run alone")
def _hf_packed_positions(_tmp: Path) -> Outcome:
    return _hf_packed(use_kwargs=False)


def _hf_packed(use_kwargs: bool) -> Outcome:
    import torch

    model = tiny_model("qwen3")
    lengths = [5, 3, 6]
    seqs = [token_batch([n], seed=10 + i)[0][0] for i, n in enumerate(lengths)]
    packed = torch.cat(seqs)[None]
    # use_cache=False: transformers reads packed sequences from position_ids only without a
    # KV cache (as in training with DataCollatorWithFlattening), and kpt follows it
    kwargs: dict[str, Any] = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
                              "use_cache": False}
    if use_kwargs:
        bounds = cu(0, 5, 8, 14)
        kwargs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=6,
                      max_length_k=6)
    with torch.no_grad():
        want = torch.cat([model(s[None]).logits[0] for s in seqs])

        def call() -> Any:
            with hf_patch().patch(model):
                return model(packed, **kwargs).logits[0]

        return expect_close(call, want, 1e-4, (HF, FA))


def _generate_case(cache: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        import torch

        model = tiny_model("mistral")
        ids, mask = token_batch([6, 3], left=True, seed=3)
        options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        if cache == "static":
            options["cache_implementation"] = "static"

        def check() -> str | None:
            with torch.no_grad():
                want = model.generate(ids, **options)
                with hf_patch().patch(model):
                    got = model.generate(ids, **options)
            return None if torch.equal(got, want) else f"tokens {got.tolist()} != {want.tolist()}"

        return expect_ok(check, (HF, FA))

    return run


add("hf", "greedy generate, dynamic cache", "patch(mistral); model.generate (left padding, "
    "greedy): the same tokens as HF", _generate_case("dynamic"))
add("hf", "greedy generate, static cache", "as above with cache_implementation='static'",
    _generate_case("static"))


@scenario("hf", "patch/unpatch keeps parameters and state_dict",
          "patch then unpatch a qwen2: same parameter objects, state_dict equal, each q/k/v "
          "weight in its own storage again")
def _hf_state(_tmp: Path) -> Outcome:
    import torch

    def check() -> str | None:
        model = tiny_model("qwen2")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        handle = hf_patch().patch(model)
        if list(model.parameters()) != params:
            return "parameters changed while patched"
        patched_state = model.state_dict()
        if patched_state.keys() != state.keys() or not all(
                torch.equal(patched_state[k], state[k]) for k in state):
            return "state_dict differs while patched"
        handle.unpatch()
        if list(model.parameters()) != params:
            return "parameters changed after unpatch"
        if not all(torch.equal(model.state_dict()[k], state[k]) for k in state):
            return "state_dict differs after unpatch"
        attn = model.model.layers[0].self_attn
        if attn.q_proj.weight.untyped_storage().data_ptr() == \
                attn.k_proj.weight.untyped_storage().data_ptr():
            return "q and k weights still share one storage"
        return None

    return expect_ok(check, (HF,))


@scenario("hf", "training gradients equal HF's", "patch(llama).train(); loss.backward() on a "
          "padded batch: every parameter's gradient equals HF's")
def _hf_training(_tmp: Path) -> Outcome:
    ids, mask = token_batch([7, 5, 2], seed=1)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(patched: bool) -> list:
        model = tiny_model("llama").train()
        handle = hf_patch().patch(model) if patched else None
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        if handle is not None:
            handle.unpatch()
        return [p.grad for p in model.parameters()]

    want = grads(False)
    return expect_close(lambda: grads(True), want, 1e-4, (HF, FA, RQ))


@scenario("hf", "save_pretrained while patched", "save_pretrained of a patched qwen2 writes "
          "the same tensors as unpatched")
def _hf_save(tmp: Path) -> Outcome:
    import torch
    from safetensors.torch import load_file

    def check() -> str | None:
        model = tiny_model("qwen2")
        with hf_patch().patch(model):
            model.save_pretrained(tmp / "patched")
        model.save_pretrained(tmp / "plain")
        a = load_file(tmp / "patched" / "model.safetensors")
        b = load_file(tmp / "plain" / "model.safetensors")
        if a.keys() != b.keys():
            return f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        return f"tensors differ: {bad[:4]}" if bad else None

    return expect_ok(check, (HF,))


@scenario("hf", "output_attentions=True on an eager model",
          "patch(llama with attn_implementation='eager'); model(ids, output_attentions=True): "
          "HF returns one attention map per layer; kpt cannot, and must say so (HF's own SDPA "
          "path warns)")
def _hf_output_attentions(_tmp: Path) -> Outcome:
    import logging

    import torch

    model = tiny_model("llama", attn="eager")
    ids, _ = token_batch([6, 6])
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("kpt", "transformers")]

    def check() -> str | None:
        with torch.no_grad():
            want = model(ids, output_attentions=True).attentions
            for lg in loggers:
                lg.addHandler(handler)
            try:
                with hf_patch().patch(model):
                    got = model(ids, output_attentions=True).attentions
            finally:
                for lg in loggers:
                    lg.removeHandler(handler)
        if got is not None and len(got) == len(want) and all(g is not None for g in got):
            return None
        said = [m for m in messages if "attention" in m.lower()]
        if said:
            return None  # warned: documented degradation
        return (f"HF returned {len(want)} attention maps, the patched model "
                f"{summarize(got)} without any warning")

    return expect_ok(check, (HF,))


@scenario("hf", "deepcopy of a patched model, then unpatch(copy)",
          "patch(llama); copy = copy.deepcopy(model); unpatch(copy): the copy must be "
          "restored and the original left patched")
def _hf_deepcopy(_tmp: Path) -> Outcome:
    import copy

    def state(model: Any) -> tuple:
        return (model.config._attn_implementation,
                any("forward" in vars(layer.self_attn) for layer in model.model.layers),
                type(model.model.layers[0].input_layernorm).__name__)

    def check() -> str | None:
        kpt_hf = hf_patch()
        model = tiny_model("llama")
        kpt_hf.patch(model)
        before = state(model)
        clone = copy.deepcopy(model)
        kpt_hf.unpatch(clone)
        problems = []
        if state(clone)[1] or state(clone)[0] == "kpt":
            problems.append(f"the copy is still patched {state(clone)}")
        if state(model) != before:
            problems.append(f"the original changed {before} -> {state(model)}")
        return "; ".join(problems) or None

    return expect_ok(check, (HF,))


@scenario("hf", "torch.save of a patched model", "torch.save(model) while patched (pickling "
          "the whole module), then torch.load: must work or be refused clearly")
def _hf_torch_save(tmp: Path) -> Outcome:
    import torch

    model = tiny_model("llama")
    ids, _ = token_batch([5])

    def check() -> str | None:
        with hf_patch().patch(model):
            torch.save(model, tmp / "model.pt")
        loaded = torch.load(tmp / "model.pt", weights_only=False)
        with torch.no_grad():
            return mismatch(loaded(ids).logits, model(ids).logits, 1e-4)

    return expect_ok(check, (HF, "patch", "kpt"))


@scenario("hf", "patch of a base LlamaModel (no LM head)",
          "patch(LlamaModel): hidden states equal HF's (the fused layers match the pattern "
          "'model.layers.*' only under a ForCausalLM)")
def _hf_base_model(_tmp: Path) -> Outcome:
    model = tiny_model("llama", model_class="LlamaModel")
    kwargs, real = padded()
    return patched_vs_hf(model, kwargs, real=real)


@scenario("hf", "patch a model on the meta device", "patch() of a llama built under "
          "torch.device('meta'): layers skipped with a reason, no error")
def _hf_meta(_tmp: Path) -> Outcome:
    import torch
    import transformers

    def check() -> str | None:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                **TINY, attn_implementation="sdpa"))
        handle = hf_patch().patch(model)
        skipped = dict(handle.skipped)
        handle.unpatch()
        if not any("meta" in " ".join(r) for r in skipped.values()):
            return f"layers were not skipped for meta parameters: {skipped}"
        return None

    return expect_ok(check, (HF,))


@scenario("hf", "unpatch twice and unpatch an unpatched model",
          "handle.unpatch() twice and kpt_hf.unpatch(plain model): no-ops")
def _hf_unpatch_twice(_tmp: Path) -> Outcome:
    def check() -> str | None:
        kpt_hf = hf_patch()
        model = tiny_model("llama")
        handle = kpt_hf.patch(model)
        handle.unpatch()
        handle.unpatch()
        kpt_hf.unpatch(model)
        kpt_hf.unpatch(tiny_model("qwen3"))
        return None if model.config._attn_implementation == "sdpa" else "not restored"

    return expect_ok(check, (HF,))


@scenario("hf", "attn_implementation='kpt' without patch", "a llama built with "
          "attn_implementation='kpt' (import kpt.integrations.hf first): logits equal eager's "
          "on a padded batch")
def _hf_attn_impl(_tmp: Path) -> Outcome:
    import torch

    hf_patch()
    model = tiny_model("llama", attn="kpt")
    ids, mask = token_batch([7, 5])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        want = model(ids, attention_mask=mask).logits
    real = mask.bool()
    return expect_close(lambda: got[real], want[real], 1e-4, (HF,))


@scenario("hf", "4-D additive mask falls back", "patch(llama); a custom additive 4-D mask "
          "(a bias per key): logits equal HF's (documented SDPA fallback)")
def _hf_4d_mask(_tmp: Path) -> Outcome:
    import torch

    model = tiny_model("llama")
    ids, _ = token_batch([6])
    bias = torch.linspace(-3.0, 0.0, 6).expand(1, 1, 6, 6).clone()
    bias = bias.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    return patched_vs_hf(model, dict(input_ids=ids, attention_mask=bias))


def hf_bad(make: Callable[[], Any], names: tuple[str, ...] = (HF, "patch")
           ) -> Callable[[Path], Outcome]:
    return lambda _tmp: expect_error(make, names, track_launches=False)


def _linear() -> Any:
    import torch

    return torch.nn.Linear(2, 2)


def _double_patch() -> Any:
    model = tiny_model("llama")
    hf_patch().patch(model)
    return hf_patch().patch(model)


def _unknown_type() -> Any:
    model = tiny_model("llama")
    model.config.model_type = "gpt2"
    return hf_patch().patch(model)


def _strict_yarn() -> Any:
    model = tiny_model("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                 "rope_theta": 10000.0})
    return hf_patch().patch(model, strict=True)


def _forward_with_backend(backend: str, dtype: str = "float32") -> Callable[[], Any]:
    def call() -> Any:
        import torch

        model = tiny_model("llama").to(dtype_of(dtype))
        ids, mask = token_batch([5, 3])
        with torch.no_grad(), hf_patch().patch(model, backend=backend):
            return model(ids, attention_mask=mask).logits

    return call


add("hf", "refuse a second patch", "patch(model) twice: refused", hf_bad(_double_patch))
add("hf", "refuse an unsupported model_type", "patch() of a model whose model_type is 'gpt2'",
    hf_bad(_unknown_type))
add("hf", "refuse yarn RoPE with strict=True", "patch(yarn llama, strict=True)",
    hf_bad(_strict_yarn))
add("hf", "refuse backend='bogus'", "patch(model, backend='bogus') then a forward: refused "
    "(at patch time or at the first call)",
    hf_bad(_forward_with_backend("bogus"), (HF, FA, RQ)))
add("hf", "refuse backend='triton' on a float32 model", "patch(fp32 llama, backend='triton') "
    "then a forward (Triton attention takes fp16/bf16)",
    hf_bad(_forward_with_backend("triton"), (HF, FA, RQ)))
add("hf", "refuse patch of a non-HF module", "patch(torch.nn.Linear(2, 2))",
    hf_bad(lambda: hf_patch().patch(_linear())))


# =============================================================================================
# autotune DB/CLI
# =============================================================================================

CLI = "kpt-autotune"
FINGERPRINT = "Adversarial GPU/sm_00/1sm/1GiB/cuda0.0"


def good_row(i: int = 0, **extra: Any) -> dict:
    """A valid, valid-flagged row (fake GPU fingerprint) numbered ``i``."""
    return {"op": "flash_attention", "backend": "triton", "config": {"i": i},
            "dtype": "bfloat16", "bucket": f"b{i}", "fingerprint": FINGERPRINT, "valid": 1,
            "is_default": 0, "median_us": 10.0 + i, "spread": 0.01, "samples": 20, **extra}


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows_file(path: Path, rows: Sequence[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def cli(tmp: Path, *args: str, stdin: str | None = None, db: Path | None = None,
        timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
    """``kpt-autotune ARGS`` in ``tmp`` with its own database (default ``tmp/a.db``)."""
    script = Path(sys.executable).parent / "kpt-autotune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "kpt.autotune.cli"]
    environment = child_env(KPT_AUTOTUNE_DB=str(db or tmp / "a.db"),
                            KPT_CACHE_DIR=str(tmp / "cache"), **env)
    try:
        return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True,
                              cwd=tmp, env=environment, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout} s")


def stored_count(tmp: Path, db: Path | None = None) -> int | None:
    """Rows ``export -`` sees (None when export fails)."""
    done = cli(tmp, "export", "-", db=db)
    if done.returncode != 0:
        return None
    return sum(1 for line in done.stdout.splitlines() if line.strip())


def cli_refused(done: subprocess.CompletedProcess, *words: str) -> Outcome:
    """Classify a CLI run that had to fail: (a) one ``error:`` line naming ``words``, a
    non-zero exit, no traceback; (d) exit 4 ("unexpected") or a message without them; (e) a
    traceback or a signal; (c) exit 0 (it reported success)."""
    err = done.stderr
    if "Traceback (most recent call last)" in err:
        return Outcome("e", "traceback: " + one_line(err.strip().splitlines()[-1]))
    if done.returncode < 0:
        return Outcome("e", f"killed by {signal_name(done.returncode)}")
    if done.returncode == 0:
        return Outcome("c", "exit 0: " + one_line(done.stdout or err or "(no output)"))
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    shown = one_line(f"exit {done.returncode}: " + " | ".join(errors or err.splitlines()))
    if done.returncode == 4:
        return Outcome("d", shown)
    if len(errors) == 1 and all(w.lower() in errors[0].lower() for w in words):
        return Outcome("a", shown)
    return Outcome("d", shown + (f" (does not name {', '.join(words)})" if words else ""))


def cli_ok(done: subprocess.CompletedProcess, check: Callable[[], str | None] = lambda: None
           ) -> Outcome:
    """Classify a CLI run that had to succeed: (b) exit 0 and ``check()`` None."""
    if "Traceback (most recent call last)" in done.stderr:
        return Outcome("e", "traceback: " + one_line(done.stderr.strip().splitlines()[-1]))
    if done.returncode < 0:
        return Outcome("e", f"killed by {signal_name(done.returncode)}")
    if done.returncode != 0:
        outcome = cli_refused(done)
        if outcome.cls == "a":
            return Outcome("a", outcome.detail, rejected_valid=True)
        return outcome
    reason = check()
    return Outcome("b", one_line(done.stdout or "ok", 120)) if reason is None else \
        Outcome("c", one_line(reason))


def bad_import(lines: Callable[[], list[str]], *words: str) -> Callable[[Path], Outcome]:
    """Import a file of two good rows, ``lines()``, one more good row: refused as a whole."""

    def run(tmp: Path) -> Outcome:
        body = [json.dumps(good_row(1)), json.dumps(good_row(2)), *lines(),
                json.dumps(good_row(3))]
        path = write_lines(tmp / "rows.jsonl", body)
        outcome = cli_refused(cli(tmp, "import", str(path)), *words)
        count = stored_count(tmp)
        if outcome.cls == "a" and count:
            return Outcome("c", f"refused, yet {count} rows were stored")
        return outcome

    return run


def _row_line(**extra: Any) -> list[str]:
    return [json.dumps(good_row(9, **extra))]


BAD_IMPORTS: dict[str, tuple[Callable[[], list[str]], tuple[str, ...]]] = {
    "median_us NaN": (lambda: _row_line(median_us=math.nan), ("line 3", "median_us")),
    "median_us -5": (lambda: _row_line(median_us=-5), ("line 3", "median_us")),
    "median_us 0": (lambda: _row_line(median_us=0), ("line 3", "median_us")),
    "median_us 1e400 (overflows a double)": (
        lambda: [json.dumps(good_row(9)).replace('"median_us": 19.0', '"median_us": 1e400')],
        ("line 3", "median_us")),
    "median_us Infinity": (lambda: _row_line(median_us=math.inf), ("line 3", "median_us")),
    "median_us a string": (lambda: _row_line(median_us="5"), ("line 3", "median_us")),
    "samples 10**30 (beyond 64 bits)": (lambda: _row_line(samples=10**30),
                                        ("line 3", "samples")),
    "samples of 5000 digits": (
        lambda: [json.dumps(good_row(9)).replace('"samples": 20', '"samples": ' + "9" * 5000)],
        ("line 3",)),
    "samples 2.5": (lambda: _row_line(samples=2.5), ("line 3", "samples")),
    "spread negative": (lambda: _row_line(spread=-0.5), ("line 3", "spread")),
    "valid flag 7": (lambda: _row_line(valid=7), ("line 3", "valid")),
    "op an integer": (lambda: _row_line(op=2**70), ("line 3", "op")),
    "backend empty": (lambda: _row_line(backend=""), ("line 3", "backend")),
    "config a list": (lambda: _row_line(config=[1, 2]), ("line 3", "config")),
    "config not JSON text": (lambda: _row_line(config="{not json"), ("line 3", "config")),
    "config nested 60 deep": (lambda: _row_line(config={"a": json.loads("[" * 60 + "]" * 60)}),
                              ("line 3", "config")),
    "config holding 2**70": (lambda: _row_line(config={"split": 2**70}), ("line 3", "config")),
    "config holding NaN": (lambda: _row_line(config={"split": math.nan}), ("line 3", "config")),
    "a line nested 100000 deep": (lambda: ["[" * 100_000 + "]" * 100_000], ("line 3",)),
    "an object nested 100000 deep": (
        lambda: ['{"op": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001], ("line 3",)),
    "a truncated line": (lambda: ['{"op": "x",'], ("line 3",)),
    "a JSON string instead of a row": (lambda: ['"a row"'], ("line 3",)),
    "a lone surrogate escape in op": (
        lambda: [json.dumps(good_row(9)).replace('"op": "flash_attention"', '"op": "\\ud800"')],
        ("line 3",)),
}
for _name, (_lines, _words) in BAD_IMPORTS.items():
    add("autotune", f"import refuses {_name}", f"{CLI} import of a file whose third row has "
        f"{_name}: exit 2 naming the line (and field), nothing stored", bad_import(_lines,
                                                                               *_words))


@scenario("autotune", "import then export round trip",
          f"{CLI} import of 5 rows, then export: the same rows come back")
def _at_round_trip(tmp: Path) -> Outcome:
    rows = [good_row(i) for i in range(5)]
    path = rows_file(tmp / "rows.jsonl", rows)

    def check() -> str | None:
        out = tmp / "out.jsonl"
        done = cli(tmp, "export", str(out))
        if done.returncode:
            return f"export failed: {one_line(done.stderr)}"
        back = [json.loads(line) for line in out.read_text().splitlines()]
        got = sorted((r["bucket"], r["median_us"], json.loads(r["config"])["i"]) for r in back)
        want = sorted((r["bucket"], r["median_us"], r["config"]["i"]) for r in rows)
        return None if got == want else f"exported {got}, imported {want}"

    return cli_ok(cli(tmp, "import", str(path)), check)


def _count_is(tmp: Path, expected: int) -> Callable[[], str | None]:
    def check() -> str | None:
        count = stored_count(tmp)
        return None if count == expected else f"{count} rows stored, expected {expected}"

    return check


IMPORT_OK: dict[str, tuple[Callable[[Path], tuple[list[str], str | None]], int]] = {
    "an empty file": (lambda tmp: (["import", str(write_lines(tmp / "e.jsonl", []))], None), 0),
    "a JSON array": (lambda tmp: (["import", str(_write(tmp / "a.json", json.dumps(
        [good_row(i) for i in range(3)])))], None), 3),
    "stdin ('-')": (lambda tmp: (["import", "-"], "".join(json.dumps(good_row(i)) + "\n"
                                                          for i in range(4))), 4),
    "CRLF line endings": (lambda tmp: (["import", str(_write(tmp / "crlf.jsonl", "".join(
        json.dumps(good_row(i)) + "\r\n" for i in range(3))))], None), 3),
    "the same key twice (last wins)": (lambda tmp: (["import", str(rows_file(
        tmp / "dup.jsonl", [good_row(1), good_row(1, median_us=99.0)]))], None), 1),
    "SQL in the fingerprint": (lambda tmp: (["import", str(rows_file(
        tmp / "sql.jsonl", [good_row(1, fingerprint="x'); DROP TABLE results; --"),
                            good_row(2)]))], None), 2),
    "10000 rows": (lambda tmp: (["import", str(rows_file(
        tmp / "many.jsonl", [good_row(i) for i in range(10_000)]))], None), 10_000),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


for _name, (_make, _count) in IMPORT_OK.items():
    def _run(tmp: Path, make: Callable = _make, count: int = _count) -> Outcome:
        args, stdin = make(tmp)
        return cli_ok(cli(tmp, *args, stdin=stdin), _count_is(tmp, count))

    add("autotune", f"import {_name}", f"{CLI} import of {_name}: exit 0, "
        f"{_count} rows stored", _run)


@scenario("autotune", "import of a UTF-8 file with a BOM",
          f"{CLI} import of a JSON Lines file saved with a UTF-8 byte order mark")
def _at_bom(tmp: Path) -> Outcome:
    path = tmp / "bom.jsonl"
    path.write_text(json.dumps(good_row(1)) + "\n", encoding="utf-8-sig")
    done = cli(tmp, "import", str(path))
    if done.returncode == 0:
        return cli_ok(done, _count_is(tmp, 1))
    return cli_refused(done, "line 1")


@scenario("autotune", "import of a binary file", f"{CLI} import of 2 KB of random bytes")
def _at_binary(tmp: Path) -> Outcome:
    path = tmp / "bin.jsonl"
    path.write_bytes(bytes(range(256)) * 8)
    return cli_refused(cli(tmp, "import", str(path)), str(path.name))


@scenario("autotune", "import of a missing file", f"{CLI} import /nonexistent/rows.jsonl")
def _at_missing(tmp: Path) -> Outcome:
    return cli_refused(cli(tmp, "import", "/nonexistent/rows.jsonl"), "cannot read")


def _corrupt(path: Path, size: int = 5000) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@scenario("autotune", "import into a corrupt database file",
          f"{CLI} import when the database file is random bytes: moved aside, rows stored")
def _at_import_corrupt(tmp: Path) -> Outcome:
    _corrupt(tmp / "a.db")
    path = rows_file(tmp / "rows.jsonl", [good_row(i) for i in range(3)])

    def check() -> str | None:
        aside = list(tmp.glob("a.db.corrupt-*"))
        return _count_is(tmp, 3)() or (None if aside else "the corrupt file was not kept")

    return cli_ok(cli(tmp, "import", str(path)), check)


@scenario("autotune", "import into a truncated database",
          f"{CLI} import when the database lost its second half (a crash mid-copy)")
def _at_truncated(tmp: Path) -> Outcome:
    rows_file(tmp / "first.jsonl", [good_row(i) for i in range(200)])
    done = cli(tmp, "import", str(tmp / "first.jsonl"))
    if done.returncode:
        raise CannotSetUp(f"seeding the database failed: {one_line(done.stderr)}")
    data = (tmp / "a.db").read_bytes()
    (tmp / "a.db").write_bytes(data[: len(data) // 2])
    for side in ("a.db-wal", "a.db-shm"):
        (tmp / side).unlink(missing_ok=True)
    path = rows_file(tmp / "rows.jsonl", [good_row(i) for i in range(500, 503)])
    done = cli(tmp, "import", str(path))
    if done.returncode == 0:
        return cli_ok(done, lambda: None if (stored_count(tmp) or 0) >= 3 else
                      f"{stored_count(tmp)} rows readable after the import")
    return cli_refused(done, "a.db")


for _command in ("show --all", "export -", "doctor"):
    def _run(tmp: Path, command: str = _command) -> Outcome:
        _corrupt(tmp / "a.db")
        done = cli(tmp, *command.split())
        if command == "doctor":  # documented: reports the database as unavailable, exit 0
            return cli_ok(done, lambda: None if "unavailable" in done.stdout else
                          "doctor did not report the corrupt database")
        return cli_refused(done, "corrupt")

    add("autotune", f"{_command} with a corrupt database", f"{CLI} {_command} when the "
        "database file is random bytes: one clear line (doctor: reported, exit 0)", _run)


@scenario("autotune", "database path is a directory",
          f"KPT_AUTOTUNE_DB pointing at a directory: {CLI} import refused")
def _at_db_dir(tmp: Path) -> Outcome:
    (tmp / "dir.db").mkdir()
    path = rows_file(tmp / "rows.jsonl", [good_row(1)])
    return cli_refused(cli(tmp, "import", str(path), db=tmp / "dir.db"), "dir.db")


@scenario("autotune", "database in missing nested folders",
          f"KPT_AUTOTUNE_DB=tmp/x/y/z/a.db: {CLI} import creates the folders")
def _at_nested(tmp: Path) -> Outcome:
    db = tmp / "x" / "y" / "z" / "a.db"
    path = rows_file(tmp / "rows.jsonl", [good_row(1), good_row(2)])
    return cli_ok(cli(tmp, "import", str(path), db=db),
                  lambda: None if stored_count(tmp, db) == 2 else "rows not readable")


@scenario("autotune", "database at /dev/null", f"KPT_AUTOTUNE_DB=/dev/null: {CLI} import")
def _at_dev_null(tmp: Path) -> Outcome:
    path = rows_file(tmp / "rows.jsonl", [good_row(1)])
    return cli_refused(cli(tmp, "import", str(path), db=Path("/dev/null")), "/dev/null")


def _seeded(tmp: Path, folder: str = "ro", rows: int = 7) -> Path:
    """A database with ``rows`` rows in ``tmp/folder``, closed cleanly (no -wal left)."""
    (tmp / folder).mkdir()
    db = tmp / folder / "a.db"
    done = cli(tmp, "import", str(rows_file(tmp / "seed.jsonl", [good_row(i) for i in
                                                                 range(rows)])), db=db)
    if done.returncode:
        raise CannotSetUp(f"seeding the database failed: {one_line(done.stderr)}")
    return db


@scenario("autotune", "read-only folder: export reads in place",
          f"{CLI} export of a database in a folder nobody may write (chattr +i)")
def _at_ro_export(tmp: Path) -> Outcome:
    db = _seeded(tmp)
    with read_only(db.parent):
        done = cli(tmp, "export", str(tmp / "out.jsonl"), db=db)
    return cli_ok(done, lambda: None if len((tmp / "out.jsonl").read_text().splitlines()) == 7
                  else "not every row exported")


@scenario("autotune", "read-only folder: import refused, rows kept",
          f"{CLI} import into a database in a read-only folder: exit 3, nothing claimed")
def _at_ro_import(tmp: Path) -> Outcome:
    db = _seeded(tmp)
    path = rows_file(tmp / "rows.jsonl", [good_row(50)])
    with read_only(db.parent):
        done = cli(tmp, "import", str(path), db=db)
    outcome = cli_refused(done, "a.db")
    if outcome.cls == "a" and stored_count(tmp, db) != 7:
        return Outcome("c", f"refused, but the database now has {stored_count(tmp, db)} rows")
    return outcome


@scenario("autotune", "read-only folder: clear refused",
          f"{CLI} clear --yes of a database in a read-only folder")
def _at_ro_clear(tmp: Path) -> Outcome:
    db = _seeded(tmp)
    with read_only(db.parent):
        done = cli(tmp, "clear", "--yes", db=db)
    return cli_refused(done, "a.db")


@scenario("autotune", "read-only database file: import refused",
          f"{CLI} import into a database file that is itself immutable (folder writable)")
def _at_ro_file(tmp: Path) -> Outcome:
    db = _seeded(tmp)
    path = rows_file(tmp / "rows.jsonl", [good_row(50)])
    with read_only(db):
        done = cli(tmp, "import", str(path), db=db)
    return cli_refused(done, "readonly")


def _wal_with_rows(tmp: Path, keep_shm: bool) -> Path:
    """A database whose last commit (deleting 2 of 7 rows) lives only in its -wal file."""
    db = _seeded(tmp)
    code = ("import sqlite3, os, sys\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "c.execute('pragma wal_autocheckpoint=0')\n"
            "c.execute(\"delete from results where bucket in ('b0', 'b1')\")\n"
            "c.commit()\n"
            "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True)
    wal = Path(f"{db}-wal")
    if done.returncode or not wal.is_file() or wal.stat().st_size == 0:
        raise CannotSetUp("could not leave committed rows in the -wal file")
    if not keep_shm:
        Path(f"{db}-shm").unlink(missing_ok=True)
    return db


@scenario("autotune", "read-only folder with rows in the -wal (and -shm)",
          f"{CLI} export of a database whose last commit is only in its -wal file, folder "
          "read-only, -shm present: the 5 committed rows")
def _at_wal_shm(tmp: Path) -> Outcome:
    db = _wal_with_rows(tmp, keep_shm=True)
    with read_only(db.parent):
        done = cli(tmp, "export", "-", db=db)
    return cli_ok(done, lambda: None if len(done.stdout.splitlines()) == 5 else
                  f"exported {len(done.stdout.splitlines())} rows, 5 are committed")


@scenario("autotune", "read-only folder with rows in the -wal, no -shm",
          f"{CLI} export as above without the -shm file: the 5 committed rows, or a clear "
          "refusal (never the 7 stale ones)")
def _at_wal_noshm(tmp: Path) -> Outcome:
    db = _wal_with_rows(tmp, keep_shm=False)
    with read_only(db.parent):
        done = cli(tmp, "export", "-", db=db)
    if done.returncode == 0:
        return cli_ok(done, lambda: None if len(done.stdout.splitlines()) == 5 else
                      f"exported {len(done.stdout.splitlines())} rows, 5 are committed")
    return cli_refused(done, "wal")


EXPORT_BAD = {
    "export to a missing folder": (["export", "/nonexistent/dir/out.jsonl"], ("cannot write",)),
    "export to a directory": (["export", "."], ("cannot write",)),
    "export to /dev/full": (["export", "/dev/full"], ("/dev/full",)),
    "export --ship without a GPU": (["export", "--ship"], ("fingerprint",)),
    "export --fingerprint without --ship": (["export", "out.jsonl", "--fingerprint", "x"],
                                            ("--ship",)),
    "export without a file": (["export"], ("FILE",)),
    "clear without --yes (not a terminal)": (["clear"], ("--yes",)),
    "an unknown command": (["bogus"], ("invalid choice",)),
    "warmup --tokens 0": (["warmup", "--model", "x.json", "--tokens", "0"], ("tokens",)),
    "warmup --tokens abc": (["warmup", "--model", "x.json", "--tokens", "abc"], ("tokens",)),
    "warmup --model of a missing file": (["warmup", "--model", "/nonexistent.json"],
                                         ("cannot read",)),
    "warmup --dtype int8": (["warmup", "--model", "cfg.json", "--dtype", "int8"], ("dtype",)),
    "warmup --shapes without --op": (["warmup", "--shapes", "[{}]"], ("--op",)),
    "warmup --shapes of numbers": (["warmup", "--shapes", "[1, 2]", "--op", "flash_attention"],
                                   ("--shapes",)),
    "warmup --model of a JSON list": (["warmup", "--model", "list.json"], ("JSON object",)),
    "warmup --op unknown": (["warmup", "--model", "cfg.json", "--op", "nope"], ("nope",)),
}
for _name, (_args, _words) in EXPORT_BAD.items():
    def _run(tmp: Path, args: list[str] = _args, words: tuple = _words) -> Outcome:
        _seeded(tmp, "db", rows=3)
        _write(tmp / "cfg.json", json.dumps({**TINY, "model_type": "llama"}))
        _write(tmp / "list.json", "[1, 2]")
        return cli_refused(cli(tmp, *args, db=tmp / "db" / "a.db"), *words)

    add("autotune", _name, f"{CLI} {' '.join(_args)}: refused in one line", _run)


@scenario("autotune", "clear refused leaves the rows", f"{CLI} clear without --yes, stdin not "
          "a terminal: refused, and every row is still there")
def _at_clear_kept(tmp: Path) -> Outcome:
    db = _seeded(tmp, "db", rows=4)
    cli(tmp, "clear", db=db)
    return cli_ok(cli(tmp, "export", "-", db=db), lambda: None if stored_count(tmp, db) == 4
                  else f"{stored_count(tmp, db)} of 4 rows left")


@scenario("autotune", "clear --yes and clear --op", f"{CLI} clear --op other --yes deletes "
          "only that op's rows; clear --yes deletes the rest")
def _at_clear(tmp: Path) -> Outcome:
    path = rows_file(tmp / "rows.jsonl", [good_row(1), good_row(2, op="other")])
    cli(tmp, "import", str(path))

    def check() -> str | None:
        if stored_count(tmp) != 1:
            return f"{stored_count(tmp)} rows after clear --op (1 expected)"
        done = cli(tmp, "clear", "--yes")
        if done.returncode or stored_count(tmp) != 0:
            return f"clear --yes left {stored_count(tmp)} rows"
        return None

    return cli_ok(cli(tmp, "clear", "--op", "other", "--yes"), check)


for _name, _args in {
    "warmup on a CPU machine": ["warmup", "--model", "cfg.json", "--tokens", "1,16"],
    "show --fingerprint of an unknown GPU": ["show", "--fingerprint", "Nobody's GPU"],
    "show --all with no database": ["show", "--all"],
    "export with no database": ["export", "out.jsonl"],
    "doctor": ["doctor"],
}.items():
    def _run(tmp: Path, args: list[str] = _args) -> Outcome:
        _write(tmp / "cfg.json", json.dumps({**TINY, "model_type": "llama"}))
        done = cli(tmp, *args)
        created = (tmp / "a.db").exists() and args[0] != "warmup"
        return cli_ok(done, lambda: "a read-only command created the database" if created
                      else None)

    add("autotune", _name, f"{CLI} {' '.join(_args)}: exit 0 (documented), nothing created",
        _run)


def _concurrent(tmp: Path, corrupt_first: bool) -> Outcome:
    """Six processes import 50 different rows each into one database at once."""
    if corrupt_first:
        _corrupt(tmp / "a.db")
    files = [rows_file(tmp / f"w{i}.jsonl", [good_row(1000 * i + j) for j in range(50)])
             for i in range(6)]
    script = Path(sys.executable).parent / "kpt-autotune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "kpt.autotune.cli"]
    env = child_env(KPT_AUTOTUNE_DB=str(tmp / "a.db"), KPT_CACHE_DIR=str(tmp / "cache"))
    procs = [subprocess.Popen([*cmd, "import", str(f)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
             for f in files]
    outputs = [p.communicate(timeout=120) for p in procs]
    failed = [(p.returncode, err) for p, (_, err) in zip(procs, outputs) if p.returncode]
    if failed:
        code, err = failed[0]
        return cli_refused(subprocess.CompletedProcess([], code, "", err))
    claimed = sum(int(out.split()[1]) for out, _ in outputs if out.startswith("imported"))
    count = stored_count(tmp)
    if count != 300 or claimed != 300:
        return Outcome("c", f"{claimed} rows reported imported, {count} stored (300 expected)")
    aside = list(tmp.glob("a.db.corrupt-*"))
    if corrupt_first and len(aside) != 1:
        return Outcome("c", f"{len(aside)} copies of the corrupt file moved aside (1 expected)")
    return Outcome("b", "300 rows reported and stored")


add("autotune", "six concurrent writers", f"six {CLI} import processes at once (50 rows each) "
    "into one new database: 300 rows reported and stored",
    lambda tmp: _concurrent(tmp, corrupt_first=False), timeout=180)
add("autotune", "six concurrent writers on a corrupt file", "as above, the database file "
    "being random bytes: moved aside once, 300 rows stored",
    lambda tmp: _concurrent(tmp, corrupt_first=True), timeout=180)


def _foreign_db(tmp: Path, schema: str) -> Path:
    import sqlite3

    db = tmp / "a.db"
    conn = sqlite3.connect(db)
    conn.executescript(schema)
    conn.commit()
    conn.close()
    return db


@scenario("autotune", "import into another program's SQLite file",
          f"{CLI} import into a valid SQLite database without a results table")
def _at_foreign(tmp: Path) -> Outcome:
    _foreign_db(tmp, "create table notes (id integer primary key, text text);"
                     "insert into notes(text) values ('keep me');")
    path = rows_file(tmp / "rows.jsonl", [good_row(1)])
    return cli_ok(cli(tmp, "import", str(path)), _count_is(tmp, 1))


@scenario("autotune", "import into a results table of another schema",
          f"{CLI} import into a database whose 'results' table has other columns (another "
          "program, or an incompatible kpt)")
def _at_schema_import(tmp: Path) -> Outcome:
    _foreign_db(tmp, "create table results (op text, backend text);")
    path = rows_file(tmp / "rows.jsonl", [good_row(1)])
    return cli_refused(cli(tmp, "import", str(path)), "a.db")


@scenario("autotune", "export of a results table of another schema",
          f"{CLI} export of a database whose 'results' table has other columns")
def _at_schema_export(tmp: Path) -> Outcome:
    _foreign_db(tmp, "create table results (op text, backend text);")
    return cli_refused(cli(tmp, "export", "-"), "a.db")


@scenario("autotune", "a hand-written invalid row in the database",
          f"a row with median_us = -1 written into the database with sqlite3: {CLI} export "
          "exports the good rows and says the bad one was left out (exit 3)")
def _at_hand_row(tmp: Path) -> Outcome:
    import sqlite3

    db = _seeded(tmp, "db", rows=3)
    conn = sqlite3.connect(db)
    conn.execute("update results set median_us = -1 where bucket = 'b0'")
    conn.commit()
    conn.close()
    done = cli(tmp, "export", str(tmp / "out.jsonl"), db=db)
    outcome = cli_refused(done, "not valid")
    if outcome.cls != "a":
        return outcome
    if len((tmp / "out.jsonl").read_text().splitlines()) != 2:
        return Outcome("c", "the valid rows were not all exported")
    return Outcome("b", f"documented: the 2 valid rows exported, then {outcome.detail}")


def _api(call: Callable[[Path], Any], names: tuple[str, ...] = ("field",)
         ) -> Callable[[Path], Outcome]:
    return lambda tmp: expect_error(lambda: call(tmp), names, track_launches=False)


def _write_api(rows: list[dict]) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        from kpt.autotune import db

        with db.ResultsDB.open(tmp / "api.db") as database:
            return database.write(rows)

    return call


add("autotune", "ResultsDB.write refuses a NaN time", "kpt.autotune.db.ResultsDB.write of a "
    "row with median_us=nan: RowError naming the field, nothing written",
    _api(_write_api([good_row(1, median_us=math.nan)]), ("median_us",)))
add("autotune", "ResultsDB.write refuses a 65-bit sample count", "ResultsDB.write of a row "
    "with samples=2**64", _api(_write_api([good_row(1, samples=2**64)]), ("samples",)))
add("autotune", "ResultsDB.write refuses a row that is a list", "ResultsDB.write([[1, 2]])",
    _api(_write_api([[1, 2]]), ("row",)))  # type: ignore[list-item]


@scenario("autotune", "a reader sees a writer's committed rows at once",
          "ResultsDB.write in one connection returns; a new reader connection sees every row")
def _at_reader(tmp: Path) -> Outcome:
    def check() -> str | None:
        from kpt.autotune import db

        with db.ResultsDB.open(tmp / "api.db") as writer:
            written = writer.write([good_row(i) for i in range(20)])
            with db.ResultsDB.open(tmp / "api.db", readonly=True) as reader:
                seen = reader.count()
        return None if written == seen == 20 else f"wrote {written}, reader saw {seen}"

    return expect_ok(check, ("autotune",))


# =============================================================================================
# JIT cache (a toy C extension built through kpt.jit: seconds, not the minutes of a real op)
# =============================================================================================

TOY = "kpt_adv_toy"
TOY_SOURCE = "advtoy/binding.cpp"
TOY_BINDING = r"""
#include <Python.h>
#include "kpt/advtoy.h"

#define ADV_STR2(x) #x
#define ADV_STR(x) ADV_STR2(x)
#define ADV_CAT2(a, b) a##b
#define ADV_CAT(a, b) ADV_CAT2(a, b)

static PyObject* add(PyObject*, PyObject* args) {
  long a, b;
  if (!PyArg_ParseTuple(args, "ll", &a, &b)) return nullptr;
  return PyLong_FromLong(a + b + ADV_OFFSET);
}

static PyMethodDef kMethods[] = {{"add", add, METH_VARARGS, "a + b + ADV_OFFSET"},
                                 {nullptr, nullptr, 0, nullptr}};
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, ADV_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                              kMethods};

PyMODINIT_FUNC ADV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
"""
# Run in a child process: load (or build) the toy spec, print one JSON line with the result
# or the error; kpt's INFO log (which says when a build starts) goes to stderr.
TOY_LOAD = f"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from kpt.jit import JitSpec
spec = JitSpec({TOY!r}, ({TOY_SOURCE!r},))
try:
    print(json.dumps({{"value": spec.load().add(2, 3)}}))
except Exception as err:
    print(json.dumps({{"type": type(err).__name__, "message": str(err)}}))
"""
JIT_CLEAR = frozenset({"BuildError", "CompilerMissing", "ValueError", "TypeError"})


def toy_tree(root: Path, offset: int = 0, binding: str = TOY_BINDING) -> Path:
    """A csrc tree holding the toy extension: include/kpt/advtoy.h and advtoy/binding.cpp."""
    (root / "include" / "kpt").mkdir(parents=True, exist_ok=True)
    (root / "advtoy").mkdir(parents=True, exist_ok=True)
    (root / "include" / "kpt" / "advtoy.h").write_text(f"#define ADV_OFFSET {offset}\n")
    (root / TOY_SOURCE).write_text(binding)
    return root


def load_toy(csrc: Path, cache: Path, **env: str | None) -> tuple[subprocess.CompletedProcess,
                                                                  dict]:
    """Load the toy in a fresh process: (the process, its JSON answer or {})."""
    settings: dict[str, str | None] = {"KPT_DISABLE_JIT": None, **env}
    done = run_python(TOY_LOAD, env=child_env(KPT_CSRC_DIR=str(csrc), KPT_CACHE_DIR=str(cache),
                                              **settings), timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return done, json.loads(lines[-1]) if lines else {}


def builds(done: subprocess.CompletedProcess) -> int:
    return done.stderr.count("building JIT extension")


def toy_outcome(done: subprocess.CompletedProcess, answer: dict, *, expect_value: int | None,
                names: Sequence[str] = (TOY,), max_builds: int | None = None,
                error_ok: bool = False) -> Outcome:
    """(b) the expected value (with at most ``max_builds`` compiler runs); for an expected
    failure (``expect_value`` None, or ``error_ok``) (a) a clear error naming ``names``; (e) a
    dead process."""
    if done.returncode < 0 or (done.returncode and not answer):
        how = (f"killed by {signal_name(done.returncode)}" if done.returncode < 0 else
               f"exit {done.returncode}")
        tail = " | ".join(ln for ln in done.stderr.splitlines()[-2:] if ln.strip())
        return Outcome("e", one_line(f"the loading process {how}; {tail}"))
    if "value" in answer:
        if expect_value is None:
            return Outcome("c", f"loaded (add(2, 3) = {answer['value']}) where it must fail")
        if answer["value"] != expect_value:
            return Outcome("c", f"add(2, 3) = {answer['value']}, expected {expect_value}")
        if max_builds is not None and builds(done) > max_builds:
            return Outcome("c", f"{builds(done)} compiler runs, at most {max_builds} expected")
        return Outcome("b", f"add(2, 3) = {answer['value']}, {builds(done)} build(s)")
    text = one_line(f"{answer['type']}: {answer['message']}")
    clear = answer["type"] in JIT_CLEAR and any(n in answer["message"] for n in names)
    if clear:
        return Outcome("a", text, rejected_valid=expect_value is not None and not error_ok)
    return Outcome("d", text)


_GOLDEN: dict[str, Path] = {}


def golden_cache() -> Path:
    """A finished toy build, made once per worker and copied by the scenarios that damage it."""
    if "cache" not in _GOLDEN:
        root = Path(tempfile.mkdtemp(prefix="kpt-adv-golden-"))
        csrc, cache = toy_tree(root / "csrc"), root / "cache"
        done, answer = load_toy(csrc, cache)
        if answer.get("value") != 5:
            raise CannotSetUp(f"the toy extension does not build here: {answer or done.stderr}")
        _GOLDEN["cache"] = cache
    return _GOLDEN["cache"]


def toy_build_dir(cache: Path) -> Path:
    found = [p for p in (cache / "jit").glob(f"{TOY}-*") if p.is_dir()
             and (p / ".ok").is_file()]
    if len(found) != 1:
        raise CannotSetUp(f"expected one finished toy build in {cache}, found {found}")
    return found[0]


def damaged(tmp: Path, damage: Callable[[Path, dict], None]) -> tuple[Path, Path]:
    """A copy of the golden cache with its build damaged by ``damage(build_dir, marker)``;
    returns (csrc, cache)."""
    cache = tmp / "cache"
    shutil.copytree(golden_cache(), cache)
    build = toy_build_dir(cache)
    damage(build, json.loads((build / ".ok").read_text()))
    return toy_tree(tmp / "csrc"), cache


def jit_cache_case(damage: Callable[[Path, dict], None], *, expect_value: int | None = 5,
                   max_builds: int | None = 1, names: Sequence[str] = (TOY,),
                   error_ok: bool = False, **env: str) -> Callable[[Path], Outcome]:
    def run(tmp: Path) -> Outcome:
        csrc, cache = damaged(tmp, damage)
        done, answer = load_toy(csrc, cache, **env)
        return toy_outcome(done, answer, expect_value=expect_value, names=names,
                           max_builds=max_builds, error_ok=error_ok)

    return run


def _truncate(build: Path, marker: dict, keep: int = 1000) -> None:
    library = build / marker["library"]
    library.write_bytes(library.read_bytes()[:keep])


def _garbage_library(build: Path, marker: dict) -> None:
    (build / marker["library"]).write_bytes(os.urandom(4096))


def _unfinished(build: Path, marker: dict) -> None:
    """What a builder killed mid-way leaves: no marker, cpp_extension's lock file, half a
    library."""
    (build / ".ok").unlink()
    (build / "lock").write_text("")
    _truncate(build, marker, 500)


JIT_DAMAGE: dict[str, tuple[str, Callable[[Path, dict], None], dict]] = {
    "an intact cache, compiling disabled": (
        "a finished build in the cache, KPT_DISABLE_JIT=1: loaded without compiling",
        lambda build, marker: None, dict(KPT_DISABLE_JIT="1", max_builds=0)),
    "a corrupt marker (.ok not JSON)": (
        "the build's .ok marker replaced by '{garbage': rebuilt",
        lambda build, marker: (build / ".ok").write_text("{garbage"), {}),
    "a marker naming a missing library": (
        "the library the .ok marker names deleted: rebuilt",
        lambda build, marker: (build / marker["library"]).unlink(), {}),
    "a marker of another hash": (
        "the .ok marker's hash changed: rebuilt",
        lambda build, marker: (build / ".ok").write_text(json.dumps({**marker,
                                                                     "hash": "0" * 16})), {}),
    "an unfinished build (builder killed)": (
        "no marker, cpp_extension's lock file and half a library left: rebuilt, no hang",
        _unfinished, {}),
    "a truncated library (first 1000 bytes) behind a valid marker": (
        "the built .so cut to its first 1000 bytes (a full disk, a copy interrupted), marker "
        "intact: rebuilt, or a clear error", _truncate,
        dict(names=(TOY, "delete"), error_ok=True)),
    "an empty library behind a valid marker": (
        "the built .so emptied, marker intact: rebuilt, or a clear error",
        lambda build, marker: (build / marker["library"]).write_bytes(b""),
        dict(names=(TOY, "delete"), error_ok=True)),
    "a library of random bytes behind a valid marker": (
        "the built .so replaced by 4 KB of random bytes, marker intact: rebuilt, or a clear "
        "error", _garbage_library, dict(names=(TOY, "delete"), error_ok=True)),
}
for _name, (_what, _damage, _options) in JIT_DAMAGE.items():
    add("jit", f"cache with {_name}", f"JitSpec.load() of the toy extension with {_what}",
        jit_cache_case(_damage, **_options), timeout=300)


@scenario("jit", "build, then load in a new process", "JitSpec.load() of the toy extension "
          "builds it once; a second process loads it from the cache with no compiler run",
          timeout=300)
def _jit_build(tmp: Path) -> Outcome:
    csrc, cache = toy_tree(tmp / "csrc"), tmp / "cache"
    first = toy_outcome(*load_toy(csrc, cache), expect_value=5, max_builds=1)
    if first.cls != "b":
        return first
    return toy_outcome(*load_toy(csrc, cache), expect_value=5, max_builds=0)


@scenario("jit", "an edited header rebuilds", "editing include/kpt/advtoy.h (ADV_OFFSET 0 -> "
          "100) makes the next load rebuild and return the new value", timeout=300)
def _jit_edit(tmp: Path) -> Outcome:
    csrc, cache = damaged(tmp, lambda build, marker: None)
    toy_tree(csrc, offset=100)
    return toy_outcome(*load_toy(csrc, cache), expect_value=105, max_builds=1)


@scenario("jit", "three processes load at once", "three processes load the toy extension at "
          "the same moment into an empty cache: one build, three answers of 5", timeout=300)
def _jit_concurrent(tmp: Path) -> Outcome:
    csrc, cache = toy_tree(tmp / "csrc"), tmp / "cache"
    env = child_env(KPT_CSRC_DIR=str(csrc), KPT_CACHE_DIR=str(cache), KPT_DISABLE_JIT=None)
    procs = [subprocess.Popen([sys.executable, "-c", TOY_LOAD], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [(p, *p.communicate(timeout=280)) for p in procs]
    done = [subprocess.CompletedProcess([], p.returncode, out, err) for p, out, err in results]
    answers = [json.loads(d.stdout.splitlines()[-1]) if d.stdout.strip() else {} for d in done]
    for d, a in zip(done, answers):
        outcome = toy_outcome(d, a, expect_value=5)
        if outcome.cls != "b":
            return outcome
    total = sum(builds(d) for d in done)
    return Outcome("b", "three loads, one build") if total == 1 else \
        Outcome("c", f"{total} builds for three concurrent loads (1 expected)")


def _jit_env_case(setup: Callable[[Path], dict], *, expect_value: int | None,
                  names: Sequence[str] = (TOY, "KPT_CACHE_DIR")) -> Callable[[Path], Outcome]:
    """Load the toy under the environment ``setup(tmp)`` returns (``cache`` and ``csrc`` keys
    name the directories; ``read_only`` a path made read-only during the load)."""

    def run(tmp: Path) -> Outcome:
        options = setup(tmp)
        csrc = options.pop("csrc", None) or toy_tree(tmp / "csrc")
        locked = options.pop("read_only", None)
        context = read_only(locked) if locked is not None else contextlib.nullcontext()
        with context:
            done, answer = load_toy(csrc, options.pop("cache"), **options)
        return toy_outcome(done, answer, expect_value=expect_value, names=names)

    return run


def _cache_is_a_file(tmp: Path) -> dict:
    (tmp / "afile").write_text("not a folder")
    return {"cache": tmp / "afile"}


def _cache_read_only(tmp: Path) -> dict:
    (tmp / "ro").mkdir()
    return {"cache": tmp / "ro", "read_only": tmp / "ro"}


def _cache_read_only_built(tmp: Path) -> dict:
    _, cache = damaged(tmp, lambda build, marker: None)
    return {"cache": cache, "read_only": cache / "jit"}


def _disabled_empty(tmp: Path) -> dict:
    return {"cache": tmp / "cache", "KPT_DISABLE_JIT": "1"}


def _syntax_error(tmp: Path) -> dict:
    return {"cache": tmp / "cache",
            "csrc": toy_tree(tmp / "csrc", binding="this is not C++;\n" + TOY_BINDING)}


def _missing_source(tmp: Path) -> dict:
    csrc = toy_tree(tmp / "csrc")
    (csrc / TOY_SOURCE).unlink()
    return {"cache": tmp / "cache", "csrc": csrc}


def _missing_csrc(tmp: Path) -> dict:
    return {"cache": tmp / "cache", "csrc": tmp / "nowhere"}


for _name, (_what, _setup, _value, _names) in {
    "KPT_CACHE_DIR is a regular file": ("KPT_CACHE_DIR naming a file, not a folder",
                                        _cache_is_a_file, None, (TOY, "KPT_CACHE_DIR")),
    "KPT_CACHE_DIR read-only and empty": ("KPT_CACHE_DIR an empty read-only folder",
                                          _cache_read_only, None, (TOY, "KPT_CACHE_DIR")),
    "KPT_CACHE_DIR read-only holding a finished build": (
        "a finished build in a read-only KPT_CACHE_DIR (loads need no writing)",
        _cache_read_only_built, 5, (TOY,)),
    "KPT_DISABLE_JIT=1 and nothing cached": ("KPT_DISABLE_JIT=1 and an empty cache",
                                             _disabled_empty, None, (TOY, "KPT_DISABLE_JIT")),
    "a source that does not compile": ("a binding.cpp starting with 'this is not C++;'",
                                       _syntax_error, None, (TOY, "error")),
    "a missing source": ("advtoy/binding.cpp deleted", _missing_source, None, (TOY,)),
    "KPT_CSRC_DIR that does not exist": ("KPT_CSRC_DIR=/nowhere", _missing_csrc, None,
                                         (TOY, "KPT_CSRC_DIR")),
}.items():
    add("jit", _name, f"JitSpec.load() of the toy extension with {_what}"
        + (": a clear error" if _value is None else ": loads"),
        _jit_env_case(_setup, expect_value=_value, names=_names), timeout=300)


def jit_spec(*args: Any) -> Any:
    from kpt.jit import JitSpec

    return JitSpec(*args)


for _name, _args in {
    "a name with a dash": ("my-ext", ("a.cpp",)),
    "an absolute source path": ("ext", ("/etc/passwd",)),
    "a source outside csrc ('../a.cpp')": ("ext", ("../a.cpp",)),
    "sources given as one string": ("ext", "a.cpp"),
    "no sources": ("ext", ()),
    "a name that is an int": (5, ("a.cpp",)),
    "sources None": ("ext", None),
}.items():
    add("jit", f"JitSpec refuses {_name}", f"JitSpec{_args!r}: must be refused",
        lambda _tmp, a=_args: expect_error(lambda: jit_spec(*a), ("JitSpec",),
                                           track_launches=False))


@scenario("jit", "real op's CUDA spec on a CPU-only torch",
          "flash_attention's cuda backend: unavailable_reason() says why (CPU-only torch) "
          "without compiling")
def _jit_real_spec(_tmp: Path) -> Outcome:
    def check() -> str | None:
        from kpt.ops.flash_attention import SPEC

        reason = SPEC.unavailable(SPEC.backend("cuda"))
        return None if reason and "CPU-only" in reason else f"reason: {reason!r}"

    return expect_ok(check, ("flash_attention",))


def compile_check(*args: Any, **kwargs: Any) -> Any:
    from kpt.jit import compile_check as check

    return check(*args, **kwargs)


TINY_KERNEL = "__global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n"


@scenario("jit", "compile_check of a tiny kernel for sm_80", "kpt.jit.compile_check of a "
          "one-line CUDA kernel with nvcc (a compile check needs no GPU)", timeout=300)
def _jit_compile_ok(tmp: Path) -> Outcome:
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        raise CannotSetUp("nvcc is not installed")
    source = _write(tmp / "k.cu", TINY_KERNEL)
    return expect_ok(lambda: compile_check(source, "sm_80"), ("compile_check",))


@scenario("jit", "compile_check of a kernel with an error", "kpt.jit.compile_check of a .cu "
          "file with a syntax error: BuildError with the first error line and the log path",
          timeout=300)
def _jit_compile_bad(tmp: Path) -> Outcome:
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        raise CannotSetUp("nvcc is not installed")
    source = _write(tmp / "k.cu", "__global__ void broken( { }\n")
    return expect_error(lambda: compile_check(source, "sm_80"), ("does not compile",),
                        types=(ValueError, TypeError, RuntimeError), track_launches=False)


@scenario("jit", "compile_check with a bad target", "kpt.jit.compile_check(source, 'sm80') "
          "(the target lacks its underscore)")
def _jit_compile_target(tmp: Path) -> Outcome:
    source = _write(tmp / "k.cu", TINY_KERNEL)
    return expect_error(lambda: compile_check(source, "sm80"), ("compile_check",),
                        track_launches=False)


@scenario("jit", "compile_check of a missing file", "kpt.jit.compile_check('/nowhere/k.cu', "
          "'sm_80')")
def _jit_compile_missing(_tmp: Path) -> Outcome:
    return expect_error(lambda: compile_check("/nowhere/k.cu", "sm_80"), ("compile_check",),
                        types=(ValueError, TypeError, FileNotFoundError), track_launches=False)


# -- flex_attention's generated Triton modules (cached under KPT_CACHE_DIR/flex) -----------------

FLEX_IN_CHILD = """
import json, os, sys
import torch
from kpt.ops.flex_attention import flex_attention
q = torch.randn(1, 2, 17, 16, generator=torch.Generator().manual_seed(0))
mod = lambda s, b, h, qi, ki: s * 0.5
try:
    got = flex_attention(q, q, q, mod, backend="triton")
    want = flex_attention(q, q, q, mod, backend="reference")
    print(json.dumps({"value": float((got - want).abs().max())}))
except Exception as err:
    print(json.dumps({"type": type(err).__name__, "message": str(err)}))
"""


def flex_cache_case(setup: Callable[[Path], tuple[Path, Path | None]]
                    ) -> Callable[[Path], Outcome]:
    """flex_attention(backend='triton') in a child whose KPT_CACHE_DIR is ``setup(tmp)[0]``
    (``[1]`` a path made read-only during the call)."""

    def run(tmp: Path) -> Outcome:
        cache, locked = setup(tmp)
        context = read_only(locked) if locked is not None else contextlib.nullcontext()
        env = child_env(KPT_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
        with context:
            done = run_python(FLEX_IN_CHILD, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            how = signal_name(done.returncode) if done.returncode < 0 else done.returncode
            return Outcome("e", one_line(f"process ended ({how}): {done.stderr[-300:]}"))
        answer = json.loads(lines[-1])
        if "value" in answer:
            return Outcome("b", "matches the reference") if answer["value"] < 1e-4 else \
                Outcome("c", f"max abs error {answer['value']:.3g} against the reference")
        text = one_line(f"{answer['type']}: {answer['message']}")
        if answer["type"] in JIT_CLEAR and any(n in answer["message"] for n in
                                               (FX, "KPT_CACHE_DIR")):
            return Outcome("a", text)
        return Outcome("d", text)

    return run


def _flex_corrupt_module(tmp: Path) -> tuple[Path, Path | None]:
    cache = tmp / "cache"
    first = run_python(FLEX_IN_CHILD, env=child_env(KPT_CACHE_DIR=str(cache),
                                                    TRITON_INTERPRET="1"))
    modules = list((cache / "flex").glob("*.py"))
    if first.returncode or not modules:
        raise CannotSetUp(f"no generated module was cached: {one_line(first.stderr[-200:])}")
    for path in modules:
        path.write_text("raise SystemExit('a corrupt cached module')\n")
    return cache, None


def _flex_cache_file(tmp: Path) -> tuple[Path, Path | None]:
    (tmp / "afile").write_text("not a folder")
    return tmp / "afile", None


def _flex_cache_read_only(tmp: Path) -> tuple[Path, Path | None]:
    (tmp / "ro").mkdir()
    return tmp / "ro", tmp / "ro"


for _name, _setup in {"a corrupt cached module": _flex_corrupt_module,
                      "KPT_CACHE_DIR a regular file": _flex_cache_file,
                      "KPT_CACHE_DIR read-only": _flex_cache_read_only}.items():
    add("jit", f"flex Triton module cache: {_name}", "flex_attention(backend='triton') with "
        f"{_name} (generated kernels are cached under KPT_CACHE_DIR/flex): matches the "
        "reference, or a clear error", flex_cache_case(_setup), timeout=180)


# =============================================================================================
# Minimal reproducers of what this script found on the CPU machine (printed when the scenario
# is in (c), (d) or (e)). ``q`` is torch.randn(...) of the shape named; x, nw, w, pos are the
# rmsnorm_qkv_rope inputs (1, 8, 64), (64,), (128, 64), torch.arange(8)[None]; ``m`` is a tiny
# LlamaForCausalLM (hidden 64, 4/2 heads of 16); imports as in the README.
# =============================================================================================

# The quantised GEMMs, MoE and paged / cascade attention register their scenarios from sibling
# files (this one is long enough); they import this module by name, so it must be that module
# even when run as a script.
sys.modules.setdefault("adversarial", sys.modules[__name__])
sys.path.insert(0, str(Path(__file__).resolve().parent))
import adversarial_gemm  # noqa: E402,F401 - registers fp8, int4
import adversarial_moe  # noqa: E402,F401 - registers moe
import adversarial_paged  # noqa: E402,F401 - registers paged, cascade
import adversarial_quant  # noqa: E402,F401 - registers quant

REPROS = {
    "flash/softcap 1e30 (no capping), triton":
        "q = k = v = torch.randn(1, 9, 2, 16, dtype=torch.bfloat16); "
        "flash_attention(q, k, v, softcap=1e30, backend='triton') differs from "
        "backend='reference' by ~1.5 (1e6: 0.016, 1e8: 1.05)",
    "flash/NaN in a value row a causal query cannot see, reference":
        "q, k, v = (torch.randn(1, 8, 1, 16) for _ in range(3)); v[0, 7] = float('nan'); "
        "flash_attention(q, k, v, causal=True)[0, :7].isnan().any()  # True",
    "flash/NaN in a value row a causal query cannot see, triton":
        "as for the reference, in bf16 with backend='triton'",
    "flash/refuse window (2**64, 0)":
        "flash_attention(q, q, q, window=(2**64, 0))  # OverflowError: int too big to convert",
    "flex/no mods, bf16 triton":
        "q = torch.randn(1, 2, 33, 16, dtype=torch.bfloat16); "
        "flex_attention(q, q, q, backend='triton')  # entries ~1e8, reference ~1",
    "flex/causal block mask, bf16 triton": "as 'no mods, bf16 triton', with a causal block mask",
    "flex/return_lse='no' (a non-bool flag)":
        "type(flex_attention(q, q, q, return_lse='no'))  # tuple",
    "flex/refuse BLOCK_SIZE '16'":
        "create_block_mask(None, 1, None, 33, 33, device='cpu', BLOCK_SIZE='16').BLOCK_SIZE"
        "  # (1, 6)",
    "flex/refuse Q_LEN negative":
        "create_block_mask(mods.causal(), 1, None, -5, 33, device='cpu')  # a BlockMask",
    "flex/refuse mods.alibi_slopes(-3)": "mods.alibi_slopes(-3)  # tensor of 2 slopes",
    "flex/refuse mods.alibi_slopes(0)":
        "mods.alibi_slopes(0)  # ValueError: negative shift count",
    "flex/refuse mask_mod takes two arguments":
        "create_block_mask(lambda b, h: True, 1, None, 33, 33, device='cpu')  # bare TypeError",
    "flex/refuse BLOCK_SIZE 16.5":
        "create_block_mask(None, 1, None, 33, 33, device='cpu', BLOCK_SIZE=16.5)",
    "flex/refuse B negative": "create_block_mask(mods.causal(), -2, None, 33, 33, device='cpu')",
    "flex/refuse document ids shorter than the sequence":
        "create_block_mask(mods.document(torch.zeros(10, dtype=torch.long)), 1, None, 33, 33, "
        "device='cpu')  # IndexError (flex_attention itself reads 0 past a captured tensor)",
    "rope/refuse rope_theta a list":
        "rmsnorm_qkv_rope(x, nw, w, pos, num_q_heads=4, num_kv_heads=2, head_dim=16, "
        "rope_theta=[10000.0])  # TypeError: unhashable type: 'list'",
    "rope/refuse hidden size 0":
        "rmsnorm_qkv_rope(torch.randn(4, 0), torch.randn(0), torch.randn(128, 0), "
        "torch.arange(4), num_q_heads=4, num_kv_heads=2, head_dim=16)",
    "nn/from_hf llama with partial_rotary_factor=0.5 (which HF's Llama ignores)":
        "m = LlamaForCausalLM(LlamaConfig(..., partial_rotary_factor=0.5)); "
        "layer = m.model.layers[0]; RMSNormQKVRoPE.from_hf(layer.input_layernorm, "
        "layer.self_attn).rotary_dim  # 8, HF rotates all 16",
    "nn/from_hf gemma2 (its norms scale by 1 + weight)":
        "RMSNormQKVRoPE.from_hf(g.model.layers[0].input_layernorm, g.model.layers[0].self_attn)"
        " of a Gemma2ForCausalLM g is accepted and normalises with weight, not 1 + weight",
    "nn/refuse negative head_dim": "RMSNormQKVRoPE(64, 4, 2, -16)",
    "nn/refuse rope_scaling 'linear' (a string)":
        "RMSNormQKVRoPE(64, 4, 2, 16, rope_scaling='linear')",
    "hf/llama, position_ids with a gap [0..3, 10..12] (batch 1)":
        "kpt_hf.patch(m); m(ids, position_ids=torch.tensor([[0, 1, 2, 3, 10, 11, 12]]))"
        " != unpatched (the gap is taken for a new packed sequence)",
    "hf/llama, position_ids repeated [0, 0, 1, 1, 2, 2, 3]":
        "as above with position_ids [[0, 0, 1, 1, 2, 2, 3]]",
    "hf/llama, batch of 2, second row's position_ids jump [0, 1, 5, 6, 7]":
        "as above with position_ids [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]",
    "hf/output_attentions=True on an eager model":
        "m = LlamaForCausalLM(LlamaConfig(..., attn_implementation='eager')); kpt_hf.patch(m); "
        "m(ids, output_attentions=True).attentions  # (), no warning",
    "hf/deepcopy of a patched model, then unpatch(copy)":
        "kpt_hf.patch(m); c = copy.deepcopy(m); kpt_hf.unpatch(c)  # c stays patched, m is "
        "unpatched",
    "hf/torch.save of a patched model":
        "kpt_hf.patch(m); torch.save(m, 'm.pt')  # AttributeError: Can't pickle local object",
    "hf/patch a model on the meta device":
        "with torch.device('meta'): m = LlamaForCausalLM(cfg); then kpt_hf.patch(m)  # "
        "NotImplementedError: Cannot copy out of meta tensor",
    "autotune/import refuses a lone surrogate escape in op":
        "a JSON Lines row with \"op\": \"\\ud800\" -> kpt-autotune import exits 4 "
        "(UnicodeEncodeError)",
    "autotune/import into a results table of another schema":
        "sqlite3 a.db 'create table results (op text, backend text)'; KPT_AUTOTUNE_DB=a.db "
        "kpt-autotune import rows.jsonl  # exit 4, InvalidColumns",
    "autotune/export of a results table of another schema":
        "same database: kpt-autotune export -  # exit 3, 'no such column: config'",
    "jit/cache with a truncated library (first 1000 bytes) behind a valid marker":
        "truncate the .so of a finished build in KPT_CACHE_DIR/jit/<name>-<hash>/ to 1000 "
        "bytes; JitSpec(...).load() in a new process dies with SIGBUS",
    "jit/KPT_CACHE_DIR is a regular file":
        "KPT_CACHE_DIR=/etc/hostname: JitSpec(...).load()  # NotADirectoryError",
    "jit/KPT_CACHE_DIR read-only and empty":
        "chattr +i $KPT_CACHE_DIR (empty): JitSpec(...).load()  # PermissionError",
    "jit/JitSpec refuses a name that is an int": "JitSpec(5, ('a.cpp',))  # AttributeError",
    "jit/JitSpec refuses sources None": "JitSpec('ext', None)  # TypeError: 'NoneType' ...",
    "jit/flex Triton module cache: KPT_CACHE_DIR a regular file":
        "KPT_CACHE_DIR=/etc/hostname: flex_attention(q, q, q, lambda s, *_: s * 0.5, "
        "backend='triton')  # NotADirectoryError",
    "jit/flex Triton module cache: KPT_CACHE_DIR read-only":
        "chattr +i $KPT_CACHE_DIR: flex_attention(..., backend='triton')  # PermissionError",
}


def _attach_reproducers() -> None:
    for key, text in REPROS.items():
        SCENARIOS[key] = replace(SCENARIOS[key], repro=text)  # a KeyError here: a stale key


_attach_reproducers()


# =============================================================================================
# Running: workers (one process runs many scenarios) and the parent that watches them
# =============================================================================================


@dataclass
class Result:
    scenario: Scenario
    outcome: Outcome
    seconds: float


def worker_main(keys: list[str], results: Path) -> int:
    """Run ``keys`` in order, appending a ``start`` and an ``end`` JSON line per scenario to
    ``results`` (flushed), so the parent knows which one a crash or hang belongs to."""
    faulthandler.enable()  # a crash leaves its Python stack in the worker's log
    with results.open("a", encoding="utf-8") as out:
        for key in keys:
            item = SCENARIOS[key]
            out.write(json.dumps({"event": "start", "key": key}) + "\n")
            out.flush()
            tmp = Path(tempfile.mkdtemp(prefix="kpt-adv-"))
            start = time.monotonic()
            try:
                outcome = item.run(tmp)
            except CannotSetUp as err:
                outcome = Outcome(SKIPPED, one_line(err))
            except Exception as err:  # noqa: BLE001 - a bug of this script, reported as such
                where = traceback.extract_tb(err.__traceback__)[-1]
                outcome = Outcome(HARNESS, f"{describe_error(err)} at {Path(where.filename).name}"
                                           f":{where.lineno}")
            finally:
                release_read_only(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
            out.write(json.dumps({"event": "end", "key": key, "cls": outcome.cls,
                                  "detail": outcome.detail,
                                  "rejected_valid": outcome.rejected_valid,
                                  "seconds": time.monotonic() - start}) + "\n")
            out.flush()
    return 0


def worker_env(run_dir: Path, group: str) -> dict[str, str]:
    """A worker's environment: kpt's defaults (no KPT_* overrides from the caller), private
    cache and database, the Triton interpreter, one thread, quiet warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPT_")}
    private = run_dir / "env" / group.replace("/", "_")
    (private / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({
        "TMPDIR": str(private / "tmp"),  # whatever a killed worker leaves goes with the run
        "KPT_CACHE_DIR": str(private / "cache"),
        "KPT_AUTOTUNE_DB": str(private / "autotune.db"),
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    })
    return env


def run_group(keys: list[str], run_dir: Path, group: str,
              progress: Callable[[Result], None]) -> list[Result]:
    """Run a group's scenarios in worker processes; a worker that dies or exceeds a scenario's
    timeout charges that scenario (e) and a new worker takes the rest."""
    done: dict[str, Result] = {}
    attempt = 0
    while len(done) < len(keys):
        remaining = [k for k in keys if k not in done]
        attempt += 1
        stem = run_dir / "workers" / f"{group.replace('/', '_')}-{attempt}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        results = stem.with_suffix(".jsonl")
        log = stem.with_suffix(".log").open("w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--results",
               str(results), *remaining]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=worker_env(run_dir, group), start_new_session=True)
        current, started, offset, progressed = None, time.monotonic(), 0, False
        while True:
            exited = proc.poll() is not None
            if results.exists():
                with results.open(encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                # only whole lines: a line being written is read on the next poll
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode("utf-8"))
                for line in complete.splitlines():
                    event = json.loads(line)
                    if event["event"] == "start":
                        current, started = event["key"], time.monotonic()
                        continue
                    item = SCENARIOS[event["key"]]
                    result = Result(item, Outcome(event["cls"], event["detail"],
                                                  event["rejected_valid"]), event["seconds"])
                    done[item.key] = result
                    progress(result)
                    current, progressed = None, True
            if exited:
                break
            if current is not None and time.monotonic() - started > SCENARIOS[current].timeout:
                _kill(proc)
                proc.wait()
                item = SCENARIOS[current]
                done[current] = Result(item, Outcome("e", f"timed out after {item.timeout:.0f} s "
                                                          "(worker killed)"), item.timeout)
                progress(done[current])
                current, progressed = None, True
                break
            time.sleep(0.05)
        log.close()
        if current is not None:  # the worker died inside this scenario
            code = proc.returncode
            how = f"killed by {signal_name(code)}" if code < 0 else f"exited with status {code}"
            tail = _tail(stem.with_suffix(".log"))
            item = SCENARIOS[current]
            done[current] = Result(item, Outcome("e", one_line(f"process {how}; {tail}")),
                                   time.monotonic() - started)
            progress(done[current])
            progressed = True
        if not progressed:  # the worker could not even start a scenario: report, stop
            tail = _tail(stem.with_suffix(".log"))
            for key in remaining:
                done[key] = Result(SCENARIOS[key], Outcome(HARNESS, f"worker failed: {tail}"),
                                   0.0)
                progress(done[key])
    release_read_only(run_dir)
    return [done[k] for k in keys]


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) if text else "(no output)"


# ---- the report -------------------------------------------------------------------------------


def report(results: list[Result], seconds: float, areas: list[str], full: bool = False) -> str:
    counted = [r for r in results if r.outcome.cls in CLASSES]
    lines = ["# kpt adversarial scenarios", "",
             f"{len(results)} scenarios in {seconds:.0f} s "
             f"(TRITON_INTERPRET=1, CPU; python {sys.version.split()[0]}).", ""]
    header = ["area", *(f"({c}) {name}" for c, name in CLASSES.items()), "total"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals = dict.fromkeys(CLASSES, 0)
    for area in [a for a in areas if any(r.scenario.area == a for r in results)]:
        mine = [r for r in counted if r.scenario.area == area]
        counts = {c: sum(r.outcome.cls == c for r in mine) for c in CLASSES}
        for c, n in counts.items():
            totals[c] += n
        lines.append(f"| {AREAS[area]} | " + " | ".join(str(counts[c]) for c in CLASSES)
                     + f" | {len(mine)} |")
    lines.append("| **total** | " + " | ".join(f"**{totals[c]}**" for c in CLASSES)
                 + f" | **{sum(totals.values())}** |")
    for cls in ("c", "d", "e"):
        found = [r for r in counted if r.outcome.cls == cls]
        lines += ["", f"## ({cls}) {CLASSES[cls]}: {len(found)}", ""]
        lines += [_entry(r) for r in found] or ["none"]
    rejected = [r for r in counted if r.outcome.rejected_valid]
    lines += ["", f"## Valid calls rejected with a clear error (counted in (a)): {len(rejected)}",
              ""]
    lines += [_entry(r) for r in rejected] or ["none"]
    other = [r for r in results if r.outcome.cls not in CLASSES]
    if other:
        lines += ["", f"## Not covered (not counted): {len(other)}", ""]
        lines += [_entry(r, show_class=True) for r in other]
    if full:
        lines += ["", "## Every scenario", "", "| scenario | outcome | observed | seconds |",
                  "|---|---|---|---|"]
        lines += [f"| {md(r.scenario.key)} | ({r.outcome.cls}) | {md(r.outcome.detail)} | "
                  f"{r.seconds:.1f} |" for r in results]
    return "\n".join(lines) + "\n"


def md(text: str) -> str:
    """``text`` safe in markdown prose and table cells (no stray emphasis or cell breaks)."""
    return text.replace("*", "\\*").replace("|", "\\|")


def _entry(r: Result, show_class: bool = False) -> str:
    tag = {SKIPPED: "not set up", HARNESS: "script error"}.get(r.outcome.cls, "")
    text = (f"- **{AREAS[r.scenario.area]} / {md(r.scenario.key.split('/', 1)[1])}**: "
            f"{md(r.scenario.description)}. Observed: {md(r.outcome.detail)}")
    if show_class and tag:
        text += f" ({tag})"
    if r.scenario.repro:
        text += f"\n  Reproducer: `{r.scenario.repro}`"
    return text


# ---- command line -----------------------------------------------------------------------------


def _area(value: str) -> str:
    wanted = value.strip().lower()
    for short, name in AREAS.items():
        if wanted in (short, name.lower()):
            return short
    raise argparse.ArgumentTypeError(
        f"unknown area {value!r} (one of {', '.join(AREAS)}, or {', '.join(AREAS.values())})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--area", type=_area, action="append",
                        help="only this area (repeatable): " + ", ".join(AREAS))
    parser.add_argument("--out", type=Path, help="also write the markdown report to FILE.md")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="worker processes at once (default: 2, or 1 on one core)")
    parser.add_argument("--only", help="only scenarios whose key contains this text")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--full", action="store_true",
                        help="append every scenario's outcome to the report")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("keys", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.keys, args.results)
    areas = args.area or list(AREAS)
    chosen = [s for s in SCENARIOS.values() if s.area in areas
              and (args.only is None or args.only in s.key)]
    if args.list:
        for s in chosen:
            print(f"{s.key}: {s.description}")
        print(f"{len(chosen)} scenarios")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("note: TRITON_INTERPRET is not set; workers set it themselves", file=sys.stderr)
    groups: dict[str, list[str]] = {}
    for s in chosen:
        groups.setdefault(s.group or s.key, []).append(s.key)
    start = time.monotonic()
    lock = threading.Lock()
    finished = [0]

    def progress(result: Result) -> None:
        with lock:
            finished[0] += 1
            mark = result.outcome.cls
            print(f"[{finished[0]:>3}/{len(chosen)}] ({mark}) {result.scenario.key} "
                  f"{result.seconds:.1f}s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="kpt-adversarial-", ignore_cleanup_errors=True) as tmp:
        run_dir = Path(tmp)
        try:
            # biggest groups first, so that the two workers finish together
            order = sorted(groups.items(), key=lambda kv: -len(kv[1]))
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futures = [pool.submit(run_group, keys, run_dir, group, progress)
                           for group, keys in order]
                by_key = {r.scenario.key: r for f in futures for r in f.result()}
        finally:
            release_read_only(run_dir)
    results = [by_key[s.key] for s in chosen]
    text = report(results, time.monotonic() - start, areas, full=args.full)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
