"""kpt's attention as a transformers attention implementation (``attn_implementation="kpt"``).

transformers calls ``attention_forward(module, query, key, value, attention_mask, ...)`` with
q/k/v shaped (B, H, S, D) and expects (B, S, H, D) back. The mask comes from :func:`mask`, which
follows flash-attention-2's contract: ``None`` when every key is visible under the causal (or
bidirectional) rule, else a (B, L) boolean padding mask over the keys. What runs:

* no mask: ``flash_attention`` on the (B, S, H, D) views, in place; packed batches (several
  sequences in one row, marked by the ``cu_seq_lens_*`` kwargs of ``DataCollatorWithFlattening``
  or, as transformers reads them, by ``position_ids`` that do not follow their predecessor
  while no KV cache is in use) run as varlen sequences, so no token attends across a sequence
  boundary;
* a padding mask: the real tokens are gathered once per mask and run as varlen sequences
  (no padded FLOPs, no S x S mask), and the output is scattered back with zeros at the pads;
* keys from a ``PagedCache`` (``_hf_paged``): the cache's layer stores them and attends with
  ``paged_attention`` or ``cascade_attention`` over its pages;
* one query token (decode): SDPA, with the GQA heads sharing a kv head packed into the query
  dimension so that each kv head's cache is read once, and any padding or static-cache mask
  applied in place (kpt's flash kernels split no keys, which one-token decode needs: measured
  slower there; a paged decode kernel is kpt's ``paged_attention``'s job).

What kpt cannot express runs HF-equivalent dense attention (SDPA with an explicit boolean
mask, or plain math when soft-capped) and logs the reason once: a 4-D mask, attention dropout
while training, float32 on a GPU, head dims past 256, attention sinks, and a padding mask under
CUDA-graph capture (unpadding needs the host). Under torch.compile, unpadding and telling a
packed batch from ``position_ids`` need the host too: each is a graph break (once per layer, as
in transformers' flash-attention path); decode steps (one query) never take one.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpt.ops.flash_attention import MAX_HEAD_DIM, flash_attention

log = logging.getLogger("kpt")

NAME = "kpt"
# The attention modules of a model patched with ``patch(model, backend=...)`` carry the backend.
BACKEND_ATTR = "_kpt_attention_backend"
# Set in the kwargs by kpt's fused attention forward when a KV cache is in use: position_ids
# then mark no packed sequences (transformers' own rule), only cu_seq_lens kwargs do.
CACHE_IN_USE = "kpt_cache_in_use"
# Set on the new keys by ``PagedCache.update`` (``_hf_paged``): the layer whose pages hold them,
# which stores them and attends with ``paged_attention`` (it has the padding mask update lacks).
PAGED_ATTR = "_kpt_paged"
# How often each path ran, by name ("flash", "varlen", "packed", "decode_sdpa", "paged_decode",
# "paged_prefill", "cascade", or "fallback: <reason>"); eager calls only (counting is skipped
# while torch.compile traces).
calls: collections.Counter[str] = collections.Counter()
_logged: set[str] = set()


def mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
         mask_function: Any = None, attention_mask: Tensor | None = None,
         **kwargs: Any) -> Tensor | None:
    """transformers' mask hook for ``"kpt"``: flash-attention-2's contract. ``None`` when every
    key is visible under the causal (or bidirectional) rule; else a (B, L <= kv_length) boolean
    mask of the keys that exist, the queries being its last ``q_length`` columns (keys past L are
    a static cache's unwritten slots). Under torch.compile, a static cache without a padding mask
    gets the full (B, 1, Sq, Sk) mask of HF's SDPA path instead (its fill level lives on the
    device), which the attention then runs through SDPA; so does one during CUDA-graph capture."""
    if attention_mask is not None:
        keys = attention_mask[:, -kv_length:]
        keys = keys if keys.dtype == torch.bool else keys.bool()
        # The all-visible test reads the mask on the host: skipped while tracing (the
        # attention then unpads the batch in an eager region, which is correct either way).
        if (keys.shape[1] == kv_length and not torch.compiler.is_compiling()
                and not _capturing() and bool(keys.all())):
            return None
        return keys
    written = q_offset + q_length - kv_offset
    if not isinstance(written, Tensor) and written >= kv_length:
        return None
    if torch.compiler.is_compiling() or _capturing():
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        kwargs.pop("allow_is_causal_skip", None)
        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=None,
            allow_is_causal_skip=False, **kwargs)
    written = int(written)  # a static cache's fill level: one read per forward, not per layer
    if written >= kv_length:
        return None
    device = kwargs.get("device") or getattr(q_offset, "device", None)
    return torch.ones(batch_size, written, dtype=torch.bool, device=device)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def register() -> None:
    """Registers ``"kpt"`` in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)


# Whether the output_attentions warning was given (once per process, as transformers' own).
_NO_WEIGHTS_WARNED: list[bool] = []


def _count(name: str) -> None:
    if not torch.compiler.is_compiling():
        calls[name] += 1


def _fallback_reason(module: nn.Module, query: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float, kwargs: dict) -> str | None:
    if attention_mask is not None and attention_mask.dim() != 2:
        return "a 4-D attention mask (kpt translates padding masks only)"
    if dropout > 0 and module.training:
        return "attention dropout while training"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if query.shape[-1] != value.shape[-1] or query.shape[-1] > MAX_HEAD_DIM:
        return f"head dims q/k {query.shape[-1]}, v {value.shape[-1]} (kpt: equal and <= 256)"
    if query.dtype == torch.float32 and query.device.type != "cpu":
        return "float32 on a GPU (kpt's attention kernels take fp16/bf16)"
    if attention_mask is not None and _capturing():
        return "a padding or static-cache mask during CUDA-graph capture (unpadding needs the host)"
    return None


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """The ``"kpt"`` attention implementation: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) ->
    (B, Sq, H, D); bottom-right aligned masks (the queries are the last tokens)."""
    if kwargs.get("output_attentions", False) and not _NO_WEIGHTS_WARNED:
        # As with HF's sdpa: the kernels never form the probabilities, so none are returned.
        _NO_WEIGHTS_WARNED.append(True)
        log.warning("kpt attention returns no attention weights: output_attentions=True gives "
                    "none (as with sdpa); set attn_implementation='eager' to get them")
    paged = getattr(key, PAGED_ATTR, None)
    if paged is not None:
        return paged.attend(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                            is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    left = -1 if sliding_window is None else int(sliding_window) - 1
    # HF's window counts the query itself (key j visible iff i - j < sliding_window); without
    # causality it is symmetric, as in HF's flash-attention path.
    window = (left, -1 if causal else left)
    if query.shape[2] == 1 and kwargs.get("s_aux") is None:
        # One query token: kpt's flash kernels tile queries by 64-128 rows and split no keys,
        # so a decode step would run one CTA per (sequence, head) over the whole cache; SDPA's
        # split kernels measured faster on an H100 (2026-12-06, bench/bench_e2e_hf.py decode
        # rows). The heads of a GQA group share one read of their kv head (_dense_attention),
        # and a padding or static-cache mask is applied in place (unpadding would copy the
        # cache every step).
        _count("decode_sdpa")
        if attention_mask is None and (left < 0 or left + 1 >= key.shape[2]):
            causal, window = False, (-1, -1)  # the one query sees every key: no mask at all
        return _dense_attention(query, key, value, attention_mask, scaling, causal, window,
                                softcap, dropout if module.training else 0.0), None
    reason = _fallback_reason(module, query, value, attention_mask, dropout, kwargs)
    if reason is not None:
        _count(f"fallback: {reason}")
        if reason not in _logged and not torch.compiler.is_compiling():
            _logged.add(reason)
            log.warning("kpt attention: %s; these calls run SDPA", reason)
        out = _dense_attention(query, key, value, attention_mask, scaling, causal, window,
                               softcap, dropout if module.training else 0.0)
        return out, None
    options = {"scale": scaling, "softcap": float(softcap or 0.0),
               "backend": getattr(module, BACKEND_ATTR, None)}
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attention_mask is not None:
        if torch.compiler.is_compiling():  # a graph break: the gather needs the host
            return _padded_eager(q, k, v, attention_mask, causal, window, options), None
        return _padded(q, k, v, attention_mask, causal, window, options), None
    packed = _packed(kwargs, q.shape[0], q.shape[1], k.shape[1], q.device)
    if packed is not None:
        _count("packed")
        cu, max_len = packed
        batch, seq = q.shape[:2]
        out = flash_attention(q.reshape(batch * seq, *q.shape[2:]),
                              k.reshape(batch * seq, *k.shape[2:]),
                              v.reshape(batch * seq, *v.shape[2:]), causal=causal, window=window,
                              cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                              max_seqlen_k=max_len, **options)
        return out.view(q.shape), None
    _count("flash")
    return flash_attention(q, k, v, causal=causal, window=window, **options), None


# ---- packed and padded batches ---------------------------------------------------------------


def _packed(kwargs: dict, batch: int, seq: int, key_len: int,
            device: torch.device) -> tuple[Tensor, int] | None:
    """(cu_seqlens, max_len) of a packed batch over the flattened (batch * seq) tokens, or None.

    From the collator's ``cu_seq_lens_q/k`` when given, else from ``position_ids`` that restart
    inside a row."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None or cu_q is not cu_k:
            return _packed_from_lengths(cu_q, cu_k, max_len, device)
        return cu_q.to(device=device, dtype=torch.int32), int(max_len)
    position_ids = kwargs.get("position_ids")
    if (position_ids is None or seq == 1 or key_len != seq or position_ids.shape[-1] != seq
            or kwargs.get(CACHE_IN_USE)):
        return None
    if _capturing():
        raise RuntimeError("kpt attention: whether position_ids restart (a packed batch) cannot "
                           "be read during CUDA-graph capture; pass cu_seq_lens_q/k and "
                           "max_length_q/k, or capture decode steps only")
    return _packed_from_positions(position_ids, batch, seq, device)


@torch.compiler.disable
def _packed_from_lengths(cu_q: Tensor, cu_k: Tensor, max_len: Any,
                         device: torch.device) -> tuple[Tensor, int]:
    if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        raise ValueError("kpt attention: cu_seq_lens_q and cu_seq_lens_k differ; packed "
                         "self-attention needs one set of sequence boundaries")
    if max_len is None:
        max_len = (cu_q[1:] - cu_q[:-1]).max()
    return cu_q.to(device=device, dtype=torch.int32), int(max_len)


# Whether positions restart is data: reading it needs the host, so under torch.compile this is
# a graph break (as in transformers' flash-attention path), never a guess.
@torch.compiler.disable
def _packed_from_positions(position_ids: Tensor, batch: int, seq: int,
                           device: torch.device) -> tuple[Tensor, int] | None:
    """Computed once per position_ids tensor (one forward), not once per layer."""
    key = (position_ids._version, batch, seq)
    cached = getattr(position_ids, "_kpt_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    pos = position_ids.reshape(-1, seq).expand(batch, seq)
    starts = torch.ones(batch, seq, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()
    result = None
    if first.numel() > batch:
        cu = torch.cat([first, first.new_tensor([batch * seq])]).to(device=device,
                                                                   dtype=torch.int32)
        result = (cu, int((cu[1:] - cu[:-1]).max()))
    position_ids._kpt_packed = (key, result)
    return result


def _tokens(mask: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """The real tokens among the last ``length`` columns of ``mask``: (batch index, column
    index, cu_seqlens, longest), computed once per mask tensor and length."""
    cache = getattr(mask, "_kpt_tokens", None)
    if cache is None or cache[0] != mask._version:
        cache = (mask._version, {})
        mask._kpt_tokens = cache
    found = cache[1].get(length)
    if found is None:
        part = mask[:, mask.shape[1] - length:]
        lengths = part.sum(-1, dtype=torch.int32)
        rows, cols = part.nonzero(as_tuple=True)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        found = (rows, cols, cu, int(lengths.max()) if lengths.numel() else 0)
        cache[1][length] = found
    return found


def _padded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: bool,
            window: tuple[int, int], options: dict) -> Tensor:
    """Attention over the real tokens of a padded batch; q (B, Sq, H, D), k/v (B, Sk, Hkv, D)
    views. The queries are the last Sq mask columns; keys past the mask (a static cache's
    unwritten slots) are not read."""
    _count("varlen")  # here, not in the caller: under torch.compile this part runs eagerly
    batch, seq, heads, dim = q.shape
    length = mask.shape[1]
    if length > k.shape[1]:
        raise ValueError(f"kpt attention: the padding mask covers {length} keys, the cache "
                         f"holds {k.shape[1]}")
    rows_k, cols_k, cu_k, max_k = _tokens(mask, length)
    rows_q, cols_q, cu_q, max_q = (rows_k, cols_k, cu_k, max_k) if seq == length else \
        _tokens(mask, seq)
    # Under the bottom-right rule the real queries of a sequence are its last real keys, which
    # holds for any pattern of pads once both are compacted in order.
    out = flash_attention(q[rows_q, cols_q], k[rows_k, cols_k], v[rows_k, cols_k],
                          causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=max_q, max_seqlen_k=max_k, **options)
    return out.new_zeros(batch, seq, heads, dim).index_put((rows_q, cols_q), out)


# Under torch.compile the unpadding runs eagerly (finding the real tokens reads the mask on the
# host): one graph break per layer, as in transformers' flash-attention path, and the layer's
# other ops stay compiled.
_padded_eager = torch.compiler.disable(_padded)


# ---- dense fallback --------------------------------------------------------------------------


def _visible(attention_mask: Tensor | None, batch: int, q_len: int, k_len: int, causal: bool,
             window: tuple[int, int], device: torch.device) -> Tensor | None:
    """(B or 1, 1, Sq, Sk) boolean visibility from a (B, L) key mask and the causal/window rule
    (queries aligned to the end of the L real-or-padded keys), or None when all is visible."""
    if attention_mask is None and not causal and window == (-1, -1):
        return None  # before building anything: every decode step without a mask lands here
    length = k_len if attention_mask is None else attention_mask.shape[1]
    keys = torch.arange(k_len, device=device)
    query_pos = torch.arange(q_len, device=device)[:, None] + (length - q_len)
    rule = keys[None, :] < length
    if causal:
        rule = rule & (keys[None, :] <= query_pos)
    elif window[1] >= 0:
        rule = rule & (keys[None, :] <= query_pos + window[1])
    if window[0] >= 0:
        rule = rule & (keys[None, :] >= query_pos - window[0])
    visible = rule[None, None]
    if attention_mask is not None:
        pad = F.pad(attention_mask, (0, k_len - length), value=False)
        visible = visible & pad[:, None, None, :]
    return visible


def _dense_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scale: float | None, causal: bool, window: tuple[int, int],
                     softcap: float | None, dropout: float) -> Tensor:
    """HF-equivalent dense attention with an explicit mask; returns (B, Sq, H, D)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    if attention_mask is not None and attention_mask.dim() == 4:
        visible = attention_mask  # a complete mask, boolean or additive, as HF passes it
    else:
        visible = _visible(attention_mask, batch, q_len, k_len, causal, window, query.device)
    group = heads // kv_heads
    if q_len == 1 and group > 1 and (visible is None or visible.shape[1] == 1):
        # One query: the group's heads become query rows of their kv head (no repeated cache).
        out = _attend(query.reshape(batch, kv_heads, group, dim), key, value, visible, scale,
                      softcap, dropout)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2)
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    return _attend(query, key, value, visible, scale, softcap, dropout).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float,
            softcap: float | None, dropout: float) -> Tensor:
    """softmax(scale q k^T [soft-capped, masked]) v; rows that see no key give zeros."""
    seen = None
    if visible is not None and visible.dtype == torch.bool:
        seen = visible.any(-1, keepdim=True)
        visible = visible | ~seen  # SDPA returns NaN for empty rows; zeroed below
    if softcap:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if visible is not None:
            scores = (scores.masked_fill(~visible, float("-inf")) if visible.dtype == torch.bool
                      else scores + visible.float())
        probs = F.dropout(torch.softmax(scores, -1), p=dropout)
        out = (probs @ v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout,
                                             scale=scale)
    return out if seen is None else out * seen.to(out.dtype)
