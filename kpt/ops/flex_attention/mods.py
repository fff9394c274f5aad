"""Named score/mask mods: plain callables that every flex_attention accepts (kpt's Triton and
reference backends, torch's own ``flex_attention`` and ``create_block_mask``), and that kpt's
``cuda``/``hip`` backends lower to a hand-written kernel's parameters.

Index conventions are torch flex's: ``q_idx`` and ``kv_idx`` count from 0 at the *start* of the
query and key sequences (top-left alignment, also when ``Sq != Sk``)::

    from kpt.ops.flex_attention import create_block_mask, flex_attention, mods
    mask = mods.and_masks(mods.document(doc_ids), mods.causal())
    bm = create_block_mask(mask, B, None, S, S, device="cuda")
    out = flex_attention(q, k, v, mods.compose(mods.softcap(30.0), mods.alibi(slopes)), bm)

Each constructor's result carries ``.kpt_mod``, a :class:`NamedMod` (name and parameters), for
people and logs. The cuda/hip backends do not rely on it: they recognise the traced expression
(``_lower.py``), so an equivalent hand-written lambda lowers too, and a combination the kernel
cannot express gets a reason (and another backend) rather than an approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class NamedMod:
    """Machine-readable description of a named mod: ``name`` and its parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    parts: tuple[NamedMod, ...] = ()


def _named(fn: Callable, name: str, parts: tuple = (), **params: Any) -> Callable:
    fn.kpt_mod = NamedMod(name, params, parts)
    fn.__name__ = fn.__qualname__ = name
    return fn


def describe(mod: Callable | None) -> NamedMod | None:
    """The :class:`NamedMod` of a mod built here, else None."""
    return getattr(mod, "kpt_mod", None)


# ---- mask mods --------------------------------------------------------------------------------


def causal() -> Callable:
    """Query ``i`` sees keys ``j <= i`` (torch's top-left causal: ``q_idx >= kv_idx``)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return _named(mask_mod, "causal")


def sliding_window(window: int) -> Callable:
    """Causal sliding window: query ``i`` sees keys ``i - window <= j <= i`` (``window + 1``
    keys; FlashAttention's ``window_size=(window, 0)`` when ``Sq == Sk``)."""
    window = _nonnegative_int("sliding_window", "window", window)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return _named(mask_mod, "sliding_window", window=window)


def prefix_lm(prefix_lengths: int | Tensor) -> Callable:
    """Prefix-LM: keys ``j < prefix`` are visible to every query, the rest causally.

    ``prefix_lengths``: an int, or an integer tensor (B,) with one prefix per batch row."""
    if isinstance(prefix_lengths, Tensor):
        _check_index_tensor("prefix_lm", "prefix_lengths", prefix_lengths, (1,))
        lengths = prefix_lengths

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) | (q_idx >= kv_idx)
        return _named(mask_mod, "prefix_lm", prefix_lengths=lengths)
    n = _nonnegative_int("prefix_lm", "prefix_lengths", prefix_lengths)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811 - one of two closures is returned
        return (kv_idx < n) | (q_idx >= kv_idx)
    return _named(mask_mod, "prefix_lm", prefix_lengths=n)


def document(doc_ids: Tensor) -> Callable:
    """Document masking: ``q`` and ``kv`` attend only within the same document id.

    ``doc_ids``: integer tensor (S,) shared by the batch, or (B, S), indexed by both ``q_idx``
    and ``kv_idx`` (so S covers the longer of the two sequences). Not causal by itself:
    ``and_masks(document(ids), causal())``."""
    _check_index_tensor("document", "doc_ids", doc_ids, (1, 2))
    ids = doc_ids
    if ids.dim() == 1:
        def mask_mod(b, h, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]
    return _named(mask_mod, "document", doc_ids=ids)


def and_masks(*masks: Callable) -> Callable:
    """Visible where every mask is (elementwise ``&``)."""
    return _combine("and_masks", masks, lambda a, x: a & x)


def or_masks(*masks: Callable) -> Callable:
    """Visible where any mask is (elementwise ``|``)."""
    return _combine("or_masks", masks, lambda a, x: a | x)


def _combine(name: str, masks: tuple[Callable, ...], op: Callable) -> Callable:
    if not masks or not all(callable(m) for m in masks):
        raise TypeError(f"flex_attention.mods.{name}: expects one or more mask mods")
    first, rest = masks[0], masks[1:]

    # No torch.ones seed (unlike torch's and_masks): the tracer records only the masks' terms.
    def mask_mod(b, h, q_idx, kv_idx):
        out = first(b, h, q_idx, kv_idx)
        for m in rest:
            out = op(out, m(b, h, q_idx, kv_idx))
        return out
    return _named(mask_mod, name, tuple(filter(None, map(describe, masks))))


# ---- score mods -------------------------------------------------------------------------------


def softcap(cap: float) -> Callable:
    """Gemma-2-style logit soft-capping: ``cap * tanh(score / cap)``, ``cap > 0``."""
    if (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
            or not cap > 0):
        raise ValueError(f"flex_attention.mods.softcap: cap must be a finite number > 0, got "
                         f"{cap!r}")
    cap = float(cap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return _named(score_mod, "softcap", cap=cap)


def alibi(slopes: Tensor) -> Callable:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` (a penalty on past keys for positive
    slopes). ``slopes``: float tensor (H,), e.g. :func:`alibi_slopes`."""
    if not isinstance(slopes, Tensor) or slopes.dim() != 1 or not slopes.is_floating_point():
        raise TypeError("flex_attention.mods.alibi: slopes must be a 1-D float tensor (H,)")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return _named(score_mod, "alibi", slopes=slopes)


def alibi_slopes(heads: int, device: str | torch.device | None = None) -> Tensor:
    """The ALiBi paper's geometric slopes ``2^(-8 i / n)`` for ``heads`` heads (float32),
    with its interleaving rule for a head count that is not a power of two."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"flex_attention: alibi_slopes needs a positive int head count, got "
                         f"{heads!r}")
    n = 1 << (heads.bit_length() - 1)
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2.0 ** (-4.0 * (2 * i + 1) / n) for i in range(heads - n)]
    return torch.tensor(base + extra, dtype=torch.float32, device=device)


def compose(*score_mods: Callable) -> Callable:
    """Apply score mods in order: ``compose(f, g)(s, ...) == g(f(s, ...), ...)``. The cuda
    kernel applies the soft-cap before ALiBi, so lower only ``compose(softcap(c), alibi(s))``."""
    if not score_mods or not all(callable(m) for m in score_mods):
        raise TypeError("flex_attention.mods.compose: expects one or more score mods")

    def score_mod(score, b, h, q_idx, kv_idx):
        for m in score_mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score
    return _named(score_mod, "compose", tuple(filter(None, map(describe, score_mods))))


# ---- argument checks --------------------------------------------------------------------------


def _nonnegative_int(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"flex_attention.mods.{fn}: {name} must be an int >= 0, got {value!r}")
    return value


def _check_index_tensor(fn: str, name: str, t: Any, ranks: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor) or t.dim() not in ranks or t.is_floating_point() \
            or t.is_complex():
        raise TypeError(f"flex_attention.mods.{fn}: {name} must be an integer tensor of rank "
                        f"{' or '.join(map(str, ranks))}")


__all__ = ["NamedMod", "describe", "causal", "sliding_window", "prefix_lm", "document",
           "and_masks", "or_masks", "softcap", "alibi", "alibi_slopes", "compose"]
