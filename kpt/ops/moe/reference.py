"""Reference implementations (the specification) of ``moe_route``, ``fused_moe`` and
``align``: plain PyTorch, float32 accumulation (float64 when the input is float64, which the
tests use as ground truth), any device. Every backend follows the rounding points written
here; backends differ only in the order of float32 sums."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kpt.ops.fp8_gemm import reference as _fp8
from kpt.ops.int4_gemm import reference as _int4

FP8_BLOCK = 128  # experts' fp8 scales: 128 x 128 blocks; activations: 1 x 128 per token


# ---- routing -------------------------------------------------------------------------------


def scores(logits: Tensor, scoring: str) -> Tensor:
    """float32 (float64 for float64 logits) routing scores: softmax over experts or sigmoid."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    return z.softmax(-1) if scoring == "softmax" else z.sigmoid()


def _no_nan(t: Tensor) -> Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, -torch.inf), t)


def select(s: Tensor, top_k: int, groups: int, topk_groups: int,
           bias: Tensor | None) -> Tensor:
    """The chosen experts (T, top_k) int64 from scores ``s`` (T, E).

    Selection score ``sel = s + bias`` (NaN counts as -inf). Grouped: a group's score is the
    sum of its two largest ``sel``; the ``topk_groups`` best groups are kept (ties: lower group
    id) and no expert of another group is ever chosen. Then the ``top_k`` kept experts by
    ``sel``, descending, ties to the lower expert id. Two stable sorts give that order: by
    ``sel`` (equal values keep ascending ids), then by kept-or-not."""
    sel = s if bias is None else s + bias.to(s.dtype)
    sel = _no_nan(sel)
    t, e = sel.shape
    order = torch.sort(sel, dim=-1, descending=True, stable=True).indices
    if groups <= 1 or t == 0:
        return order[:, :top_k]
    per = e // groups
    grouped = sel.view(t, groups, per)
    group_score = _no_nan(grouped.topk(min(2, per), dim=-1).values.sum(-1))
    best = torch.sort(group_score, dim=-1, descending=True, stable=True).indices
    kept = torch.zeros(t, groups, dtype=torch.int8, device=s.device)
    kept.scatter_(1, best[:, :topk_groups], 1)
    kept = kept.repeat_interleave(per, dim=1).gather(1, order)
    first = torch.sort(kept, dim=-1, descending=True, stable=True).indices
    return order.gather(1, first)[:, :top_k]


def route_weights(s: Tensor, ids: Tensor, renormalize: bool, scaling: float) -> Tensor:
    """Routing weights of the chosen experts: the scores (not the biased ones), divided by
    their sum when ``renormalize`` (no epsilon), times ``scaling``."""
    w = s.gather(1, ids.long())
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scaling


def route(logits: Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          groups: int = 1, topk_groups: int = 1, bias: Tensor | None = None,
          scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """(weights (T, top_k) float32/float64, ids (T, top_k) int32)."""
    s = scores(logits, scoring)
    ids = select(s.detach(), top_k, groups, topk_groups, bias)
    return route_weights(s, ids, renormalize, scaling), ids.to(torch.int32)


def run_route(call, config: dict) -> None:
    weights, ids = route(call.logits, call.top_k, call.scoring, call.renormalize, call.groups,
                         call.topk_groups, call.correction_bias, call.scaling)
    call.weights.copy_(weights)
    call.ids.copy_(ids)


# ---- experts -------------------------------------------------------------------------------


def activate(gate: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")


def local_ids(ids: Tensor, expert_map: Tensor | None, num_local: int) -> Tensor:
    """(T, k) int64 local expert of every pair, -1 where the expert is not on this rank.

    An id outside the experts, or mapped outside the ``num_local`` local ones, counts as not
    local (as the Triton alignment reads it): ids on a GPU are not read back per call, and a
    bad one must never index outside a tensor."""
    ids = ids.long()
    e_global = num_local if expert_map is None else expert_map.shape[0]
    ok = (ids >= 0) & (ids < e_global)
    local = ids.clamp(0, max(e_global - 1, 0))
    if expert_map is not None:
        local = expert_map.long()[local] if e_global else local
    ok &= (local >= 0) & (local < num_local)
    return torch.where(ok, local, torch.full_like(local, -1))


def expert_weights(call, e: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(w13 (2I, H), w2 (H, I)) of local expert ``e``, dequantised: float32 for fp8 experts
    (the 128x128 block scales applied exactly), x's dtype for int4 (dequantised as int4_gemm
    does, rounded once), the stored dtype otherwise."""
    if call.quant == "fp8":
        block = (FP8_BLOCK, FP8_BLOCK)
        return (_fp8.dequantize(call.w13[e], call.w13_scale[e], block),
                _fp8.dequantize(call.w2[e], call.w2_scale[e], block))
    if call.quant == "int4":
        zeros13 = None if call.w13_zeros is None else call.w13_zeros[e]
        zeros2 = None if call.w2_zeros is None else call.w2_zeros[e]
        return (_int4.dequantize(call.w13[e], call.w13_scale[e], zeros13, call.group13, None,
                                 dtype),
                _int4.dequantize(call.w2[e], call.w2_scale[e], zeros2, call.group2, None, dtype))
    return call.w13[e], call.w2[e]


def _quantize_rows(a: Tensor) -> Tensor:
    """``a`` quantised to e4m3 in 1x128 blocks per row and dequantised (float32)."""
    a8, scale = _fp8.quantize(a, "block", torch.float8_e4m3fn, (1, FP8_BLOCK))
    return _fp8.dequantize(a8, scale, (1, FP8_BLOCK))


def fused(call) -> Tensor:
    """``y`` (T, H) of x's dtype; see the module docstring of ``kpt.ops.moe``."""
    x = call.x
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t, h = x.shape
    i = call.i
    out = torch.zeros(t, h, dtype=acc, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    local = local_ids(call.ids, call.expert_map, call.e)
    xin = _quantize_rows(x) if call.quant == "fp8" else x.to(acc)
    weights = call.weights.to(acc)
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = torch.where(local == e)
        w13, w2 = expert_weights(call, e, x.dtype)
        hid = xin[tok] @ w13.to(acc).t()
        a = (activate(hid[:, :i], call.activation) * hid[:, i:]).to(x.dtype)
        a = _quantize_rows(a) if call.quant == "fp8" else a.to(acc)
        y = a @ w2.to(acc).t()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out.to(x.dtype)


def run(call, config: dict) -> None:
    call.out.copy_(fused(call))


# ---- alignment -----------------------------------------------------------------------------


class Alignment(NamedTuple):
    """Pairs ``t * top_k + j`` grouped by local expert for grouped GEMMs; see ``align``."""

    sorted_pairs: Tensor  # (P,) int32; sentinel T * top_k for padding and unused entries
    block_expert: Tensor  # (P // block_m,) int32; -1 for blocks past num_padded
    num_padded: Tensor  # (1,) int32


def capacity(pairs: int, experts: int, block_m: int) -> int:
    """Entries ``sorted_pairs`` has room for: every pair plus each expert's worst padding."""
    total = pairs + experts * (block_m - 1)
    return -(-total // block_m) * block_m


def align(ids: Tensor, num_experts: int, block_m: int,
          expert_map: Tensor | None = None) -> Alignment:
    """Graph-safe alignment (static shapes, no host sync) in torch ops: each local expert's
    pairs, ascending, padded to a multiple of ``block_m`` with the sentinel ``T * top_k``;
    experts in ascending order; pairs of non-local experts dropped."""
    dev = ids.device
    pairs = ids.numel()
    local = local_ids(ids, expert_map, num_experts).reshape(-1)
    cap = capacity(pairs, num_experts, block_m)
    valid = local >= 0
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.index_add_(0, torch.where(valid, local, num_experts), torch.ones_like(local))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    # Rank of each pair inside its expert: a stable sort by expert keeps ascending pair order.
    key = torch.where(valid, local, num_experts)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    first = torch.searchsorted(sorted_key, sorted_key, right=False)
    rank = torch.arange(pairs, device=dev) - first
    dest = torch.where(sorted_key < num_experts,
                       starts[sorted_key.clamp(max=max(num_experts - 1, 0))] + rank,
                       torch.full_like(rank, cap))
    sorted_pairs = torch.full((cap + 1,), pairs, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    num_padded = ends[-1:] if num_experts else torch.zeros(1, dtype=torch.int64, device=dev)
    block_start = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < num_padded, block_expert,
                               torch.full_like(block_expert, -1))
    return Alignment(sorted_pairs[:cap], block_expert.to(torch.int32),
                     num_padded.to(torch.int32))
