"""A paged KV cache for transformers models: ``PagedCache``, read by kpt's ``paged_attention``.

``PagedCache(model.config)`` is a transformers ``Cache``: pass it as the model's cache
(``cache=`` from transformers 5.24 on, ``past_key_values=`` before) in a manual loop or in
``generate``, on a model whose attention implementation is ``"kpt"``; ``kpt.integrations.hf.
patch(model, kv_cache="paged")`` makes ``generate`` create one by default (greedy and sampling;
beam search, assisted decoding and an explicit ``cache_implementation`` keep transformers' caches).

Layout: per decoder layer one pool of keys and one of values, (num_pages, page_size, Hkv, D)
("NHD"); one page allocator, one block table (B, max pages) and one ``seq_lens`` (B,) serve every
layer, since every layer stores the same tokens. A row holds only its real tokens: pads (zeros of
the 2-D attention mask, e.g. a left-padded batch in ``generate``) are never written nor attended.
The cache's length (``get_seq_length``) counts columns, pads included, as transformers' own
caches do, so that positions and masks are computed as usual.

How it runs: ``update`` only tags the new keys; kpt's attention function (``_hf_attention``)
sees the tag and calls ``PagedLayer.attend``, which has the padding mask that ``update`` never
gets: it appends the real new tokens with ``append_paged_kv`` and attends with
``paged_attention`` (one plan per forward serves every layer: decode, and chunked prefill with
varlen queries), or, for rows that share a prefix (``share_prefix``), with
``cascade_attention`` (the shared pages read once per group). A prefill into an empty cache
attends over the new keys directly (kpt's varlen ``flash_attention``), since they are at hand.
One host read per forward when a padding mask is given (how many real tokens each row gets),
none otherwise; eager only (``is_compileable`` is False); inference only.

transformers' continuous batching (``generate_batch``, ``PagedAttentionCache``) is not used:
its attention contract changed between 5.17 and 5.25. 5.17 renames the model's implementation
to ``"paged|<name>"`` and its cache's ``update`` returns the batch's keys gathered into one dense
varlen tensor (a ``"paged|kpt"`` would never see pages); 5.25 accepts only ``"paged|eager"``,
``"sdpa"`` and names containing ``"flash"`` (``switch_to_cb_friendly_attn`` raises on ``"kpt"``),
and passes pages only to flash's ``flash_attn_with_kvcache`` contract on decode-only batches. A
kpt function there would need a name posing as flash and two adapters to private, moving
internals; a ``Cache`` of kpt's own works with ``generate`` and manual loops on both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from kpt.integrations import _hf_attention
from kpt.integrations._undo import Bound, Restore
from kpt.ops.cascade_attention import cascade_attention
from kpt.ops.paged_attention import SPEC as _PAGED_SPEC
from kpt.ops.paged_attention import Plan, append_paged_kv, plan

log = logging.getLogger("kpt")

NAME = "PagedCache"
_PAGED_BACKENDS = frozenset(b.name for b in _PAGED_SPEC.backends)
# generate modes that keep one row per sequence from prefill to the end (no reordering).
_GENERATE_MODES = ("greedy_search", "sample")


@dataclass
class _Step:
    """One forward's new tokens, laid out once (by the first layer's attention) for every layer.

    ``decode``: one real new token per row, queries (B, H, D). Otherwise the real tokens are
    packed row after row, ``cu`` (B + 1,) int32 their offsets; ``rows``/``cols`` index them in
    the (B, S) input when some are pads (None: every token is real)."""

    length: int
    fresh: bool = False
    decode: bool = False
    rows: Tensor | None = None
    cols: Tensor | None = None
    cu: Tensor | None = None
    max_new: int = 0
    plans: dict[tuple, Plan] = field(default_factory=dict)
    levels: list[tuple[Tensor, Tensor, Tensor]] | None = None

    def gather(self, x: Tensor) -> Tensor:
        """(B, H, S, D) -> the real tokens: (B, H, D) for decode, else (T, H, D)."""
        x = x.transpose(1, 2)
        if self.decode:
            return x[:, 0]
        if self.rows is None:
            return x.reshape(-1, *x.shape[2:])
        return x[self.rows, self.cols]

    def scatter(self, out: Tensor, batch: int) -> Tensor:
        """The real tokens' outputs back to (B, S, H, D), zeros at the pads."""
        if self.decode:
            return out[:, None]
        if self.rows is None:
            return out.view(batch, self.length, *out.shape[1:])
        full = out.new_zeros(batch, self.length, *out.shape[1:])
        return full.index_put((self.rows, self.cols), out)


class PagedLayer(CacheLayerMixin):
    """One decoder layer's page pools; the tables live in the ``PagedCache``."""

    is_sliding = False  # windows are the attention's job (its sliding_window); pages keep all
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index
        self.columns = 0
        self.k_pages: Tensor | None = None
        self.v_pages: Tensor | None = None
        self.pending: Tensor | None = None  # the keys update() tagged, until attend() stores them

    def __repr__(self) -> str:
        shape = None if self.k_pages is None else tuple(self.k_pages.shape)
        return f"PagedLayer({self.index}, pages={shape})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        _, heads, _, dim = key_states.shape
        shape = (self.cache.num_pages, self.cache.page_size, heads, dim)
        # Zeros, not empty: a page's unwritten slots are never attended, but stay finite.
        self.k_pages = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.v_pages = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.cache.update(key_states, value_states, self.index)

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = 0
        self.pending = None

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, *, dropout: float = 0.0,
               scaling: float | None = None, sliding_window: int | None = None,
               softcap: float | None = None, is_causal: bool | None = None,
               **kwargs: Any) -> tuple[Tensor, None]:
        """Store this layer's new tokens, then attend over the row's pages: the ``"kpt"``
        attention implementation's path for keys tagged by ``PagedCache.update``."""
        if self.pending is not key:
            raise RuntimeError(f"kpt {NAME}: layer {self.index} attends to keys its cache did "
                               f"not just hand out")
        delattr(key, _hf_attention.PAGED_ATTR)
        self.pending = None
        reason = _unsupported(module, query, attention_mask, dropout, kwargs)
        if reason is not None:
            raise ValueError(f"kpt {NAME}: {reason}")
        cache = self.cache
        step = cache._step
        if step is None:
            step = cache._plan(attention_mask, key.shape[-2])
        append_paged_kv(step.gather(key), step.gather(value), self.k_pages, self.v_pages,
                        cache.block_table, cache.seq_lens, cu_seqlens=step.cu)
        if step.fresh:  # an empty cache: the new keys are all there is, in hand
            kwargs[_hf_attention.CACHE_IN_USE] = True
            return _hf_attention.attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        left = -1 if sliding_window is None else int(sliding_window) - 1
        backend = getattr(module, _hf_attention.BACKEND_ATTR, None)
        backend = backend if backend in _PAGED_BACKENDS else None
        q = step.gather(query)
        if step.levels is not None:
            if left >= 0:
                raise ValueError(f"kpt {NAME}: rows sharing a prefix attend through "
                                 f"cascade_attention, which has no sliding window")
            _hf_attention._count("cascade")
            out = cascade_attention(q, self.k_pages, self.v_pages, step.levels,
                                    cu_seqlens_q=step.cu,
                                    max_seqlen_q=None if step.decode else step.max_new,
                                    causal=causal, scale=scaling, softcap=float(softcap or 0.0),
                                    backend=backend)
        else:
            _hf_attention._count("paged_decode" if step.decode else "paged_prefill")
            window = (left, 0 if causal else left)
            options = (scaling, window, float(softcap or 0.0), causal, backend)
            runner = step.plans.get(options)
            if runner is None:
                runner = plan(q, self.k_pages, self.v_pages, cache.block_table, cache.seq_lens,
                              cu_seqlens_q=step.cu,
                              max_seqlen_q=None if step.decode else step.max_new,
                              causal=causal, scale=scaling, window=window,
                              softcap=options[2], backend=backend)
                step.plans[options] = runner
            out = runner.run(q, self.k_pages, self.v_pages)
        return step.scatter(out, query.shape[0]), None


def _unsupported(module: nn.Module, query: Tensor, attention_mask: Tensor | None,
                 dropout: float, kwargs: dict) -> str | None:
    if attention_mask is not None and attention_mask.dim() != 2:
        return ("a 4-D attention mask (the paged path reads (B, L) padding masks; the mask "
                "comes from attn_implementation='kpt')")
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if dropout > 0 and module.training:
        return "attention dropout while training: the paged cache is for inference"
    if torch.is_grad_enabled() and query.requires_grad:
        return "gradients: the paged cache is for inference (run under torch.no_grad())"
    return None


class PagedCache(Cache):
    """A transformers ``Cache`` whose layers are page pools read by kpt's ``paged_attention``.

    Args:
        config: the model's config (its text config for multimodal models): the number of
            layers; its ``_attn_implementation`` must be ``"kpt"`` when the cache is used.
        page_size: tokens per page (1..256).
        num_pages: pages in each layer's pool at first use; the pools grow (a copy) when a
            step needs more. ``generate`` under ``patch(model, kv_cache="paged")`` sizes them
            for its longest output.

    Rows are fixed by the first forward. Besides the ``Cache`` interface: ``share_prefix(n)``
    (every row's tokens become a prefix that ``n`` new rows share, read through
    ``cascade_attention``), ``batch_repeat_interleave(n)`` (``n`` rows per row, each with its own
    copy of its pages), ``rewind(columns)``, ``kv_bytes()`` and ``pool_bytes()``.
    """

    def __init__(self, config: Any, *, page_size: int = 16, num_pages: int | None = None) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
            else config
        if isinstance(page_size, bool) or not isinstance(page_size, int) or \
                not 1 <= page_size <= 256:
            raise ValueError(f"kpt {NAME}: page_size must be an int in 1..256, got {page_size!r}")
        if num_pages is not None and (isinstance(num_pages, bool) or not isinstance(num_pages, int)
                                      or num_pages < 1):
            raise ValueError(f"kpt {NAME}: num_pages must be a positive int, got {num_pages!r}")
        self.config = text
        self.page_size = page_size
        self.num_pages = num_pages or 64
        super().__init__(layers=[PagedLayer(self, i) for i in range(text.num_hidden_layers)])
        self._clear()

    def _clear(self) -> None:
        self.columns = 0
        self.rows: int | None = None
        self.free = list(range(self.num_pages - 1, -1, -1))  # popped from the end: 0, 1, ...
        self.pages: list[list[int]] = []  # each row's own pages, in order
        self.lengths: list[int] = []  # each row's real tokens in its own pages
        self.block_table: Tensor | None = None
        self.seq_lens: Tensor | None = None
        self.last_pad = -1  # the last column that held a pad in some row
        self.prefix: tuple[Tensor, Tensor, Tensor] | None = None  # (table, lens, group_indptr)
        self.prefix_pages: list[list[int]] = []
        self._step: _Step | None = None

    # ---- the Cache interface --------------------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Tags the new keys for kpt's attention, which stores them (it has the padding mask)
        and attends over the pages; returns them unchanged."""
        layer = self.layers[layer_idx]
        batch, length = key_states.shape[0], key_states.shape[-2]
        if layer.pending is not None:
            raise RuntimeError(f"kpt {NAME}: layer {layer_idx}'s previous tokens never reached "
                               f"kpt's attention, so they were not stored")
        if layer.columns == self.columns:  # the first layer of a new forward
            implementation = getattr(self.config, "_attn_implementation", None)
            if implementation != _hf_attention.NAME:
                raise ValueError(f"kpt {NAME}: the model's attention implementation is "
                                 f"{implementation!r}; the paged cache is read by 'kpt' only "
                                 f"(kpt.integrations.hf.patch(model, kv_cache='paged'), or "
                                 f"attn_implementation='kpt')")
            if self.rows is None:
                self._start(batch, key_states.device)
            if batch != self.rows:
                raise ValueError(f"kpt {NAME}: the cache holds {self.rows} rows, the input has "
                                 f"{batch}")
            self.columns += length
            self._step = None
        elif layer.columns + length != self.columns:
            raise RuntimeError(f"kpt {NAME}: layer {layer_idx} is at column {layer.columns} with "
                               f"{length} new tokens, the forward at {self.columns}")
        layer.columns += length
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        setattr(key_states, _hf_attention.PAGED_ATTR, layer)
        layer.pending = key_states
        return key_states, value_states

    def reset(self) -> None:
        """Forget every token and row; the pools are kept."""
        for layer in self.layers:
            layer.reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: a negative count of columns to forget (see ``rewind``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"kpt {NAME}.crop: pass a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        self.rewind(self.columns + tokens_to_remove)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError(f"kpt {NAME}: beam search reorders rows; use a DynamicCache")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError(f"kpt {NAME}: selecting rows is not supported; use a "
                                  f"DynamicCache")

    # ---- kpt's additions ------------------------------------------------------------------

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive rows, each with its own copy of the row's
        pages (the naive layout: memory grows with ``repeats``). A shared prefix stays shared."""
        if self.rows is None or repeats == 1:
            return
        self._quiet("batch_repeat_interleave")
        order = [r for r in range(self.rows) for _ in range(repeats)]
        copies = [r for r in range(self.rows) for _ in range(repeats - 1)]
        sources = [p for r in copies for p in self.pages[r]]
        targets = self._take(len(sources))
        for layer in self._layers_in_use():
            layer.k_pages[targets] = layer.k_pages[sources]
            layer.v_pages[targets] = layer.v_pages[sources]
        fresh = iter(targets)
        pages, seen = [], set()
        for r in order:
            pages.append(self.pages[r] if r not in seen else [next(fresh) for _ in self.pages[r]])
            seen.add(r)
        self.pages, self.lengths = pages, [self.lengths[r] for r in order]
        if self.prefix is not None:
            table, lens, indptr = self.prefix
            self.prefix = (table, lens, indptr * repeats)
        self._rebuild(len(order))

    def share_prefix(self, repeats: int) -> None:
        """Every row's tokens become a prefix shared by ``repeats`` new rows (its group), whose
        new tokens go to pages of their own; attention reads a group's prefix pages once for all
        its rows (``cascade_attention``: level 0 the prefixes, level 1 the rows' own pages).
        Positions continue after the prefix. Once per cache; no sliding windows."""
        if self.rows is None:
            raise ValueError(f"kpt {NAME}.share_prefix: the cache is empty")
        if self.prefix is not None:
            raise ValueError(f"kpt {NAME}.share_prefix: the rows already share a prefix")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"kpt {NAME}.share_prefix: repeats must be a positive int, got "
                             f"{repeats!r}")
        self._quiet("share_prefix")
        device = self.block_table.device
        indptr = torch.arange(0, self.rows * repeats + 1, repeats, dtype=torch.int32,
                              device=device)
        self.prefix = (self.block_table, self.seq_lens, indptr)
        self.prefix_pages = self.pages
        rows = self.rows * repeats
        self.pages, self.lengths = [[] for _ in range(rows)], [0] * rows
        self._rebuild(rows)

    def rewind(self, columns: int) -> None:
        """Forget every column past ``columns``; those must have been real tokens in every row
        (e.g. decode steps). Pages no longer needed go back to the pool."""
        self._quiet("rewind")
        drop = self.columns - columns
        if drop < 0 or columns <= self.last_pad or (drop and self.rows is None):
            raise ValueError(f"kpt {NAME}.rewind: cannot go back from column {self.columns} to "
                             f"{columns} (the last pad is at column {self.last_pad})")
        if drop and any(n < drop for n in self.lengths):
            raise ValueError(f"kpt {NAME}.rewind: a row holds fewer than {drop} tokens of its own")
        for r, pages in enumerate(self.pages):
            self.lengths[r] -= drop
            keep = -(-self.lengths[r] // self.page_size)
            self.free.extend(reversed(pages[keep:]))
            del pages[keep:]
        if self.seq_lens is not None:
            self.seq_lens.sub_(drop)
        self.columns = columns
        for layer in self.layers:
            layer.columns = min(layer.columns, columns)
        self._step = None

    def kv_bytes(self) -> int:
        """Bytes of keys and values in the pages in use (every layer; shared pages once)."""
        used = sum(len(p) for p in self.pages) + sum(len(p) for p in self.prefix_pages)
        return used * self._page_bytes()

    def pool_bytes(self) -> int:
        """Bytes of the pools as allocated (every layer)."""
        return self.num_pages * self._page_bytes()

    # ---- internals --------------------------------------------------------------------------

    def _page_bytes(self) -> int:
        total = 0
        for layer in self._layers_in_use():
            page = layer.k_pages[0]
            total += 2 * page.numel() * page.element_size()
        return total

    def _layers_in_use(self) -> list[PagedLayer]:
        return [layer for layer in self.layers if layer.k_pages is not None]

    def _quiet(self, what: str) -> None:
        if any(layer.pending is not None for layer in self.layers) or any(
                layer.columns != self.columns for layer in self._layers_in_use()):
            raise RuntimeError(f"kpt {NAME}.{what}: a forward is under way")

    def _start(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.pages, self.lengths = [[] for _ in range(rows)], [0] * rows
        self.block_table = torch.zeros(rows, 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)

    def _rebuild(self, rows: int) -> None:
        """New tables for ``rows`` rows from the host lists (after a change of rows)."""
        device = self.block_table.device
        width = max(1, max((len(p) for p in self.pages), default=1))
        table = torch.zeros(rows, width, dtype=torch.int32)
        for r, pages in enumerate(self.pages):
            table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.block_table = table.to(device)
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        self.rows = rows

    def _take(self, count: int) -> list[int]:
        """``count`` free page ids, growing the pools when there are too few."""
        if count > len(self.free):
            self._grow(self.num_pages - len(self.free) + count)
        return [self.free.pop() for _ in range(count)]

    def _grow(self, needed: int) -> None:
        total = max(needed, 2 * self.num_pages)
        log.info("kpt %s: growing the page pools from %d to %d pages", NAME, self.num_pages,
                 total)
        for layer in self._layers_in_use():
            for name in ("k_pages", "v_pages"):
                old = getattr(layer, name)
                new = old.new_zeros((total, *old.shape[1:]))
                new[: old.shape[0]] = old
                setattr(layer, name, new)
        self.free = list(range(total - 1, self.num_pages - 1, -1)) + self.free
        self.num_pages = total

    def _plan(self, attention_mask: Tensor | None, step_len: int) -> _Step:
        """Lay out this forward's new tokens (real ones only), give rows the pages they need,
        and advance ``seq_lens``: once per forward, for every layer."""
        step = _Step(step_len)
        device = self.block_table.device
        start = self.columns - step_len
        if attention_mask is None:
            new = [step_len] * self.rows
        else:
            part = attention_mask[:, -step_len:]
            part = part if part.dtype == torch.bool else part.bool()
            host = part.cpu()  # the one host read of the forward
            new = host.sum(-1).tolist()
            if min(new) < step_len:
                pad_cols = (~host).any(0).nonzero().flatten()
                self.last_pad = max(self.last_pad, start + int(pad_cols[-1]))
                step.rows, step.cols = part.nonzero(as_tuple=True)
        step.fresh = self.prefix is None and not any(self.lengths)
        step.decode = step_len == 1 and step.rows is None
        step.max_new = max(new, default=0)
        if not step.decode:
            cu = [0]
            for n in new:
                cu.append(cu[-1] + n)
            step.cu = _to_device(cu, torch.int32, device)
        self._allocate(new, device)
        if step.rows is None:
            self.seq_lens.add_(step_len)
        else:
            self.seq_lens.add_(part.sum(-1, dtype=torch.int32))
        if self.prefix is not None:
            own = torch.arange(self.rows + 1, dtype=torch.int32, device=device)
            step.levels = [self.prefix, (self.block_table, self.seq_lens, own)]
        self._step = step
        return step

    def _allocate(self, new: list[int], device: torch.device) -> None:
        """Pages for each row's ``new`` tokens; new page ids written into the block table."""
        ps = self.page_size
        wanted = [-(-(n + k) // ps) - len(p) for n, k, p in zip(self.lengths, new, self.pages)]
        ids = self._take(sum(max(0, w) for w in wanted))
        rows, cols = [], []
        taken = iter(ids)
        for r, count in enumerate(wanted):
            for _ in range(count):
                rows.append(r)
                cols.append(len(self.pages[r]))
                self.pages[r].append(next(taken))
        self.lengths = [n + k for n, k in zip(self.lengths, new)]
        if not ids:
            return
        width = max(len(p) for p in self.pages)
        if width > self.block_table.shape[1]:
            wider = torch.zeros(self.rows, max(width, 2 * self.block_table.shape[1]),
                                dtype=torch.int32, device=device)
            wider[:, : self.block_table.shape[1]] = self.block_table
            self.block_table = wider
        index = _to_device([rows, cols], torch.int64, device)
        self.block_table[index[0], index[1]] = _to_device(ids, torch.int32, device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on ``device``; to a GPU through pinned memory without a stream sync
    (torch's host allocator keeps the pinned buffer until the copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# ---- generate ------------------------------------------------------------------------------


def use_in_generate(model: nn.Module) -> Callable[[], None]:
    """Make ``model.generate`` create a ``PagedCache`` where it would create a DynamicCache
    itself (greedy or sampling, no cache given, no ``cache_implementation``). Returns the undo.
    ``generate(..., cache_config={"page_size": 32, "num_pages": ...})`` sets the cache's
    arguments (transformers' own knob for them); the default pool holds the longest output.

    The hook is the model's ``_prepare_cache_for_generation`` (an instance attribute over the
    class's method): generate's own cache choice runs first, and only its default is replaced."""
    model._prepare_cache_for_generation = Bound(_prepare_paged, model)
    return Restore(_drop_override, model, "_prepare_cache_for_generation")


def _drop_override(obj: Any, name: str) -> None:
    vars(obj).pop(name, None)


def _prepare_paged(self: nn.Module, generation_config: Any, model_kwargs: dict,
                   generation_mode: Any, batch_size: int, max_cache_length: int, *args: Any,
                   **kwargs: Any) -> Any:
    """``use_in_generate``'s override of ``_prepare_cache_for_generation``."""
    # The class's own cache choice first (the instance attribute is this override).
    result = type(self)._prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length,
        *args, **kwargs)
    mode = getattr(generation_mode, "value", generation_mode)
    for name in ("cache", "past_key_values"):
        made = model_kwargs.get(name)
        if (type(made) is DynamicCache and not getattr(made, "_is_user_defined", False)
                and generation_config.cache_implementation is None):
            if mode not in _GENERATE_MODES:
                log.info("kpt %s: generate mode %s keeps transformers' DynamicCache", NAME,
                         mode)
                break
            options = dict(generation_config.cache_config or {})
            unknown = set(options) - {"page_size", "num_pages"}
            if unknown:
                raise ValueError(f"kpt {NAME}: generate's cache_config takes page_size and "
                                 f"num_pages, got {sorted(unknown)}")
            page_size = options.get("page_size", 16)
            rows = max(generation_config.num_beams or 1,
                       generation_config.num_return_sequences or 1) * batch_size
            if options.get("num_pages") is None and isinstance(page_size, int) and \
                    page_size > 0:
                options["num_pages"] = rows * max(1, math.ceil(max_cache_length / page_size))
            model_kwargs[name] = PagedCache(self.config, page_size=page_size,
                                            num_pages=options.get("num_pages"))
            break
    return result


__all__ = ["PagedCache", "PagedLayer", "use_in_generate"]
