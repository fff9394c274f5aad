"""Attention in static shapes for XLA: padded batches with validity masks built on the device.

``flash_attention`` (varlen) and ``paged_attention`` reduce to :func:`attend` over a padded
batch: every sequence's queries in ``max_q`` slots and its keys in ``max_k`` slots, with the
sequence lengths as tensors. The masks come from comparisons with ``arange`` on the device, so
nothing is read back to the host and the graph depends only on the padded sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, *, scale: float, left: int,
           right: int, softcap: float, k_len: Tensor | None = None,
           q_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked attention of a padded batch, as ``flash_attention/reference.py`` defines it.

    q (N, M, H, D), k and v (N, L, Hkv, D), any float dtype; ``q_pos`` (N, M) int: each
    query's diagonal key position (bottom-right alignment: key ``j`` is visible iff ``j <= pos
    + right`` when ``right >= 0`` and ``j >= pos - left`` when ``left >= 0``); ``k_len`` (N,):
    keys past it are padding; ``q_valid`` (N, M) bool: padding query slots.

    Returns out (N, M, H, D) float32 and lse (N, H, M) float32; a query that sees no key gets
    out 0 and lse -inf. Differentiable (the xla backward is autograd through it): masked
    entries never meet a NaN, so padding that holds garbage gets zero gradients.
    """
    n, m, h, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    dev = q.device
    cols = torch.arange(length, device=dev)
    visible = torch.ones(n, m, length, dtype=torch.bool, device=dev)
    pos = q_pos.to(torch.int64)[:, :, None]
    if right >= 0:
        visible = visible & (cols <= pos + right)
    if left >= 0:
        visible = visible & (cols >= pos - left)
    kf, vf = k.float(), v.float()
    if k_len is not None:
        k_ok = cols[None, :] < k_len.to(torch.int64)[:, None]  # (N, L)
        visible = visible & k_ok[:, None, :]
        # Padding keys may hold anything (NaN included): zero them, so 0 * NaN never forms.
        kf = torch.where(k_ok[:, :, None, None], kf, 0.0)
        vf = torch.where(k_ok[:, :, None, None], vf, 0.0)
    qf = q.float()
    if q_valid is not None:
        visible = visible & q_valid[:, :, None]
        qf = torch.where(q_valid[:, :, None, None], qf, 0.0)
    # (N, Hkv, G, M, D) x (N, Hkv, L, D): query head hq reads kv head hq // G.
    qg = qf.reshape(n, m, hkv, h // hkv, d).permute(0, 2, 3, 1, 4)
    kt = kf.permute(0, 2, 3, 1)[:, :, None]  # (N, Hkv, 1, D, L)
    s = torch.matmul(qg, kt) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    vis = visible[:, None, None]  # (N, 1, 1, M, L)
    dead = ~visible.any(-1)[:, None, None]  # (N, 1, 1, M): rows without a visible key
    s = torch.where(vis, s, NEG_INF)
    # Dead rows: a zero row keeps logsumexp and its gradient finite; their weights are zeroed.
    s = torch.where(dead[..., None], 0.0, s)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(vis, torch.exp(s - lse[..., None]), 0.0)
    out = visible_product(p, vis, vf.permute(0, 2, 1, 3)[:, :, None])  # (N, Hkv, G, M, D)
    lse = torch.where(dead, NEG_INF, lse)
    return out.permute(0, 3, 1, 2, 4).reshape(n, m, h, d), lse.reshape(n, h, m)


def visible_product(p: Tensor, visible: Tensor, v: Tensor) -> Tensor:
    """``p @ v`` over the keys each row sees, in static shapes: p (..., M, L) is 0 where
    ``visible`` (broadcast to it) is False, v (..., L, D).

    As the references (``kpt.ops._common.visible_matmul``), a NaN or inf value of a key a row
    cannot see never reaches it; without the references' data-dependent branch. A non-finite
    value a row sees makes that output feature NaN (the references keep IEEE products there,
    e.g. +inf; telling them apart needs a (M, L, D) tensor). It costs a second product, of a
    0/1 matrix with one row per kv head (not per query head), and no gradient flows through it.
    """
    finite = torch.isfinite(v)
    out = torch.matmul(p, torch.where(finite, v, 0.0))
    seen = torch.matmul(visible.to(p.dtype), (~finite).to(p.dtype))
    return torch.where(seen > 0, float("nan"), out)


def pad(x: Tensor, starts: Tensor, lengths: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Rows ``starts[b] .. starts[b] + lengths[b] - 1`` of ``x`` (T, ...) into (B, slots, ...),
    zeros past each length; returns it and the (B, slots) validity mask."""
    i = torch.arange(slots, device=x.device)
    valid = i[None, :] < lengths[:, None]
    index = (starts[:, None] + i[None, :]).clamp(0, max(x.shape[0] - 1, 0))
    rows = x[index]
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 1)))
    return torch.where(mask, rows, torch.zeros((), dtype=x.dtype, device=x.device)), valid


def unpad_index(cu: Tensor, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each of ``tokens`` packed rows: its sequence under offsets ``cu`` (B + 1,), its index
    in that sequence, and whether it lies in a sequence at all (rows before ``cu[0]`` or from
    ``cu[-1]`` on do not)."""
    t = torch.arange(tokens, device=cu.device)
    cu = cu.to(torch.int64)
    batch = cu.shape[0] - 1
    # Sequences that end at or before t precede it (empty ones included): a count, no search.
    seq = (cu[None, 1:] <= t[:, None]).sum(-1).clamp(max=max(batch - 1, 0))
    inside = (t >= cu[0]) & (t < cu[-1])
    return seq, t - cu[seq], inside
