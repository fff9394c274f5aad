"""Merging attention computed over disjoint parts of the keys (cascade attention's combine step).

Attention over keys ``A ∪ B`` from the parts: with natural-log logsumexps ``lse_a``, ``lse_b``
(flash_attention's ``return_lse`` convention: float32, -inf where a part has no visible key)::

    lse = logaddexp(lse_a, lse_b)
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b        # 0 where lse = -inf

in float32, rounded once to the outputs' dtype. A part at lse +inf (a logit past float32's range)
makes lse +inf and o NaN, a NaN part both NaN: the rule of a single attention call over all
the keys (flash_attention's reference).

``cascade_attention`` runs requests whose KV is a chain of levels in one paged cache, outermost
shared prefix first: level ``l`` is ``(block_table, seq_lens, group_indptr)``, its group ``g``
holding row ``g`` of that table and serving requests ``group_indptr[g] .. group_indptr[g + 1] -
1``. A request's KV is its groups' KV in level order, and the result is ``paged_attention`` over
those keys concatenated. The queries of a group attend to a shared level together (one
``paged_attention`` "sequence" per group, so its pages are read once per group and kv head, not
once per request); the states of the levels are merged through their lse. On a CUDA device
(eager calls, CUDA-graph capture included) the levels after the first run on a second stream
beside it (``OVERLAP_LEVELS``): the outermost level is compute-bound (many stacked queries over
a long prefix, which paged_attention's Triton backend runs in wide tiles leaving SM slots
free), the per-request levels are bound by memory, and the two share the GPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kpt.ops._common import (
    attention_options,
    check_tensor,
    plain_eager,
    read_content,
    triton_unavailable,
)

OP = "merge_attention_states"
OP_CASCADE = "cascade_attention"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _validate(op: str, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> None:
    check_tensor(op, "o_a", o_a, dtypes=_FLOATS)
    if o_a.dim() < 2:
        raise ValueError(f"{op}: o_a must be (..., H, D), got shape {tuple(o_a.shape)}")
    check_tensor(op, "o_b", o_b, dtypes=(o_a.dtype,), device=o_a.device)
    if o_b.shape != o_a.shape:
        raise ValueError(f"{op}: o_a {tuple(o_a.shape)} and o_b {tuple(o_b.shape)} differ")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(op, name, lse, dtypes=(torch.float32,), device=o_a.device)
        if lse.shape != o_a.shape[:-1]:
            raise ValueError(f"{op}: {name} must be shaped like o without its last dim, "
                             f"{tuple(o_a.shape[:-1])}, got {tuple(lse.shape)}")


def _merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    # log(e^a + e^b) as max + log1p(e^-|a - b|) (what torch.logaddexp computes; written out
    # because torch_xla has no lowering for logaddexp). An infinite max is the result (both
    # -inf: -inf, not the NaN of -inf + inf; a +inf part: +inf); maximum propagates NaN.
    high = torch.maximum(lse_a, lse_b)
    gap = (lse_a - lse_b).abs()
    lse = torch.where(torch.isinf(high), high, high + torch.log1p(torch.exp(-gap)))
    # Where both parts are empty lse is -inf: shift by 0 there so no (-inf) - (-inf) NaN forms.
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - shift), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - shift), torch.zeros_like(lse))
    o = w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()
    # lse +inf or NaN: o NaN (as one call over all the keys gives), not the zeros of w = 0.
    o = torch.where((finite | (lse == float("-inf")))[..., None], o, float("nan"))
    return o.to(o_a.dtype), lse


def _merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``_merge`` with o in ``out_dtype``: one Triton kernel on a GPU (``_triton.merge``) for
    plain eager tensors that need no gradient; the torch math everywhere else (CPU, other
    devices, autograd, torch.compile and other tracing, which see the elementwise ops)."""
    tensors = (o_a, lse_a, o_b, lse_b)
    if (o_a.is_cuda and triton_unavailable() is None and plain_eager(*tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        from . import _triton

        return _triton.merge(o_a, lse_a, o_b, lse_b, out_dtype)
    o, lse = _merge(o_a, lse_a, o_b, lse_b)
    return o.to(out_dtype), lse


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                           lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(o, lse) of attention over both parts' keys; o (..., H, D), lse (..., H) float32 (for
    flash_attention's varlen lse (H, T), pass ``lse.T``). Device ops only: graph-capturable."""
    _validate(OP, o_a, lse_a, o_b, lse_b)
    return _merge_states(o_a, lse_a, o_b, lse_b, o_a.dtype)


def merge_attention_states_(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                            lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """In place: the merged state replaces ``o_a`` and ``lse_a``, which are returned."""
    _validate(OP + "_", o_a, lse_a, o_b, lse_b)
    o, lse = _merge_states(o_a, lse_a, o_b, lse_b, o_a.dtype)
    o_a.copy_(o)
    lse_a.copy_(lse)
    return o_a, lse_a


def _levels(levels, batch: int, device: torch.device, num_pages: int,
            page_size: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each level's tensors checked (and, where they are read on the host, their content: the
    pages a level uses exist, its lengths fit its table), made contiguous."""
    from kpt.ops.paged_attention import _check_tables

    op = OP_CASCADE
    if not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError(f"{op}: levels must be a non-empty list of (block_table, seq_lens, "
                        f"group_indptr), got {type(levels).__name__}")
    out = []
    for i, level in enumerate(levels):
        if not isinstance(level, (list, tuple)) or len(level) != 3:
            raise TypeError(f"{op}: levels[{i}] must be (block_table, seq_lens, group_indptr)")
        table, lens, indptr = level
        for name, t, ndim in (("block_table", table, 2), ("seq_lens", lens, 1),
                              ("group_indptr", indptr, 1)):
            check_tensor(op, f"levels[{i}].{name}", t, ndim=ndim, dtypes=(torch.int32,),
                         device=device)
        groups = table.shape[0]
        if lens.shape[0] != groups or indptr.shape[0] != groups + 1:
            raise ValueError(f"{op}: levels[{i}] has {groups} table rows, {lens.shape[0]} "
                             f"lengths and {indptr.shape[0]} group_indptr entries (need G, G, "
                             f"G + 1)")
        if read_content(indptr):
            values = indptr.tolist()
            if values[0] != 0 or values[-1] != batch or any(
                    b < a for a, b in zip(values, values[1:])):
                raise ValueError(f"{op}: levels[{i}].group_indptr must rise from 0 to the "
                                 f"{batch} requests, got {values[:8]}")
        if read_content(table):
            _check_tables(f"{op}: levels[{i}]", table, lens, num_pages, page_size, None)
        out.append((table.contiguous(), lens.contiguous(), indptr.contiguous()))
    return out


def _reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, levels, cu_q: Tensor, causal: bool,
               scale: float | None, softcap: float, k_scale, v_scale,
               kv_layout: str) -> tuple[Tensor, Tensor]:
    """Each request's keys gathered level by level, then flash_attention's reference."""
    from kpt.ops.flash_attention.reference import attention_forward
    from kpt.ops.paged_attention import reference as paged

    batch = cu_q.shape[0] - 1
    keys, values, lengths = [], [], []
    for r in range(batch):
        ks, vs = [], []
        for table, lens, indptr in levels:
            g = int(torch.searchsorted(indptr, torch.tensor([r], dtype=indptr.dtype,
                                                            device=indptr.device),
                                       right=True)) - 1
            row, n = table[g : g + 1], lens[g : g + 1]
            ks.append(paged.gather(k_cache, row, n, kv_layout, k_scale)[0])
            vs.append(paged.gather(v_cache, row, n, kv_layout, v_scale)[0])
        keys.append(torch.cat(ks))
        values.append(torch.cat(vs))
        lengths.append(keys[-1].shape[0])
    cu_k = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=q.device)
    d = q.shape[-1]
    out, lse = attention_forward(q, torch.cat(keys), torch.cat(values), cu_q, cu_k,
                                 d**-0.5 if scale is None else scale, -1, 0 if causal else -1,
                                 softcap)
    return out, lse.transpose(0, 1)


# Levels after the first run on a second stream while the first (the outermost shared prefix:
# many query rows over a long key range, compute-bound) runs on the caller's: the others are
# decode-shaped and bound by memory, so the two overlap (bench/RESULTS.md, cascade).
OVERLAP_LEVELS = True


def _overlaps(q: Tensor) -> bool:
    """Whether this call runs its levels on two streams: plain eager calls (CUDA-graph capture
    included, where the streams become parallel branches) on a CUDA device."""
    return OVERLAP_LEVELS and q.is_cuda and plain_eager(q)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _levels_overlapped(level, count: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """``level(0)`` on the current stream, ``level(1) .. level(count - 1)`` on a side stream
    forked from it before ``level(0)`` and joined back before the merge. The side stream's
    results are marked as used by the current stream (``record_stream``), so the allocator
    does not hand their memory to the side stream again before the merge has read them. Under
    graph capture the marks are left out: there every use of the side stream starts by
    waiting for the capture stream, which orders any reuse after the merge."""
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    first = level(0)
    with torch.cuda.stream(side):
        rest = [level(i) for i in range(1, count)]
    main.wait_stream(side)
    if not torch.cuda.is_current_stream_capturing():
        for o, lse in rest:
            o.record_stream(main)
            lse.record_stream(main)
    return [first, *rest]


def cascade_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    levels: list[tuple[Tensor, Tensor, Tensor]],
    *,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    softcap: float = 0.0,
    k_scale: Tensor | float | None = None,
    v_scale: Tensor | float | None = None,
    kv_layout: str = "NHD",
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each request over its chain of shared-prefix levels in a paged cache.

    Args:
        q: (B, Hq, D), one query per request (decode), or (Tq, Hq, D) with ``cu_seqlens_q``
            (B + 1,) int32; a request's queries are its last tokens, and must lie in its last
            level (a shared level is visible whole to the queries after it).
        k_cache, v_cache, k_scale, v_scale, kv_layout, scale, softcap, causal: as in
            ``paged_attention`` (one cache holds every level's pages).
        levels: ``[(block_table (G, P) int32, seq_lens (G,) int32, group_indptr (G + 1,)
            int32), ...]``, outermost first; each level's groups cover all B requests in order.
        backend: ``"reference"`` gathers each request's keys (the specification); otherwise
            each level runs ``paged_attention`` (with this backend, if named) and the levels'
            states are merged.

    Returns out (like q) and, with ``return_lse``, lse (float32, (Tq, Hq)).
    """
    from kpt.ops.paged_attention import SPEC, _check_cache, _check_scales, paged_attention

    op = OP_CASCADE
    for name, value in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    check_tensor(op, "q", q, ndim=3, dtypes=_FLOATS)
    page_size, heads_kv, d = _check_cache(op, k_cache, v_cache, kv_layout, q.device, q.dtype)
    if q.shape[2] != d or d == 0 or q.shape[1] == 0 or q.shape[1] % heads_kv:
        raise ValueError(f"{op}: q (T, Hq, D) = {tuple(q.shape)} must have the caches' head_dim "
                         f"{d} and a positive multiple of their {heads_kv} kv heads")
    attention_options(op, causal, None, scale, softcap, d)
    k_scale, v_scale = _check_scales(op, k_cache, k_scale, v_scale, heads_kv, q.device)
    if backend is not None and backend != "reference":
        if not isinstance(backend, str) or backend not in {b.name for b in SPEC.backends}:
            raise ValueError(f"{op}: unknown backend {backend!r} (known: reference and "
                             f"paged_attention's {', '.join(b.name for b in SPEC.backends)})")
    if max_seqlen_q is not None and (isinstance(max_seqlen_q, bool)
                                     or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0):
        raise ValueError(f"{op}: max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
    if cu_seqlens_q is None:
        cu_q = None  # 0..B, made only where it is read (the reference)
        batch, max_m = q.shape[0], 1
    else:
        check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,),
                     device=q.device)
        if cu_seqlens_q.shape[0] == 0:
            raise ValueError(f"{op}: cu_seqlens_q needs B + 1 >= 1 entries, got none")
        cu_q, batch = cu_seqlens_q.contiguous(), cu_seqlens_q.shape[0] - 1
        max_m = max_seqlen_q
        if max_m is None or read_content(cu_q):
            counts = (cu_q[1:] - cu_q[:-1]).tolist()
            if cu_q.tolist()[0] != 0 or min(counts, default=0) < 0 or cu_q.tolist()[-1] != \
                    q.shape[0]:
                raise ValueError(f"{op}: cu_seqlens_q must rise from 0 to the {q.shape[0]} "
                                 f"queries, got {cu_q.tolist()[:8]}")
            longest = max(counts, default=0)
            if max_m is not None and max_m < longest:
                raise ValueError(f"{op}: max_seqlen_q={max_m} is below the longest query run "
                                 f"({longest})")
            max_m = longest if max_m is None else max_m
    levels = _levels(levels, batch, q.device, k_cache.shape[0], page_size)
    if backend == "reference":
        if cu_q is None:
            cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        out, lse = _reference(q, k_cache, v_cache, levels, cu_q, causal, scale, softcap,
                              k_scale, v_scale, kv_layout)
        return (out, lse) if return_lse else out
    common = dict(scale=scale, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                  kv_layout=kv_layout, return_lse=True, backend=backend)

    def level(i: int) -> tuple[Tensor, Tensor]:
        table, lens, indptr = levels[i]
        last = i == len(levels) - 1
        if last and indptr.shape[0] == batch + 1 and cu_seqlens_q is None:
            # one group per request (the usual last level): plain decode
            o, lse = paged_attention(q, k_cache, v_cache, table, lens, causal=causal, **common)
        else:
            # a group's requests are consecutive, so are their queries: one varlen "sequence"
            # per group, its rows reading the level's pages together
            # Decode queries are one per request (cu_q = 0..B), so the groups' offsets are
            # group_indptr itself; the kernels clamp offsets to the queries.
            cu = indptr if cu_seqlens_q is None else cu_q[indptr.long().clamp(0, batch)]
            if read_content(cu):
                rows = int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0
            else:  # no host read: a bound (programs past a group's rows exit at once)
                rows = q.shape[0]
            # Stacked queries of several requests are not one sequence: only a one-request
            # group may apply the causal rule, and a decode query (the last token) sees every
            # key of every level anyway.
            level_causal = causal and last and cu_seqlens_q is not None
            if level_causal and indptr.shape[0] != batch + 1:
                raise ValueError(f"{op}: causal chunked prefill needs a last level of one "
                                 f"group per request (its group_indptr 0..B)")
            o, lse = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu,
                                     max_seqlen_q=rows, causal=level_causal, **common)
            lse = lse.transpose(0, 1)
        return o, lse

    if len(levels) > 1 and _overlaps(q):
        states = _levels_overlapped(level, len(levels), q.device)
    else:
        states = [level(i) for i in range(len(levels))]
    # The merged state stays float32 between levels and is rounded once, by the last merge.
    state = states[0]
    for i, (o, lse) in enumerate(states[1:], 1):
        state = _merge_states(state[0], state[1], o, lse,
                              q.dtype if i == len(levels) - 1 else torch.float32)
    out, lse = state
    out, lse = out.to(q.dtype), lse.contiguous()
    return (out, lse) if return_lse else out


__all__ = ["cascade_attention", "merge_attention_states", "merge_attention_states_"]
