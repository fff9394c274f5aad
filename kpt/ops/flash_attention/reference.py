"""The specification of ``flash_attention`` in plain PyTorch (forward and backward).

For every sequence of the batch and every query head ``h`` (its kv head is ``h // group``), with
``Sq`` queries, ``Sk`` keys and the bottom-right diagonal ``diag = Sk - Sq``::

    s[i, j] = q[i] . k[j] * (scale * log2(e))             # float32, log2 units
    s[i, j] = (softcap * log2(e)) * tanh(q[i] . k[j] * (scale / softcap))   # if softcap > 0
    visible(i, j) = (right < 0 or j <= i + diag + right) and (left < 0 or j >= i + diag - left)
    lse2[i] = log2(sum_{visible j} 2^s[i, j])             # -inf with no visible j
    out[i] = sum_{visible j} 2^(s[i, j] - lse2[i]) v[j]   # 0 where lse2[i] = -inf
    lse[i] = lse2[i] * ln(2)                              # returned in natural log

This is the natural-log softmax of ``scale * q . k``, with the logits formed as the kernels form
them: in log2 units, each factor in parentheses rounded to float32 once. Overflow is therefore
defined alike on every backend: a product past float32's range (|q . k * scale| above
``FLT_MAX / log2(e)``) is +-inf. A -inf logit weighs 0, and a row whose visible logits are all
-inf is treated as a row without visible keys: lse -inf and out 0 (as FlashAttention and torch's
flex_attention treat it; the kernels cannot tell the two apart). A row with a +inf logit gets
lse +inf and out NaN (inf / inf), even beside NaN logits (the kernels' running maximum skips
NaN); otherwise a NaN logit makes out and lse NaN. The CUDA/HIP kernels apply this rule through
one header, ``csrc/include/kpt/softmax.h``.

Keys a query cannot see take no part in its output, whatever they hold: a NaN or inf in the
keys or values of masked positions never reaches it, and masked values never reach the
gradients either (a non-finite *key* at a masked position still reaches dq: ``ds @ k``).

``causal`` is ``right = 0``. Everything is computed in float32 and rounded to the input dtype
once at the end. Queries are processed in chunks so that the (Sq, Sk) score matrix is never
materialised for long sequences. The backward recomputes the probabilities per chunk (exactly,
in float32) and applies the textbook softmax gradient of the natural-log logits
(``d s / d (q . k) = scale``, times ``1 - tanh^2`` with a soft-cap); ``delta = rowsum(p * dp)``
is formed from the recomputed probabilities, not from the rounded output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kpt.ops._common import visible_matmul

# Elements of one chunk's (heads, chunk, Sk) score tensor; a few such tensors are alive at once.
_CHUNK_ELEMENTS = 1 << 25
_MAX_CHUNK = 1024
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _chunk(heads: int, seqlen_k: int) -> int:
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(1, heads * seqlen_k)))


def _segments(
    q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None
) -> list[tuple[tuple, tuple]]:
    """Index tuples (into q, into k) of every sequence: (b,) for (B, S, H, D), slices for varlen."""
    if cu_seqlens_q is None:
        return [((b,), (b,)) for b in range(q.shape[0])]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [((slice(cq[b], cq[b + 1]),), (slice(ck[b], ck[b + 1]),)) for b in range(len(cq) - 1)]


def _scores(qc: Tensor, kf: Tensor, rows: Tensor, seqlen_q: int, scale: float, left: int,
            right: int, softcap: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """Logits of one query chunk.

    qc: (Hkv, G, c, D) float32, kf: (Hkv, Sk, D) float32, rows: (c,) query indices.
    Returns (s, tanh or None, visible): s (Hkv, G, c, Sk) in log2 units (the module doc) with
    masked entries = -inf. A Python float multiplier is rounded to float32 before the product.
    """
    seqlen_k = kf.shape[1]
    qk = torch.matmul(qc, kf[:, None].transpose(-1, -2))
    t = None
    if softcap > 0:
        t = torch.tanh(qk * (scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        s = qk * (scale * LOG2E)
    cols = torch.arange(seqlen_k, device=kf.device)
    diag = seqlen_k - seqlen_q
    visible = torch.ones(rows.shape[0], seqlen_k, dtype=torch.bool, device=kf.device)
    if right >= 0:
        visible &= cols[None, :] <= rows[:, None] + diag + right
    if left >= 0:
        visible &= cols[None, :] >= rows[:, None] + diag - left
    s = s.masked_fill(~visible, float("-inf"))
    return s, t, visible


def _probs(s: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over visible keys of log2-unit logits and its natural-log normaliser;
    rows without a visible logit above -inf give p = 0 and lse -inf, rows with a +inf logit
    lse +inf."""
    if s.shape[-1] == 0:
        return s.clone(), s.new_full(s.shape[:-1], float("-inf"))
    # As torch.logsumexp, in base 2: shift by the row max, or by 0 where it is +-inf.
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m.abs() == math.inf, 0.0)
    lse2 = torch.log2(torch.exp2(s - m).sum(-1, keepdim=True)) + m
    lse2 = lse2.masked_fill((s == math.inf).any(-1, keepdim=True), math.inf)
    p = torch.exp2(s - lse2).masked_fill(~visible | (lse2 == -math.inf), 0.0)
    return p, lse2.squeeze(-1) * LN2


def _heads_first(x: Tensor, groups: int) -> Tensor:
    """(c, H, D) -> (Hkv, G, c, D) float32 with H = Hkv * G (query head h = kv * G + g)."""
    c, h, d = x.shape
    return x.float().permute(1, 0, 2).reshape(h // groups, groups, c, d)


def _tokens_first(x: Tensor) -> Tensor:
    """(Hkv, G, c, D) -> (c, H, D)."""
    hkv, g, c, d = x.shape
    return x.reshape(hkv * g, c, d).permute(1, 0, 2)


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[Tensor, Tensor]:
    """q (B, Sq, H, D) or (Tq, H, D) varlen; k, v (B, Sk, Hkv, D) or (Tk, Hkv, D).

    Returns out (like q, q's dtype) and lse (float32; (B, H, Sq) or (H, Tq)). Varlen tokens
    outside every sequence get out = 0 and lse = -inf.
    """
    varlen = cu_seqlens_q is not None
    heads, hkv = q.shape[-2], k.shape[-2]
    groups = heads // hkv
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if varlen:
        lse = torch.full((heads, q.shape[0]), float("-inf"), device=q.device)
    else:
        lse = torch.empty(q.shape[0], heads, q.shape[1], device=q.device)
    for qi, ki in _segments(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs = q[qi], k[ki], v[ki]
        seqlen_q, seqlen_k = qs.shape[0], ks.shape[0]
        kf = ks.float().permute(1, 0, 2)
        vf = vs.float().permute(1, 0, 2)
        o_seg = out[qi]
        lse_seg = lse[:, qi[0]] if varlen else lse[qi]
        step = _chunk(heads, seqlen_k)
        for i0 in range(0, seqlen_q, step):
            rows = torch.arange(i0, min(i0 + step, seqlen_q), device=q.device)
            qc = _heads_first(qs[i0 : i0 + step], groups)
            s, _, visible = _scores(qc, kf, rows, seqlen_q, scale, window_left, window_right,
                                    softcap)
            p, lse_c = _probs(s, visible)
            o_seg[i0 : i0 + step] = _tokens_first(visible_matmul(p, visible, vf[:, None]))
            lse_seg[:, i0 : i0 + step] = lse_c.reshape(heads, -1)
    return out.to(q.dtype), lse


def attention_backward(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``attention_forward`` for output gradient ``dout`` (like q) and
    optional ``dlse`` (like lse). dk, dv sum over the query heads of each kv group; the chunk
    loop accumulates in a fixed order, so the result is deterministic."""
    varlen = cu_seqlens_q is not None
    heads, hkv = q.shape[-2], k.shape[-2]
    groups = heads // hkv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for qi, ki in _segments(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs, dos = q[qi], k[ki], v[ki], dout[qi]
        seqlen_q, seqlen_k = qs.shape[0], ks.shape[0]
        kf = ks.float().permute(1, 0, 2)
        vf = vs.float().permute(1, 0, 2)
        dkf = torch.zeros_like(kf)
        dvf = torch.zeros_like(vf)
        dq_seg = dq[qi]
        step = _chunk(heads, seqlen_k)
        for i0 in range(0, seqlen_q, step):
            rows = torch.arange(i0, min(i0 + step, seqlen_q), device=q.device)
            qc = _heads_first(qs[i0 : i0 + step], groups)
            doc = _heads_first(dos[i0 : i0 + step], groups)
            s, t, visible = _scores(qc, kf, rows, seqlen_q, scale, window_left, window_right,
                                    softcap)
            p, _ = _probs(s, visible)
            # a key a row cannot see contributes nothing, whatever its value (NaN included)
            dp = torch.matmul(doc, vf[:, None].transpose(-1, -2)).masked_fill(~visible, 0.0)
            delta = (p * dp).sum(-1, keepdim=True)
            if dlse is not None:
                g = dlse[:, qi[0]] if varlen else dlse[qi]
                delta = delta - g[:, i0 : i0 + step].float().reshape(hkv, groups, -1, 1)
            # nor a NaN delta (a row whose out is NaN) the keys that row cannot see
            ds = (p * (dp - delta)).masked_fill(~visible, 0.0)
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = ds * scale
            dq_seg[i0 : i0 + step] = _tokens_first(torch.matmul(ds, kf[:, None]))
            dkf += torch.matmul(ds.transpose(-1, -2), qc).sum(1)
            dvf += torch.matmul(p.transpose(-1, -2), doc).sum(1)
        dk[ki] = dkf.permute(1, 0, 2)
        dv[ki] = dvf.permute(1, 0, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def run(call, config: dict) -> None:
    """Reference backend of ``flash_attention``: write call.out and call.lse."""
    out, lse = attention_forward(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k,
                                 call.scale, call.window_left, call.window_right, call.softcap)
    call.out.copy_(out)
    call.lse.copy_(lse)


def run_backward(call, config: dict) -> None:
    """Reference backend of ``flash_attention_backward``: write call.dq, call.dk, call.dv."""
    dq, dk, dv = attention_backward(call.dout, call.dlse, call.q, call.k, call.v,
                                    call.cu_seqlens_q, call.cu_seqlens_k, call.scale,
                                    call.window_left, call.window_right, call.softcap)
    call.dq.copy_(dq)
    call.dk.copy_(dk)
    call.dv.copy_(dv)
