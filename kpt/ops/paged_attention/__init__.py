"""Attention over a paged KV cache (decode and chunked prefill), and appending to one.

Equivalent PyTorch for sequence ``b`` (see ``reference.py``)::

    n = seq_lens[b];  keys j = 0..n-1 live at cache[block_table[b, j // page_size], j % page_size]
    out[b] = flash_attention(q[b] (its last tokens), k[:n], v[:n], causal, window, softcap)

Two registry ops: ``paged_attention`` (out and lse) and ``append_paged_kv`` (writes the new
tokens' keys and values into their pages). Inference only: neither has a backward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import xpu_backend
from kpt.ops._common import (
    _mode_active,
    attention_options,
    check_content,
    check_tensor,
    dtype_name,
    native_backends,
    plain_eager,
    read_content,
    reference_backend,
    triton_backend,
    triton_interpreting,
)
from kpt.ops._registry import Op, Problem, _env_backend

from . import reference as _reference

OP = "paged_attention"
OP_APPEND = "append_paged_kv"

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
FP8 = frozenset(t for t in (getattr(torch, "float8_e4m3fn", None),
                            getattr(torch, "float8_e5m2", None)) if t is not None)
LAYOUTS = ("NHD", "HND")
MAX_PAGE_SIZE = 256
MAX_HEAD_DIM = 256


@dataclass
class Call:
    """A validated call. q (B, Hq, D) decode or (Tq, Hq, D) with ``cu_seqlens_q``; caches
    (pages, page_size, Hkv, D) "NHD" or (pages, Hkv, page_size, D) "HND"; window_right = 0 for
    causal; k_scale / v_scale float32 of 1 or Hkv elements for an fp8 cache, else None."""

    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    cu_seqlens_q: Tensor | None
    max_seqlen_q: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    k_scale: Tensor | None
    v_scale: Tensor | None
    kv_layout: str
    out: Tensor
    lse: Tensor

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1 if self.kv_layout == "NHD" else 2]

    @property
    def heads_kv(self) -> int:
        return self.k_cache.shape[2 if self.kv_layout == "NHD" else 1]


@dataclass
class AppendCall:
    """A validated ``append_paged_kv`` call: k, v (T, Hkv, D) new tokens."""

    k: Tensor
    v: Tensor
    k_cache: Tensor
    v_cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    cu_seqlens: Tensor | None
    k_scale: Tensor | None
    v_scale: Tensor | None
    kv_layout: str

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1 if self.kv_layout == "NHD" else 2]


def problem_of(call: Call) -> Problem:
    return Problem.of(
        call.q.device, call.q.dtype, batch=call.batch, seqlen_q=call.max_seqlen_q,
        capacity=call.block_table.shape[1] * call.page_size, heads_q=call.q.shape[-2],
        heads_kv=call.heads_kv, head_dim=call.q.shape[-1], page_size=call.page_size,
        kv_layout=call.kv_layout, kv_dtype=call.k_cache.dtype, varlen=call.varlen,
        mask=("full" if call.window_left < 0 and call.window_right < 0 else
              "causal" if call.window_left < 0 and call.window_right == 0 else "window"),
        softcap=call.softcap > 0)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _bucket(p: Problem) -> str:
    return (f"b{_pow2(p['batch'])}-sq{_pow2(p['seqlen_q'])}-cap{_pow2(p['capacity'])}"
            f"-h{p['heads_q']}-kv{p['heads_kv']}-d{p['head_dim']}-ps{p['page_size']}"
            f"-{p['kv_layout']}-{dtype_name(p['kv_dtype'])}-{p['mask']}"
            f"{'-softcap' if p['softcap'] else ''}{'-varlen' if p['varlen'] else ''}")


# ---- backends ------------------------------------------------------------------------------


def _triton_supports(p: Problem) -> list[str]:
    reasons = []
    if p["head_dim"] > MAX_HEAD_DIM:
        reasons.append(f"head_dim {p['head_dim']} > {MAX_HEAD_DIM}")
    e4m3 = getattr(torch, "float8_e4m3fn", None)
    if (p["kv_dtype"] == e4m3 and p.device_type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(p.device_index) < (8, 9)):
        reasons.append("float8_e4m3fn caches: Triton converts e4m3 only on sm_89 or newer")
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


BACKENDS = (
    triton_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports,
                   configs="configs", fast="fast"),
    # One kernel source for nvcc and hipcc; its supports() lives in _cuda.py.
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run", run_hip="run",
                     fast="fast"),
    reference_backend(_reference.run, _FLOATS),
    xla_backend("paged_attention", dtypes=_FLOATS),
    xpu_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports),
)

def _example(device: torch.device, dtype: torch.dtype) -> Problem:
    """A Llama-3-8B decode step: 4 sequences, 16-token pages, 4096 keys of capacity."""
    return Problem.of(device, dtype, batch=4, seqlen_q=1, capacity=4096, heads_q=32,
                      heads_kv=8, head_dim=128, page_size=16, kv_layout="NHD", kv_dtype=dtype,
                      varlen=False, mask="causal", softcap=False)


# Query runs of at least PREFILL_PREFER_ROWS rows (tokens x GQA group) per kv head of a
# sequence go to the Triton backend, whose tiles multiply on tensor cores (the cuda/hip kernel,
# built for decode, streams the keys once per 8 rows on CUDA cores: a cascade's shared level,
# 256 rows per kv head over 16384 keys, took 1260.8 µs through it against 138.2 through Triton
# on an H100, bench/RESULTS.md). Prefill-sized chunks of those (``prefill_sized``) take the
# Triton backend's gather path, which runs at flash_attention's rate: enough query tiles of
# FLASH_TILE_M tokens over the batch's heads for flash_attention's grid to give every SM a CTA
# (flash does not split the keys: a few stacked decode queries over a long shared prefix,
# cascade_attention's shared levels, stay on the in-place kernel's split-KV).
PREFILL_PREFER_ROWS = 64
FLASH_TILE_M = 128


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def many_rows(seqlen_q: int, heads_q: int, heads_kv: int) -> bool:
    """Whether a sequence's query rows per kv head fill a tensor-core tile (see above)."""
    return seqlen_q * (heads_q // max(heads_kv, 1)) >= PREFILL_PREFER_ROWS


def prefill_sized(batch: int, seqlen_q: int, heads_q: int, heads_kv: int,
                  device_index: int | None) -> bool:
    """Whether a chunked prefill is large enough for the gather path (see above)."""
    if not many_rows(seqlen_q, heads_q, heads_kv):
        return False
    index = torch.cuda.current_device() if device_index is None else device_index
    return batch * heads_q * -(-seqlen_q // FLASH_TILE_M) >= _sm_count(index)


def _prefer(p: Problem) -> tuple[str, ...]:
    """Dispatch's ``prefer`` hook: Triton first for query runs of many rows per kv head."""
    if p.device_type == "cuda" and p["varlen"] and many_rows(p["seqlen_q"], p["heads_q"],
                                                             p["heads_kv"]):
        return ("triton",)
    return ()


SPEC = Op(
    name=OP,
    backends=BACKENDS,
    prefer=_prefer,
    priority={"cuda": ("cuda", "hip", "triton", "reference"), "cpu": ("reference",),
              "xla": ("xla", "reference"), "xpu": ("xpu", "reference")},
    bucket=_bucket,
    example=_example,
)

APPEND_SPEC = Op(
    name=OP_APPEND,
    backends=(reference_backend(_reference.run_append, _FLOATS | FP8),
              xla_backend("paged_attention", dtypes=_FLOATS | FP8, entry="run_append")),
    priority={"cuda": ("reference",), "cpu": ("reference",), "xla": ("xla", "reference"),
              "xpu": ("reference",)},
    bucket=lambda p: f"t{_pow2(p['tokens'])}-kv{p['heads_kv']}-d{p['head_dim']}",
    example=lambda device, dtype: Problem.of(device, dtype, tokens=4, heads_kv=8, head_dim=128),
)


# ---- validation ----------------------------------------------------------------------------


def _check_cache(op: str, k_cache: Tensor, v_cache: Tensor, kv_layout: str,
                 device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(page_size, kv heads, head dim) of well-formed caches; dtype: the activations'."""
    if kv_layout not in LAYOUTS:
        raise ValueError(f"{op}: kv_layout must be one of {LAYOUTS}, got {kv_layout!r}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, cache, ndim=4, dtypes=tuple(_FLOATS | FP8), device=device)
        if cache.dtype != dtype and cache.dtype not in FP8:
            raise TypeError(f"{op}: {name} must be {dtype_name(dtype)} like the activations, "
                            f"or fp8, got {dtype_name(cache.dtype)}")
        if cache.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a contiguous last dim")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} {dtype_name(k_cache.dtype)} and "
                         f"v_cache {tuple(v_cache.shape)} {dtype_name(v_cache.dtype)} differ")
    page_size, heads = ((k_cache.shape[1], k_cache.shape[2]) if kv_layout == "NHD"
                        else (k_cache.shape[2], k_cache.shape[1]))
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"{op}: page size {page_size} must be in 1..{MAX_PAGE_SIZE} "
                         f"(kv_layout={kv_layout!r})")
    if heads == 0 or k_cache.shape[0] == 0:
        raise ValueError(f"{op}: the caches need at least one page and one kv head, got "
                         f"{tuple(k_cache.shape)}")
    return page_size, heads, k_cache.shape[-1]


def _check_scales(op: str, k_cache: Tensor, k_scale: Any, v_scale: Any, heads: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """float32 (1,) or (Hkv,) scales of an fp8 cache; None for fp16/bf16 caches."""
    if k_cache.dtype not in FP8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"{op}: k_scale/v_scale are for fp8 caches, the cache is "
                             f"{dtype_name(k_cache.dtype)}")
        return None, None
    out = []
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if value is None:
            raise ValueError(f"{op}: an fp8 cache needs {name}")
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"{op}: {name} must be a number or a float tensor, got "
                            f"{type(value).__name__}")
        if not isinstance(value, Tensor):
            value = torch.tensor([float(value)], device=device)
        check_tensor(op, name, value, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                     device=device)
        if value.numel() not in (1, heads) or value.dim() > 1:
            raise ValueError(f"{op}: {name} must hold 1 or Hkv={heads} values, got shape "
                             f"{tuple(value.shape)}")
        value = value.float().reshape(-1).contiguous()
        if read_content(value):
            if not bool(torch.isfinite(value).all() and (value > 0).all()):
                raise ValueError(f"{op}: {name} must be finite and > 0, got {value.tolist()}")
        out.append(value)
    return out[0], out[1]


def _check_index(op: str, name: str, t: Any, ndim: int, device: torch.device) -> None:
    check_tensor(op, name, t, ndim=ndim, dtypes=(torch.int32,), device=device)
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_tables(op: str, block_table: Tensor, seq_lens: Tensor, num_pages: int,
                  page_size: int, new_tokens: list[int] | None) -> None:
    """Content of the page table and lengths (read on the host): every length fits the
    table's capacity and is at least the sequence's new tokens, every page in use exists."""
    capacity = block_table.shape[1] * page_size
    lengths = seq_lens.tolist()
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise ValueError(f"{op}: seq_lens[{b}] = {n} is outside 0..{capacity} (the block "
                             f"table's {block_table.shape[1]} pages of {page_size})")
        if new_tokens is not None and new_tokens[b] > n:
            raise ValueError(f"{op}: sequence {b} has {new_tokens[b]} new tokens but "
                             f"seq_lens[{b}] = {n}")
        used = block_table[b, : -(-n // page_size)]
        if used.numel() and not bool(((used >= 0) & (used < num_pages)).all()):
            raise ValueError(f"{op}: block_table row {b} names pages outside 0..{num_pages - 1}: "
                             f"{used.tolist()[:8]}")


def _check_cu(op: str, name: str, cu: Tensor, batch: int, total: int) -> list[int]:
    values = cu.tolist()
    if len(values) != batch + 1:
        raise ValueError(f"{op}: {name} must have batch + 1 = {batch + 1} entries, got "
                         f"{len(values)}")
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] != total:
        raise ValueError(f"{op}: {name} must rise from 0 to the {total} tokens, got "
                         f"{values[:8]}{' ...' if len(values) > 8 else ''}")
    return [b - a for a, b in zip(values, values[1:])]


def _validate(q: Any, k_cache: Any, v_cache: Any, block_table: Any, seq_lens: Any,
              cu_seqlens_q: Any, max_seqlen_q: Any, causal: Any, scale: Any, window: Any,
              softcap: Any, k_scale: Any, v_scale: Any, kv_layout: Any, return_lse: Any,
              ) -> tuple:
    for name, value in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(value, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {value!r}")
    check_tensor(OP, "q", q, ndim=3, dtypes=tuple(_FLOATS))
    dev = q.device
    if q.stride(-1) != 1:
        raise ValueError(f"{OP}: q needs a contiguous last dim")
    page_size, heads_kv, d = _check_cache(OP, k_cache, v_cache, kv_layout, dev, q.dtype)
    heads = q.shape[1]
    if q.shape[2] != d:
        raise ValueError(f"{OP}: head_dim of q ({q.shape[2]}) and the caches ({d}) differ")
    if d == 0 or heads == 0 or heads % heads_kv:
        raise ValueError(f"{OP}: q heads ({heads}) must be a positive multiple of the caches' "
                         f"kv heads ({heads_kv}), head_dim ({d}) positive")
    _check_index(OP, "block_table", block_table, 2, dev)
    _check_index(OP, "seq_lens", seq_lens, 1, dev)
    batch = block_table.shape[0]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"{OP}: seq_lens has {seq_lens.shape[0]} entries, block_table "
                         f"{batch} rows")
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ValueError(f"{OP}: decode q (B, Hq, D) has {q.shape[0]} rows for {batch} "
                             f"sequences (pass cu_seqlens_q for several queries each)")
        if max_seqlen_q is not None:
            raise ValueError(f"{OP}: max_seqlen_q is for varlen queries (with cu_seqlens_q)")
        max_q = 1 if batch else 0
    else:
        _check_index(OP, "cu_seqlens_q", cu_seqlens_q, 1, dev)
        if (max_seqlen_q is not None and (isinstance(max_seqlen_q, bool)
                                          or not isinstance(max_seqlen_q, int)
                                          or max_seqlen_q < 0)):
            raise ValueError(f"{OP}: max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
        new = None
        if max_seqlen_q is None or read_content(cu_seqlens_q):
            new = _check_cu(OP, "cu_seqlens_q", cu_seqlens_q, batch, q.shape[0])
            longest = max(new, default=0)
            if max_seqlen_q is not None and max_seqlen_q < longest:
                raise ValueError(f"{OP}: max_seqlen_q={max_seqlen_q} is below the longest "
                                 f"query run ({longest})")
            max_seqlen_q = longest if max_seqlen_q is None else max_seqlen_q
        elif cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(f"{OP}: cu_seqlens_q must have batch + 1 = {batch + 1} entries")
        max_q = min(max_seqlen_q, q.shape[0])
    if read_content(block_table):
        # More queries than keys is allowed (as in flash_attention): those see nothing.
        _check_tables(OP, block_table, seq_lens, k_cache.shape[0], page_size, None)
    scale, left, right, softcap = attention_options(OP, causal, window, scale, softcap, d)
    ks, vs = _check_scales(OP, k_cache, k_scale, v_scale, heads_kv, dev)
    return max_q, scale, left, right, softcap, ks, vs


# ---- custom op -----------------------------------------------------------------------------


def _outputs(q: Tensor, varlen: bool) -> tuple[Tensor, Tensor]:
    heads = q.shape[1]
    lse_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads)
    return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
            torch.full(lse_shape, float("-inf"), device=q.device))


def _impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
          cu_seqlens_q: Tensor | None, max_seqlen_q: int, scale: float, window_left: int,
          window_right: int, softcap: float, k_scale: Tensor | None, v_scale: Tensor | None,
          kv_layout: str, backend: str, signature: tuple | None = None) -> tuple[Tensor, Tensor]:
    out, lse = _outputs(q, cu_seqlens_q is not None)
    call = Call(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                window_left, window_right, softcap, k_scale, v_scale, kv_layout, out, lse)
    key = (q.device, q.dtype, call.batch, max_seqlen_q, block_table.shape[1], q.shape[1],
           q.shape[2], k_cache.shape, k_cache.dtype, kv_layout, window_left, window_right,
           softcap > 0, cu_seqlens_q is not None)
    SPEC.launch_keyed(key, lambda: problem_of(call), call, backend or None, signature)
    return out, lse


def _signature(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
               seq_lens: Tensor, *options: Any) -> tuple | None:
    """Everything validation and dispatch read of a decode call (types, shapes, strides,
    dtypes, devices, 16-byte alignment, options): the key of its stored fast launcher; None
    when it cannot be built (not tensors, unhashable options)."""
    try:
        tensors = (q, k_cache, v_cache, block_table, seq_lens)
        return (tuple(map(type, tensors)), tuple(t.shape for t in tensors),
                tuple(t.stride() for t in tensors), tuple(t.dtype for t in tensors),
                tuple(t.device for t in tensors),
                (q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()) & 15,
                tuple(map(type, options)), options, _env_backend(OP))
    except (AttributeError, TypeError, RuntimeError):
        return None


def _varlen_key(cu: Any) -> tuple:
    """What a signature holds of ``cu_seqlens_q``: its type, shape, strides, dtype, device
    (never its content, which a GPU call does not read)."""
    return (type(cu), cu.shape, cu.stride(), cu.dtype, cu.device)


def _fast_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialised decode outputs: a fast launcher writes every row (see ``_cuda.fast``)."""
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device))


@torch.library.custom_op("kpt::paged_attention", mutates_args=())
def _paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                        seq_lens: Tensor, cu_seqlens_q: Tensor | None, max_seqlen_q: int,
                        scale: float, window_left: int, window_right: int, softcap: float,
                        k_scale: Tensor | None, v_scale: Tensor | None, kv_layout: str,
                        backend: str) -> tuple[Tensor, Tensor]:
    return _impl(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                 window_left, window_right, softcap, k_scale, v_scale, kv_layout, backend)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
      window_left, window_right, softcap, k_scale, v_scale, kv_layout, backend):
    heads = q.shape[1]
    lse_shape = (heads, q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], heads)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    k_scale: Tensor | float | None = None,
    v_scale: Tensor | float | None = None,
    kv_layout: str = "NHD",
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of new queries over a paged KV cache (decode, or chunked prefill).

    Args:
        q: (B, Hq, D), one query per sequence (decode), or (Tq, Hq, D) with ``cu_seqlens_q``:
            each sequence's queries are its last tokens (bottom-right alignment). fp16/bf16
            (fp32 on the reference).
        k_cache, v_cache: (num_pages, page_size, Hkv, D) for ``kv_layout="NHD"``, (num_pages,
            Hkv, page_size, D) for ``"HND"``; page sizes 1..256; q's dtype, or fp8 (e4m3 /
            e5m2) holding ``k / k_scale``.
        block_table: (B, max_pages) int32 page ids; only the first ``ceil(seq_lens[b] /
            page_size)`` of row ``b`` are read.
        seq_lens: (B,) int32 KV lengths, the new tokens included; 0 gives zeros, lse -inf.
        cu_seqlens_q: (B + 1,) int32 query offsets (chunked prefill); ``max_seqlen_q`` its
            longest run (read on the host when omitted).
        causal, window, softcap, scale: as in ``flash_attention`` (window (left, right) keys
            around the diagonal, -1 unbounded).
        k_scale, v_scale: an fp8 cache's dequantisation scales, a number or 1 / Hkv values.
        return_lse: also return the natural-log logsumexp, float32, (B, Hq) or (Hq, Tq).
        backend: ``"cuda"``, ``"hip"``, ``"triton"`` or ``"reference"``.

    Page ids and lengths on a GPU are not read back per call; ``KPT_CHECK=1`` checks them (ids
    in range, lengths within the table's capacity). Either way the kernels clamp them into the
    cache, so a bad id never makes them access memory outside it.
    """
    signature = None
    varlen = cu_seqlens_q is not None
    if (k_scale is None and v_scale is None and not torch.compiler.is_compiling()
            and not check_content()
            and (max_seqlen_q is None if not varlen else
                 max_seqlen_q is not None and isinstance(cu_seqlens_q, Tensor)
                 and not read_content(cu_seqlens_q))):
        # A repeat of a call validated and dispatched before runs the launcher stored for its
        # signature (see Op.launch_keyed): decode, or chunked prefill with max_seqlen_q given
        # and cu_seqlens_q on a GPU (nothing read back); anything else takes the full path.
        extra = (_varlen_key(cu_seqlens_q), max_seqlen_q) if varlen else ()
        signature = _signature(q, k_cache, v_cache, block_table, seq_lens, causal, scale,
                               window, softcap, kv_layout, return_lse, backend, *extra)
        fast = None if signature is None else SPEC.fast.get(signature)
        if fast is not None and not _mode_active():
            if varlen:  # tokens past the last query run keep zeros and lse -inf
                out, lse = _outputs(q, True)
                fast(q, k_cache, v_cache, block_table, seq_lens, out, lse, cu_seqlens_q)
            else:
                out, lse = _fast_outputs(q)
                fast(q, k_cache, v_cache, block_table, seq_lens, out, lse)
            return (out, lse) if return_lse else out
    max_q, scale, left, right, softcap, ks, vs = _validate(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, causal, scale,
        window, softcap, k_scale, v_scale, kv_layout, return_lse)
    if backend is not None:
        SPEC.backend(backend)
    args = (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_q, scale, left, right,
            softcap, ks, vs, kv_layout, backend or "")
    if plain_eager(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q):
        out, lse = _impl(*args, signature=signature)
    else:
        out, lse = torch.ops.kpt.paged_attention(*args)
    return (out, lse) if return_lse else out


# ---- plan / run ------------------------------------------------------------------------------


@dataclass
class Plan:
    """What ``plan()`` settled once per batch on the host: the tables, sizes, masks and the
    dispatch decision. ``run`` launches with them, checking only the per-layer tensors' shapes
    (no host sync; with ``out`` and ``lse`` given, the only allocation is a split-KV launch's
    partial results, from torch's caching allocator on the current stream, which graph capture
    serves from the graph's pool): safe inside CUDA graphs."""

    block_table: Tensor
    seq_lens: Tensor
    cu_seqlens_q: Tensor | None
    max_seqlen_q: int
    num_q_heads: int
    head_dim: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    k_scale: Tensor | None
    v_scale: Tensor | None
    kv_layout: str
    backend: str | None
    # What the per-layer tensors must match (the example's): q's dtype and device, the
    # caches' shape and dtype (the tables were checked against that many pages).
    q_dtype: torch.dtype | None = None
    device: torch.device | None = None
    cache_shape: tuple[int, ...] | None = None
    cache_dtype: torch.dtype | None = None

    def run(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, *, out: Tensor | None = None,
            lse: Tensor | None = None) -> Tensor:
        """One layer's attention; writes and returns ``out`` (allocated when not given)."""
        signature = None
        if self.cu_seqlens_q is None and self.k_scale is None:
            # Decode: a repeat of a layer call seen before runs its stored launcher.
            signature = self._signature(q, k_cache, v_cache, out, lse)
            fast = None if signature is None else SPEC.fast.get(signature)
            if fast is not None:
                if out is None or lse is None:
                    new_out, new_lse = _fast_outputs(q)
                    out = new_out if out is None else out
                    lse = new_lse if lse is None else lse
                fast(q, k_cache, v_cache, self.block_table, self.seq_lens, out, lse)
                return out
        tokens = q.shape[0]
        varlen = self.cu_seqlens_q is not None
        want_q = (tokens, self.num_q_heads, self.head_dim)
        if q.dim() != 3 or tuple(q.shape) != want_q:
            raise ValueError(f"{OP}.run: q must be {want_q} as planned, got {tuple(q.shape)}")
        if not varlen and tokens != self.block_table.shape[0]:
            raise ValueError(f"{OP}.run: decode q needs {self.block_table.shape[0]} rows")
        if q.dtype != self.q_dtype or q.device != self.device or q.stride(-1) != 1:
            raise ValueError(f"{OP}.run: q must be {dtype_name(self.q_dtype)} on "
                             f"{self.device} with a contiguous last dim, as planned; got "
                             f"{dtype_name(q.dtype)} on {q.device}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if (not isinstance(cache, Tensor) or tuple(cache.shape) != self.cache_shape
                    or cache.dtype != self.cache_dtype or cache.device != self.device
                    or cache.stride(-1) != 1):
                raise ValueError(
                    f"{OP}.run: {name} must be {self.cache_shape} {dtype_name(self.cache_dtype)}"
                    f" on {self.device} with a contiguous last dim, as planned; got "
                    f"{getattr(cache, 'shape', type(cache).__name__)}")
        lse_shape = (self.num_q_heads, tokens) if varlen else (tokens, self.num_q_heads)
        if out is None:
            out = torch.zeros_like(q)
        elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
            raise ValueError(f"{OP}.run: out must be shaped like q ({tuple(q.shape)}, "
                             f"{dtype_name(q.dtype)}) with a contiguous last dim")
        if lse is None:
            lse = torch.empty(lse_shape, device=q.device)
        elif tuple(lse.shape) != lse_shape or lse.dtype != torch.float32:
            raise ValueError(f"{OP}.run: lse must be float32 {lse_shape}")
        call = Call(q, k_cache, v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q,
                    self.max_seqlen_q, self.scale, self.window_left, self.window_right,
                    self.softcap, self.k_scale, self.v_scale, self.kv_layout, out, lse)
        key = (q.device, q.dtype, call.batch, self.max_seqlen_q, self.block_table.shape[1],
               q.shape[1], q.shape[2], k_cache.shape, k_cache.dtype, self.kv_layout,
               self.window_left, self.window_right, self.softcap > 0, varlen)
        SPEC.launch_keyed(key, lambda: problem_of(call), call, self.backend, signature)
        return out

    def _signature(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor | None,
                   lse: Tensor | None) -> tuple | None:
        given = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device,
                                              t.data_ptr() & 15) for t in (out, lse))
        return _signature(q, k_cache, v_cache, self.block_table, self.seq_lens, "plan",
                          self.scale, self.window_left, self.window_right, self.softcap,
                          self.kv_layout, self.backend, given)


def plan(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
         *, cu_seqlens_q: Tensor | None = None, max_seqlen_q: int | None = None,
         causal: bool = True, scale: float | None = None,
         window: tuple[int, int] | None = None, softcap: float = 0.0,
         k_scale: Tensor | float | None = None, v_scale: Tensor | float | None = None,
         kv_layout: str = "NHD", backend: str | None = None) -> Plan:
    """Validate a batch once (arguments as ``paged_attention``'s; ``q``, ``k_cache`` and
    ``v_cache`` are examples of every layer's, typically layer 0's) and return a ``Plan`` whose
    ``run(q, k_cache, v_cache, out=...)`` serves each layer. ``block_table``, ``seq_lens`` and
    ``cu_seqlens_q`` are kept by reference: update them in place between graph replays."""
    max_q, scale, left, right, softcap, ks, vs = _validate(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, causal, scale,
        window, softcap, k_scale, v_scale, kv_layout, False)
    if backend is not None:
        SPEC.backend(backend)
    return Plan(block_table, seq_lens, cu_seqlens_q, max_q, q.shape[1], q.shape[2], scale,
                left, right, softcap, ks, vs, kv_layout, backend, q.dtype, q.device,
                tuple(k_cache.shape), k_cache.dtype)


# ---- append --------------------------------------------------------------------------------


def _append_impl(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                 seq_lens: Tensor, cu_seqlens: Tensor | None, k_scale: Tensor | None,
                 v_scale: Tensor | None, kv_layout: str) -> None:
    call = AppendCall(k, v, k_cache, v_cache, block_table, seq_lens, cu_seqlens, k_scale,
                      v_scale, kv_layout)
    problem = Problem.of(k.device, k.dtype, tokens=k.shape[0], heads_kv=k.shape[1],
                         head_dim=k.shape[2])
    APPEND_SPEC.launch(problem, call)


@torch.library.custom_op("kpt::append_paged_kv", mutates_args=("k_cache", "v_cache"))
def _append_op(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
               seq_lens: Tensor, cu_seqlens: Tensor | None, k_scale: Tensor | None,
               v_scale: Tensor | None, kv_layout: str) -> None:
    _append_impl(k, v, k_cache, v_cache, block_table, seq_lens, cu_seqlens, k_scale, v_scale,
                 kv_layout)


@_append_op.register_fake
def _(k, v, k_cache, v_cache, block_table, seq_lens, cu_seqlens, k_scale, v_scale, kv_layout):
    return None


def append_paged_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    k_scale: Tensor | float | None = None,
    v_scale: Tensor | float | None = None,
    kv_layout: str = "NHD",
) -> None:
    """Write new keys and values into their pages, in place.

    ``k``, ``v``: (B, Hkv, D), one new token per sequence, or (T, Hkv, D) with ``cu_seqlens``
    (B + 1,) int32. The new tokens are each sequence's last: those of sequence ``b`` go to
    positions ``seq_lens[b] - new .. seq_lens[b] - 1`` (``seq_lens`` counts them, as
    ``paged_attention``'s does). An fp8 cache stores ``k / k_scale``, saturated to its range.
    """
    op = OP_APPEND
    check_tensor(op, "k", k, ndim=3, dtypes=tuple(_FLOATS))
    check_tensor(op, "v", v, ndim=3, dtypes=(k.dtype,), device=k.device)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    page_size, heads, d = _check_cache(op, k_cache, v_cache, kv_layout, k.device, k.dtype)
    if (k.shape[1], k.shape[2]) != (heads, d):
        raise ValueError(f"{op}: k/v rows (Hkv, D) = {tuple(k.shape[1:])} do not match the "
                         f"caches' ({heads}, {d})")
    _check_index(op, "block_table", block_table, 2, k.device)
    _check_index(op, "seq_lens", seq_lens, 1, k.device)
    batch = block_table.shape[0]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"{op}: seq_lens has {seq_lens.shape[0]} entries, block_table "
                         f"{batch} rows")
    new = None
    if cu_seqlens is None:
        if k.shape[0] != batch:
            raise ValueError(f"{op}: k has {k.shape[0]} rows for {batch} sequences (pass "
                             f"cu_seqlens for several new tokens each)")
        new = [1] * batch
    else:
        _check_index(op, "cu_seqlens", cu_seqlens, 1, k.device)
        if cu_seqlens.shape[0] != batch + 1:
            raise ValueError(f"{op}: cu_seqlens must have batch + 1 = {batch + 1} entries")
        if read_content(cu_seqlens):
            new = _check_cu(op, "cu_seqlens", cu_seqlens, batch, k.shape[0])
    if read_content(block_table):
        _check_tables(op, block_table, seq_lens, k_cache.shape[0], page_size, new)
    ks, vs = _check_scales(op, k_cache, k_scale, v_scale, heads, k.device)
    args = (k, v, k_cache, v_cache, block_table, seq_lens, cu_seqlens, ks, vs, kv_layout)
    if plain_eager(k, v, k_cache, v_cache, block_table, seq_lens, cu_seqlens):
        _append_impl(*args)
    else:
        torch.ops.kpt.append_paged_kv(*args)


__all__ = ["paged_attention", "append_paged_kv", "plan", "Plan", "Call", "AppendCall", "SPEC",
           "APPEND_SPEC"]
