"""CUDA and HIP backends of ``paged_attention``: JIT build of ``csrc/paged_attention`` and the
launcher that serves both (one kernel source for nvcc and hipcc; the kernel design is described
at the top of ``csrc/paged_attention/kernels.cu``).

Per call the host picks two numbers, cached per shape: the query rows one CTA owns (the GQA
group, up to 8: every key is read once for all of them) and the KV split (how many CTAs share
one sequence's keys, when batch x kv heads alone cannot fill the GPU). Then it makes one native
call; the split workspace comes from torch's caching allocator on the current stream and the
tables are read only on the device, so a call is safe inside CUDA graph capture. The split is
chosen from the table's capacity; each sequence divides its own visible keys on the device.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import jit_unavailable, kernel_output, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem

OP = "paged_attention"

SPEC = JitSpec(
    name="paged_attention",
    sources=("paged_attention/kernels.cu", "paged_attention/binding.cpp"),
)

# Limits of the kernels (KPT_PA_* in kpt/paged_attention.h).
MAX_HEAD_DIM = 256
MAX_ROWS = 8
MAX_SPLITS = 256
MAX_BATCH = 65535  # grid.z
# A split below this many keys costs more (its CTA's start, the merge, the partials) than it
# parallelises: 4 warps x 4 chunks of 8 keys at head_dim 128.
MIN_SPLIT_KEYS = 128
# The split model (choose_splits): CTAs an SM needs resident to keep enough copies in flight
# for its share of HBM bandwidth (each holds two 16 KB cp.async stages), and the fixed cost of
# a CTA and of the combine launch, in bytes an SM would stream in that time (about 1-3 us).
SATURATING_CTAS_PER_SM = 2
CTA_FIXED_BYTES = 32 << 10
COMBINE_FIXED_BYTES = 64 << 10
_FP8 = frozenset(t for t in (getattr(torch, "float8_e4m3fn", None),
                             getattr(torch, "float8_e5m2", None)) if t is not None)

# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)


def supports(problem: Problem) -> list[str]:
    """Problem-level reasons; page sizes 1..256, both layouts, fp8 caches, windows and soft caps
    are all served. Alignment is checked per call (q and out are copied when misaligned)."""
    d = problem["head_dim"]
    reasons = []
    if d > MAX_HEAD_DIM:
        reasons.append(f"head_dim {d} > {MAX_HEAD_DIM}")
    if d % 8:
        reasons.append(f"head_dim {d} is not a multiple of 8 (each lane reads 8 features)")
    if problem["batch"] > MAX_BATCH:
        reasons.append(f"batch {problem['batch']} > {MAX_BATCH} sequences (one grid dimension)")
    return reasons


def rows_per_cta(group: int, max_seqlen_q: int) -> int:
    """Query rows (token, head) of one kv head a CTA owns: the power of two covering one
    sequence's rows (decode: the GQA group), at most MAX_ROWS."""
    rows = max(1, group * max_seqlen_q)
    return min(MAX_ROWS, 1 << (rows - 1).bit_length())


def choose_splits(ctas: int, keys: int, bytes_per_key: int, sms: int) -> int:
    """CTAs per sequence and kv head (split-KV) for ``ctas`` unsplit CTAs over up to ``keys``.

    Modelled time is the busiest SM's bytes: the CTAs it runs x (their share of the keys + a
    fixed cost), stretched when the GPU holds too few CTAs to keep HBM busy, plus the combine
    pass (its launch, the partials written and read). Among near-equal choices the smallest
    split wins. Splits never go below MIN_SPLIT_KEYS keys each.
    """
    limit = max(1, min(MAX_SPLITS, -(-keys // MIN_SPLIT_KEYS)))
    best_cost, best = math.inf, 1
    for splits in range(1, limit + 1):
        total = ctas * splits
        per_cta = -(-keys // splits) * bytes_per_key + CTA_FIXED_BYTES
        fill = min(1.0, total / (sms * SATURATING_CTAS_PER_SM))
        cost = -(-total // sms) * per_cta / fill
        if splits > 1:
            cost += COMBINE_FIXED_BYTES
        if cost < 0.97 * best_cost:
            best_cost, best = cost, splits
    return best


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def plan_launch(batch: int, max_seqlen_q: int, heads_q: int, heads_kv: int, capacity: int,
                head_dim: int, kv_bytes: int, sms: int, rows: int, splits: int,
                split_scale: float) -> tuple[int, int]:
    """(rows per CTA, splits) for one call shape; ``rows`` / ``splits`` 0 mean automatic."""
    group = heads_q // heads_kv
    rows = rows or rows_per_cta(group, max_seqlen_q)
    if not splits:
        tiles = -(-(group * max_seqlen_q) // rows)
        splits = choose_splits(batch * heads_kv * tiles, capacity, 2 * head_dim * kv_bytes, sms)
        splits = round(splits * split_scale)
    return rows, max(1, min(MAX_SPLITS, splits))


def configs(problem: Problem) -> list[Config]:
    """Launch variants; the first is the default (rows and splits chosen by the model)."""
    base: Config = {"rows": 0, "splits": 0, "split_scale": 1.0}
    variants = [base, dict(base, split_scale=2.0), dict(base, split_scale=0.5),
                dict(base, splits=1)]
    auto_rows = rows_per_cta(problem["heads_q"] // problem["heads_kv"], problem["seqlen_q"])
    if auto_rows > 1:
        variants.append(dict(base, rows=auto_rows // 2))
    return variants


def _misaligned(t: Tensor, vector_bytes: int) -> str | None:
    """Why the kernels cannot read ``t`` in vectors of 8 elements in place, or None."""
    if t.stride(-1) != 1:
        return "its last dim is not contiguous"
    if t.data_ptr() % vector_bytes:
        return f"its data pointer is not {vector_bytes}-byte aligned"
    if any(st % 8 and size > 1 for st, size in zip(t.stride()[:-1], t.shape[:-1])):
        return "a stride is not a multiple of 8 elements"
    return None


def _module():
    try:
        return SPEC.load()
    except BuildError as err:
        raise BackendUnavailable(f"{OP}: {err}") from err


def fast(call, config: Config):
    """``run``'s launch for repeats of a decode call (see ``Backend.fast``): a launcher
    ``(q, k_cache, v_cache, block_table, seq_lens, out, lse)`` with the launch numbers settled
    here; None where ``run`` does more than the one native call (chunked prefill: tokens past
    the last query run keep their zeros; fp8 scales; empty batches; copies for alignment).
    Decode writes every row of ``out`` and ``lse`` (a sequence of length 0 gets zeros and
    -inf), so the caller may pass them uninitialised."""
    q = call.q
    if (call.cu_seqlens_q is not None or call.k_scale is not None or call.batch == 0
            or q.shape[0] == 0 or q.device.type != "cuda"):
        return None
    if any(_misaligned(t, 16) for t in (q, call.out, call.k_cache, call.v_cache)):
        return None
    forward = _module().forward
    dev = q.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    rows, splits = plan_launch(
        call.batch, call.max_seqlen_q, q.shape[1], call.heads_kv,
        call.block_table.shape[1] * call.page_size, q.shape[2], call.k_cache.element_size(),
        _sm_count(index), config.get("rows", 0), config.get("splits", 0),
        config.get("split_scale", 1.0))
    tail = (call.kv_layout == "HND", call.max_seqlen_q, call.scale, call.softcap,
            call.window_left, call.window_right, rows, splits, MIN_SPLIT_KEYS)
    stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if stream is None:
        return None
    current = torch.cuda.current_device

    def launch(q, k_cache, v_cache, block_table, seq_lens, out, lse):
        if current() != index:
            with torch.cuda.device(index):
                forward(q, k_cache, v_cache, block_table, seq_lens, None, None, None, out, lse,
                        *tail, stream(index))
            return
        forward(q, k_cache, v_cache, block_table, seq_lens, None, None, None, out, lse, *tail,
                stream(index))

    return launch


def run(call, config: Config) -> None:
    """The ``cuda`` and ``hip`` backends: write ``call.out`` and ``call.lse``."""
    q, out = call.q, call.out
    if call.batch == 0 or q.shape[0] == 0 or call.max_seqlen_q == 0:
        return
    if q.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip backend needs GPU tensors, got {q.device}")
    fp8 = call.k_cache.dtype in _FP8
    for name, cache in (("k_cache", call.k_cache), ("v_cache", call.v_cache)):
        reason = _misaligned(cache, 8 if fp8 else 16)
        if reason:
            raise ValueError(f"{OP}: the cuda/hip backend cannot read {name} in place: "
                             f"{reason}")
    module = _module()
    dev = q.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    rows, splits = plan_launch(
        call.batch, call.max_seqlen_q, q.shape[1], call.heads_kv,
        call.block_table.shape[1] * call.page_size, q.shape[2], call.k_cache.element_size(),
        _sm_count(index), config.get("rows", 0), config.get("splits", 0),
        config.get("split_scale", 1.0))
    if _misaligned(q, 16):
        q = q.clone(memory_format=torch.contiguous_format)
    with kernel_output(out, _misaligned(out, 16) is None) as target, on_device(dev):
        module.forward(q, call.k_cache, call.v_cache, call.block_table, call.seq_lens,
                       call.cu_seqlens_q, call.k_scale, call.v_scale, target, call.lse,
                       call.kv_layout == "HND", call.max_seqlen_q, call.scale, call.softcap,
                       call.window_left, call.window_right, rows, splits, MIN_SPLIT_KEYS,
                       raw_stream(dev))
