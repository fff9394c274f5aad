"""End to end: whole HuggingFace Llama and Qwen3-MoE models (random weights built from configs,
bf16, one GPU), transformers' SDPA path against ``kpt.integrations.hf.patch``, each also under
torch.compile.

Shapes: ``8b`` (bench/llama3-8b-config.json: hidden 4096, 32/8 heads, head dim 128) and ``1b``
(Llama-3.2-1B: hidden 2048, 32/8 heads, head dim 64, tied embeddings); llama3 RoPE scaling.
``qwen3-a3b``: a Qwen3-30B-A3B-shaped MoE stack (hidden 2048, 128 experts, top 8, expert
intermediate 768, 32/4 heads, head dim 128, 4 layers by default), prefill rows ``seq4096`` and
``padded`` and the four eager/static decode rows only, and its own variants (``MOE_VARIANTS``).
Case ids are ``<shape>-L<layers>-<kind>-<row>-<variant>`` (select with ``-k``):

* ``prefill``: forward without a KV cache, logits of each sequence's last token only
  (``logits_to_keep``); ``train``: forward + backward of the next-token loss, no optimizer
  step, gradients set to None before each call. Rows: ``seq4096`` and ``seq16384`` (batch 1,
  one unpadded sequence); ``padded`` (the 8 sequences of ``LENGTHS``, right-padded to 8192 with
  ``attention_mask``, 0 = pad); ``packed`` (the same 8 in one row with restarting
  ``position_ids`` and no mask: the convention of transformers' ``DataCollatorWithFlattening``).
* ``decode``: a 2048-token context at batch 1 and 16, then ``KPT_E2E_DECODE_STEPS`` greedy
  one-token steps. ``dynamic-bN``: eager over a DynamicCache; ``static-bN``: over a StaticCache,
  one step (argmax and position update included) captured once in a CUDA graph and replayed.
  ``paged-bN-cC``: batch 1, 16 and 64 at a context of 2048 and 16384 tokens, eager steps, on
  ``KPT_E2E_PAGED_LAYERS`` layers (the KV of 64 x 16k tokens is 4 GiB per 8B layer): ``hf_sdpa``
  over a DynamicCache, ``kpt`` over kpt's ``PagedCache`` (16-token pages, ``paged_attention``).
  The context is one random sequence prefilled once at batch 1 and copied to every row (each row
  holds its own copy, the memory of N prompts; prefilling 64 x 16k tokens at once would take
  ~50 GB of activations); the rows' first decode tokens differ.

Variants: ``hf_sdpa`` (attn_implementation="sdpa"), ``hf_sdpa_compile``, ``kpt`` (the same
model object, patched for the case and unpatched after it) and ``kpt_compile``; ``kpt_fp8`` /
``kpt_int4`` (``static-b1`` and ``dynamic-b1`` decode only: the quantized rows) add
``patch(quantize="fp8" | "int4")`` with round-to-nearest weights (on the MoE shape the routed
experts too: ``QuantizedExperts``, fp8 128x128 blocks / int4 g128). They are checked against
the same quantized model with ``fp8_gemm``, ``int4_gemm`` and ``fused_moe`` on their reference
backends (float32 products of the same quantized values: the kernels' error alone, within
``KPT_E2E_TOL``; for ``kpt_fp8``, whose per-token activation scales turn any rounding
difference into flipped codes downstream, within that reference's own distance to bf16:
``DYNAMIC_ACTIVATIONS``); their distance to the bf16 model (the quantization's error, which
compounds over random layers) is shown beside it. On the MoE
shape ``hf_sdpa`` runs transformers' default experts (``grouped_mm``: torch's grouped GEMM),
``hf_sdpa_eager_moe`` its per-expert loop (``experts_implementation="eager"``; no static rows:
the loop syncs with the host, which a CUDA graph cannot capture), and ``kpt`` patches attention
and the MoE blocks (``moe_route`` + ``fused_moe``); compiled variants only when named in
``KPT_E2E_VARIANTS``. Prefill and
train compile each decoder layer (regional compilation, static shapes: one compile per row serves
every layer, so compile time does not grow with depth); decode compiles the whole forward, as
HF's static-cache recipe does, in inductor's default mode (the CUDA graph is ours: the prefill
is never compiled and cudagraph trees add no warm-up of their own).

The loss: HF's own upcasts all logits to float32, 8-25 GB at 16k-65k tokens of a 128k vocabulary,
so every variant uses the same chunked linear + cross-entropy (``lm_loss``: 4096 tokens at a
time, its gradient made in the forward) on the final hidden states (``lm_head`` is an identity
while a train case runs). Only real next-token pairs count: no pad, none across packed sequences.

Correctness, per case: the output (last-token logits; the loss and layer 0's ``down_proj``
gradient; the first decode step's logits) against HF's eager SDPA path on the same inputs, or,
for ``packed``, each sequence run alone. The relative difference ``|a - b| / |b|`` (Frobenius)
is in the table; past ``KPT_E2E_TOL`` (gradients: twice that) the case fails, except HF's own
packed rows, which are labelled. Calibration (CPU, hidden 4096, 4 layers, bf16): runs that
differ only in batching land 1.2% apart on these random models, attending across packed
sequences 130%; the default 0.1 sits between.

Measured per case: the median time per call between CUDA events, after two warm-up calls (the
first compiles: ``first s``), over about ``KPT_E2E_ROW_S`` seconds (3 to 20 calls); tokens/s
(real tokens, pads excluded); the ratio to ``hf_sdpa`` of the same row; peak memory
(``max_memory_allocated``, reset per case, weights included). The table goes to ``$OUT/e2e.md``
(rewritten after every case) or, without ``OUT``, to the terminal at the end; ``record`` feeds
the shared summary. Cases run by importance (``cases``), and those that would start after
``KPT_E2E_BUDGET_S`` are skipped and listed, so a run ends near that time plus one case.

Environment, defaults in brackets: KPT_E2E_SHAPES [8b,1b,qwen3-a3b]; KPT_E2E_VARIANTS [all
four; MOE_VARIANTS on the MoE shape]; KPT_E2E_LAYERS [8b=4,1b=8,qwen3-a3b=4] (prefill/train
models; one number sets all); KPT_E2E_DECODE_LAYERS [all; qwen3-a3b=4]; KPT_E2E_PAGED_LAYERS
[4] (as KPT_E2E_LAYERS); KPT_E2E_CONTEXT [2048];
KPT_E2E_DECODE_STEPS [32]; KPT_E2E_ROW_S [1.0]; KPT_E2E_TOL [0.1]; KPT_E2E_BUDGET_S [300];
KPT_E2E_PROFILE=1 adds ``test_e2e_profile`` (torch.profiler over one prefill and one train step
of the 8B shape on ``KPT_E2E_PROFILE_ROW`` [padded], hf_sdpa and kpt: top CUDA-time ops to
``$OUT/profile-<variant>-<kind>.txt``).

Run: ``OUT=out pytest -q bench/bench_e2e_hf.py -k "8b and not compile"`` (needs CUDA); the MoE
rows: ``KPT_E2E_SHAPES=qwen3-a3b``. CPU check of the inputs, references, loss and comparisons
on tiny float32 models (a Llama and a Qwen3-MoE): ``python -m bench.bench_e2e_hf [--compile]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bench.conftest import record

transformers = pytest.importorskip("transformers", reason="the HF benchmark needs transformers")
from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    StaticCache,
)

import kpt.integrations.hf as kpt_hf  # noqa: E402

_CONFIG_8B = json.loads((Path(__file__).parent / "llama3-8b-config.json").read_text())
SHAPES: dict[str, dict[str, Any]] = {
    "8b": _CONFIG_8B,
    "1b": dict(_CONFIG_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               head_dim=64, tie_word_embeddings=True,
               rope_scaling=dict(_CONFIG_8B["rope_scaling"], factor=32.0)),
    # Qwen3-30B-A3B's config.json, the fields that shape compute: every layer sparse.
    "qwen3-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=128, vocab_size=151936,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                      tie_word_embeddings=False),
}
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM),
          "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
MOE_SHAPES = tuple(s for s, c in SHAPES.items() if c["model_type"] != "llama")
MOE_VARIANTS = ("hf_sdpa", "hf_sdpa_eager_moe", "kpt")
MOE_PREFILL_ROWS = ("seq4096", "padded")
# The ragged batch: a few hundred to 8192 tokens, 27322 in all (fixed, not drawn per run).
LENGTHS = (8192, 6144, 4651, 3310, 2448, 1500, 777, 300)
VARIANTS = ("hf_sdpa", "hf_sdpa_compile", "kpt", "kpt_compile")
# Quantized decode (batch-1 rows): patch(quantize=...) with round-to-nearest
# weights; fp8 per-channel weights and per-token activations, int4 g128 with zero points.
QUANT_VARIANTS = {"kpt_fp8": dict(quantize="fp8"), "kpt_int4": dict(quantize="int4")}
QUANT_ROWS = ("static-b1", "dynamic-b1")
# Variants that quantize activations on the fly (per token): a difference of one bf16 unit in
# a GEMM's output (another summation order) flips fp8 codes of the next layer's activations,
# which over 32 random layers moves the logits as much as the quantization itself does (an
# H100 run of 2026-12-07: kernels against the same model on the reference backends 0.41 apart, the
# reference 0.63 from bf16). Such a row passes while the kernels' distance to the reference
# stays within the reference's own distance to bf16 (a broken kernel gives unrelated logits,
# ~1.4); their agreement op by op is tests/ops' business.
DYNAMIC_ACTIVATIONS = ("kpt_fp8",)
# A case's bound when it is not KPT_E2E_TOL (set by its runner, read by _check).
_CASE_TOL: dict[Any, float] = {}
PREFILL_ROWS = ("seq4096", "seq16384", "padded", "packed")
# Layers of the prefill/train models: the 1B model's 16 layers need > 80 GB under HF to train
# on the padded 8 x 8192 batch (activations of 65536 padded tokens).
TRAIN_LAYERS = {"8b": 4, "1b": 8, "qwen3-a3b": 4}
# A Qwen3-30B-A3B layer holds 1.2 GB of experts: a few layers, as for prefill.
DECODE_LAYERS = {s: 4 if s in MOE_SHAPES else c["num_hidden_layers"] for s, c in SHAPES.items()}
LOSS_CHUNK = 4096
PAGED_ROWS = tuple(f"paged-b{b}-c{c}" for c in (2048, 16384) for b in (1, 16, 64))
PAGED_LAYERS = {"8b": 4, "1b": 4}
PAGE_SIZE = 16
# The KV cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _per_shape(name: str, defaults: dict[str, int]) -> dict[str, int]:
    """``defaults`` updated from ``name``: ``"8b=4,1b=8"``, or one number for every shape."""
    value = _env(name, "")
    if not value:
        return dict(defaults)
    if "=" not in value:
        return dict.fromkeys(defaults, int(value))
    return defaults | {k.strip(): int(v) for k, v in (p.split("=") for p in value.split(","))}


TOL = float(_env("KPT_E2E_TOL", "0.1"))
# Quantized variants differ from the bf16 reference by their rounding too (random weights have
# no outliers to protect, and 32 layers compound it): a looser bound that still catches a broken
# layer (rel ~1).
ROW_S = float(_env("KPT_E2E_ROW_S", "1.0"))
BUDGET_S = float(_env("KPT_E2E_BUDGET_S", "300"))
CONTEXT = int(_env("KPT_E2E_CONTEXT", "2048"))
DECODE_STEPS = int(_env("KPT_E2E_DECODE_STEPS", "32"))


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    layers: int
    kind: str  # "prefill", "train" or "decode"
    row: str  # PREFILL_ROWS, or "dynamic-b1" / "static-b16" ...
    variant: str

    def __str__(self) -> str:
        return f"{self.shape}-L{self.layers}-{self.kind}-{self.row}-{self.variant}"

    @property
    def row_key(self) -> tuple[str, int, str, str]:
        return (self.shape, self.layers, self.kind, self.row)


def cases() -> list[Case]:
    """Every case, in order of importance, since the time budget cuts the tail: per shape (8B
    first: its rows are the targets'), prefill/train without compile, then decode (its target
    baseline is HF's compiled static-cache decode), then prefill/train compiled. Within a row
    hf_sdpa runs first (the ratio's base)."""
    named = [v for v in _env("KPT_E2E_VARIANTS", "").split(",") if v]
    train_layers = _per_shape("KPT_E2E_LAYERS", TRAIN_LAYERS)
    decode_layers = _per_shape("KPT_E2E_DECODE_LAYERS", DECODE_LAYERS)
    out = []
    for shape in _env("KPT_E2E_SHAPES", "8b,1b,qwen3-a3b").split(","):
        if shape in MOE_SHAPES:
            out += _moe_cases(shape, named or list(MOE_VARIANTS), train_layers[shape],
                              decode_layers[shape])
            continue
        variants = [v for v in named or VARIANTS if v in VARIANTS]
        for compiled in (False, True):
            if compiled:
                for row in ("dynamic-b1", "dynamic-b16", "static-b1", "static-b16"):
                    out += [Case(shape, decode_layers[shape], "decode", row, v) for v in variants
                            if row.startswith("static") or not v.endswith("_compile")]
                quant = [v for v in QUANT_VARIANTS if not named or v in named]
                out += [Case(shape, decode_layers[shape], "decode", row, v) for row in QUANT_ROWS
                        for v in quant]
                paged_layers = _per_shape("KPT_E2E_PAGED_LAYERS", PAGED_LAYERS)
                out += [Case(shape, paged_layers[shape], "decode", row, v) for row in PAGED_ROWS
                        for v in variants if v in ("hf_sdpa", "kpt")]
            out += [Case(shape, train_layers[shape], kind, row, v)
                    for kind in ("prefill", "train") for row in PREFILL_ROWS for v in variants
                    if v.endswith("_compile") == compiled]
    return out


def _moe_cases(shape: str, variants: list[str], layers: int, decode_layers: int) -> list[Case]:
    """The MoE shape's cases: prefill rows, then eager and static decode (no train, no paged
    rows); compiled variants only where they apply (static decode, or prefill)."""
    out = [Case(shape, layers, "prefill", row, v) for row in MOE_PREFILL_ROWS for v in variants]
    for row in ("dynamic-b1", "dynamic-b16", "static-b1", "static-b16"):
        out += [Case(shape, decode_layers, "decode", row, v) for v in variants
                if (row.startswith("static") or not v.endswith("_compile"))
                and not (row.startswith("static") and v == "hf_sdpa_eager_moe")]
    quant = [v for v in QUANT_VARIANTS if v in variants or variants == list(MOE_VARIANTS)]
    out += [Case(shape, decode_layers, "decode", row, v) for row in QUANT_ROWS for v in quant]
    return out


# ---- models and inputs (device-agnostic: the CPU smoke check at the bottom uses them) -------


def build_model(config: dict[str, Any], layers: int, *, device: str | torch.device = "cuda",
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A random-weight ``LlamaForCausalLM`` (or ``Qwen3MoeForCausalLM``, per the config's
    ``model_type``) made directly on ``device`` in ``dtype`` (HF's init: normal with std
    ``initializer_range`` = 0.02, which keeps bf16 activations finite)."""
    config_cls, model_cls = MODELS[config.get("model_type", "llama")]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    fields |= {"num_hidden_layers": layers, "attn_implementation": "sdpa", "use_cache": False}
    fields.setdefault("max_position_embeddings", 131072)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config_cls(**fields), dtype=dtype)
    return model.eval()


@dataclasses.dataclass
class Batch:
    """One model input: ``inputs`` for ``model(**inputs)``; ``keep`` for ``logits_to_keep`` and
    (``pick_rows``, ``pick_cols``) choosing each sequence's last token out of those logits;
    ``labels`` the next token per position (-100: none); ``loss_index`` the flat positions with a
    label."""

    inputs: dict[str, Tensor]
    keep: int | Tensor
    pick_rows: Tensor
    pick_cols: Tensor
    labels: Tensor
    loss_index: Tensor
    tokens: int  # real tokens, pads excluded


def make_batch(row: str, vocab: int, device: str | torch.device,
               lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> Batch:
    """The input of a prefill/train row: ``seq<N>``, ``padded`` or ``packed`` (of ``lengths``)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = ([torch.randint(0, vocab, (int(row[3:]),), generator=gen)] if row.startswith("seq")
            else [torch.randint(0, vocab, (n,), generator=gen) for n in lengths])
    if row == "padded":
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        ends = [(i, len(s) - 1) for i, s in enumerate(seqs)]
    else:
        ids = torch.cat(seqs)[None]
        inputs = {"input_ids": ids}
        if row == "packed":
            inputs["position_ids"] = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        bounds = torch.tensor([len(s) for s in seqs]).cumsum(0)
        ends = [(0, int(b) - 1) for b in bounds]
    labels = torch.full_like(ids, -100)
    offset = 0
    for i, s in enumerate(seqs):
        b, start = (i, 0) if row == "padded" else (0, offset)
        labels[b, start : start + len(s) - 1] = s[1:]
        offset += len(s)
    last = sorted({c for _, c in ends})
    keep: int | Tensor = 1 if row.startswith("seq") else torch.tensor(last)
    return Batch(
        inputs={k: v.to(device) for k, v in inputs.items()},
        keep=keep if isinstance(keep, int) else keep.to(device),
        pick_rows=torch.tensor([b for b, _ in ends], device=device),
        pick_cols=torch.tensor([0 if isinstance(keep, int) else last.index(c) for _, c in ends],
                               device=device),
        labels=labels.to(device),
        loss_index=(labels.flatten() != -100).nonzero().flatten().to(device),
        tokens=sum(len(s) for s in seqs),
    )


def split_packed(batch: Batch) -> list[Batch]:
    """The packed batch's sequences as batch-1 inputs of their own (the packed reference)."""
    ids, pos = batch.inputs["input_ids"][0], batch.inputs["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        labels = batch.labels[:, a:b].clone()
        out.append(Batch(inputs={"input_ids": ids[None, a:b]}, keep=1,
                         pick_rows=batch.pick_rows[:1], pick_cols=batch.pick_cols[:1] * 0,
                         labels=labels, loss_index=(labels.flatten() != -100).nonzero().flatten(),
                         tokens=b - a))
    return out


# ---- the steps ---------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels)) / count, ``chunk`` rows at a time: only
    one chunk's logits exist at once, and the gradients are made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, count: Tensor,
                chunk: int) -> Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad = probs.div_(count).to(hidden.dtype)
            grad_hidden[start : start + chunk] = grad @ weight
            grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None


def lm_loss(hidden: Tensor, weight: Tensor, batch: Batch, count: int | None = None) -> Tensor:
    """Mean next-token cross-entropy over ``batch``'s labelled positions of ``hidden``
    (B, S, H) (divided by ``count`` instead when given: the packed reference's share)."""
    h = hidden.flatten(0, 1).index_select(0, batch.loss_index)
    y = batch.labels.flatten().index_select(0, batch.loss_index)
    n = torch.tensor(float(count or len(batch.loss_index)), device=hidden.device)
    return _LinearCrossEntropy.apply(h, weight, y, n, LOSS_CHUNK)


@contextlib.contextmanager
def hidden_only(model: nn.Module) -> Iterator[Tensor]:
    """``lm_head`` as an identity (the model's "logits" are then its final hidden states);
    yields the head's weight for ``lm_loss``."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head.weight
    finally:
        model.lm_head = head


def prefill(model: nn.Module, batch: Batch) -> Tensor:
    """Last-token logits (sequences, vocab) of one forward without a KV cache."""
    with torch.no_grad():
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=batch.keep).logits
    return logits[batch.pick_rows, batch.pick_cols]


def train_step(model: nn.Module, batch: Batch, head: Tensor, count: int | None = None) -> Tensor:
    """Forward + backward of ``lm_loss`` (run inside ``hidden_only``); returns the loss."""
    hidden = model(**batch.inputs, use_cache=False, logits_to_keep=0).logits
    loss = lm_loss(hidden, head, batch, count)
    loss.backward()
    return loss.detach()


def grad_probe(model: nn.Module) -> Tensor:
    """The gradient compared after a train step: layer 0's MLP down projection, which kpt's
    patch leaves in place and whose gradient depends on every later layer and on attention."""
    return model.model.layers[0].mlp.down_proj.weight.grad.detach().clone()


def train_reference(model: nn.Module, batch: Batch, packed: bool) -> tuple[Tensor, Tensor]:
    """(loss, grad_probe) of the plain HF model: one step, or for ``packed`` the sum over each
    sequence run on its own (same normalisation, so the sums equal the packed step's)."""
    model.zero_grad(set_to_none=True)
    with hidden_only(model) as head:
        if packed:
            count = len(batch.loss_index)
            loss = sum(train_step(model, part, head, count) for part in split_packed(batch))
        else:
            loss = train_step(model, batch, head)
    probe = grad_probe(model)
    model.zero_grad(set_to_none=True)
    return loss.float(), probe


def prefill_reference(model: nn.Module, batch: Batch, packed: bool) -> Tensor:
    if packed:
        return torch.cat([prefill(model, part) for part in split_packed(batch)]).float()
    return prefill(model, batch).float()


def rel_diff(a: Tensor, b: Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm, computed in float32 (on ``a``'s device)."""
    a, b = a.float(), b.float().to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- decode --------------------------------------------------------------------------------


def decode_inputs(vocab: int, batch: int, device: str | torch.device,
                  context: int | None = None, seed: int = 1) -> tuple[Tensor, Tensor]:
    """(prompt (batch, ``context`` or CONTEXT), first decode token (batch, 1)): the first token
    is fixed, not the prefill's argmax, so every variant decodes from the same input."""
    context = CONTEXT if context is None else context
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, context + 1), generator=gen)
    return prompt[:, :-1].to(device), prompt[:, -1:].to(device)


def rewind(cache: Any, length: int) -> None:
    """Forget every token past ``length``: static layers move their write position in place (a
    captured graph sees it), dynamic layers drop the tail. (``Cache.crop``'s argument changed
    meaning between transformers releases, so the layers are set directly.)"""
    for layer in cache.layers:
        if isinstance(cache, StaticCache):
            layer.cumulative_length.fill_(length)
        else:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


class Decoder:
    """Greedy one-token decoding after a prompt, over a DynamicCache (``static=False``: eager
    steps) or a StaticCache (``static=True``: ``capture()`` records one step, argmax and
    position update included, into a CUDA graph)."""

    def __init__(self, model: nn.Module, prompt: Tensor, first: Tensor, steps: int,
                 static: bool) -> None:
        self.model, self.steps, self.context = model, steps, prompt.shape[1]
        self.first = first
        batch = prompt.shape[0]
        self.cache = (StaticCache(config=model.config, max_cache_len=self.context + steps + 8)
                      if static else DynamicCache(config=model.config))
        with torch.no_grad():
            model(prompt, use_cache=True, logits_to_keep=1, **{CACHE_KW: self.cache})
        self._buffers(model, first, batch)

    def _buffers(self, model: nn.Module, first: Tensor, batch: int) -> None:
        """The step's inputs and outputs (fixed addresses, for graph capture)."""
        self.ids = first.clone()
        self.pos = torch.full((batch, 1), self.context, device=first.device)
        self.logits = torch.empty(batch, model.config.vocab_size, device=first.device,
                                  dtype=model.dtype)
        self.forward: Callable[..., Any] = model
        self.graph: torch.cuda.CUDAGraph | None = None

    def reset(self) -> None:
        rewind(self.cache, self.context)
        self.ids.copy_(self.first)
        self.pos.fill_(self.context)

    def step(self) -> None:
        with torch.no_grad():
            out = self.forward(self.ids, position_ids=self.pos, use_cache=True,
                               logits_to_keep=1, **{CACHE_KW: self.cache})
            self.logits.copy_(out.logits[:, -1])
            self.ids.copy_(self.logits.argmax(-1, keepdim=True))
            self.pos.add_(1)

    def capture(self, warmup: int = 3) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run(self, steps: int | None = None) -> None:
        for _ in range(self.steps if steps is None else steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()

    def first_logits(self) -> Tensor:
        """Logits (batch, vocab) of the first decode step, from a fresh reset."""
        self.reset()
        self.run(1)
        return self.logits.float().clone()


def decode_reference(model: nn.Module, prompt: Tensor, first: Tensor) -> Tensor:
    return Decoder(model, prompt, first, 1, static=False).first_logits()


class PagedDecoder(Decoder):
    """Greedy one-token decoding after a context that row 0 of ``prompt`` holds: prefilled once
    at batch 1, then copied to every row (``batch_repeat_interleave``), over kpt's PagedCache
    (``paged=True``) or a DynamicCache. Eager steps."""

    def __init__(self, model: nn.Module, prompt: Tensor, first: Tensor, steps: int,
                 paged: bool) -> None:
        self.model, self.steps, self.context = model, steps, prompt.shape[1]
        self.first = first
        batch = first.shape[0]
        pages = batch * math.ceil((self.context + steps + 8) / PAGE_SIZE)
        self.cache = (kpt_hf.PagedCache(model.config, page_size=PAGE_SIZE, num_pages=pages)
                      if paged else DynamicCache(config=model.config))
        with torch.no_grad():
            model(prompt[:1], use_cache=True, logits_to_keep=1, **{CACHE_KW: self.cache})
        self.cache.batch_repeat_interleave(batch)
        self._buffers(model, first, batch)

    def reset(self) -> None:
        if isinstance(self.cache, kpt_hf.PagedCache):
            self.cache.rewind(self.context)
        else:
            rewind(self.cache, self.context)
        self.ids.copy_(self.first)
        self.pos.fill_(self.context)


def paged_row(row: str) -> tuple[int, int]:
    """(batch, context) of a ``paged-b<batch>-c<context>`` row."""
    batch, context = row.removeprefix("paged-b").split("-c")
    return int(batch), int(context)


# ---- variants ------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(model: nn.Module, variant: str, notes: list[str] | None = None) -> Iterator[None]:
    """kpt's patch for the ``kpt*`` variants (undone on exit), nothing for HF's; modules the
    patch left alone are noted (they run HF's code)."""
    if variant == "hf_sdpa_eager_moe":
        previous = model.config._experts_implementation
        model.set_experts_implementation("eager")
        try:
            yield
        finally:
            model.set_experts_implementation(previous)
        return
    if not variant.startswith("kpt"):
        yield
        return
    with kpt_hf.patch(model, **QUANT_VARIANTS.get(variant, {})) as handle:
        if handle.skipped and notes is not None:
            path, reasons = next(iter(handle.skipped.items()))
            notes.append(f"patch skipped {len(handle.skipped)} modules ({path}: {reasons[0]})")
        yield


def _raise_recompile_limit() -> None:
    # A compiled region is one code object shared by every layer and variant: its cache holds
    # one entry per (variant, row, grad mode), more than the default 8 in a run.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 128))


@contextlib.contextmanager
def compiled_layers(model: nn.Module, on: bool) -> Iterator[None]:
    """Regional compilation: each decoder layer through torch.compile with static shapes (one
    compile per row and grad mode serves every layer). Dynamic sizes would compile less often,
    but inductor failed on kpt's padded training graph with them (torch 2.13, "Exponent must be
    non-negative"), and static kernels are what a fixed-shape workload gets."""
    if not on:
        yield
        return
    _raise_recompile_limit()
    layers = list(model.model.layers)
    try:
        for layer in layers:
            layer.compile(dynamic=False)
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


# ---- the pytest cases (CUDA) ---------------------------------------------------------------

CASES = cases()
# The model of the (shape, layers) now running; references (on the host) and inputs of every
# row, kept across models since a shape's rows come back after its decode model.
_STATE: dict[str, Any] = {"key": None, "model": None, "refs": {}, "start": None,
                          "reporter": None}
TABLE: list[dict[str, Any]] = []
SKIPPED: list[str] = []


def _progress(line: str) -> None:
    elapsed = time.perf_counter() - (_STATE["start"] or time.perf_counter())
    text = f"[e2e {elapsed:6.1f}s] {line}"
    reporter = _STATE["reporter"]
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text, flush=True)


def _model(case: Case) -> nn.Module:
    """The model of ``case``'s (shape, layers), built once; the previous one is freed first."""
    key = (case.shape, case.layers)
    if _STATE["key"] != key:
        _STATE.update(key=None, model=None)
        # Compiled code of the previous model is never reused (other shapes) and may hold it.
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        start = time.perf_counter()
        _STATE["model"] = build_model(SHAPES[case.shape], case.layers)
        _STATE["key"] = key
        _progress(f"built {case.shape} with {case.layers} layers in "
                  f"{time.perf_counter() - start:.1f} s "
                  f"({torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated)")
    return _STATE["model"]


def _attention_paths() -> Any:
    """kpt's per-path attention call counter (a private detail of the integration: None when
    it keeps none)."""
    try:
        from kpt.integrations import _hf_attention
    except ImportError:
        return None
    return getattr(_hf_attention, "calls", None)


def _timed(step: Callable[[], Any], setup: Callable[[], None],
           benchmark: Any) -> tuple[float, float, float]:
    """(median ms per call between CUDA events, seconds of the first call, host ms per call):
    two warm-up calls (the first compiles), then calls for about ``ROW_S`` seconds."""
    firsts = []
    for _ in range(2):
        setup()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        firsts.append(time.perf_counter() - start)
    times: list[float] = []

    def one() -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))

    rounds = min(20, max(3, math.ceil(ROW_S / max(firsts[1], 1e-4))))
    benchmark.pedantic(one, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    host = benchmark.stats.stats.median * 1e3 if benchmark.stats else statistics.median(times)
    return statistics.median(times), firsts[0], host


def _check(case: Case, rel: float, notes: list[str]) -> str | None:
    """The failure message of a gross mismatch (``rel`` is already scaled to ``TOL``), or None;
    HF's own packed rows are labelled instead."""
    hf_packed = case.row == "packed" and case.variant.startswith("hf")
    tol = _CASE_TOL.pop(case, TOL)
    if rel <= tol:
        if hf_packed:
            notes.append("HF keeps the packed sequences apart")
        return None
    if hf_packed:
        notes.append("HF attends across packed sequences")
        return None
    notes.append("MISMATCH")
    return f"{case}: relative difference to the reference {rel:.3g} > KPT_E2E_TOL={tol}"


def _paths_note(paths: Any, notes: list[str]) -> None:
    if paths:
        notes.append("kpt attention: " + ", ".join(f"{k} x{v}" for k, v in paths.items()))


Measured = tuple[float, float, float, int, str, float]  # ms, first s, host ms, tokens, shown, rel


def _run_prefill_or_train(case: Case, model: nn.Module, benchmark: Any,
                          notes: list[str]) -> Measured:
    refs, packed = _STATE["refs"], case.row == "packed"
    if case.row not in refs:
        refs[case.row] = make_batch(case.row, model.config.vocab_size, model.device)
    batch = refs[case.row]
    if case.row_key not in refs:
        ref = (prefill_reference(model, batch, packed) if case.kind == "prefill"
               else train_reference(model, batch, packed))
        refs[case.row_key] = tuple(t.cpu() for t in ref) if isinstance(ref, tuple) else ref.cpu()
    ref = refs[case.row_key]
    with patched(model, case.variant, notes), \
            compiled_layers(model, case.variant.endswith("_compile")):
        paths = _attention_paths()
        torch.cuda.reset_peak_memory_stats()
        if case.kind == "prefill":
            ms, first, host = _timed(lambda: prefill(model, batch), lambda: None, benchmark)
            if paths is not None:
                paths.clear()
            rel = rel_diff(prefill(model, batch), ref)
            shown = f"{rel:.1e}"
        else:
            with hidden_only(model) as head:
                ms, first, host = _timed(lambda: train_step(model, batch, head),
                                         lambda: model.zero_grad(set_to_none=True), benchmark)
                model.zero_grad(set_to_none=True)
                if paths is not None:
                    paths.clear()
                loss = train_step(model, batch, head)
            rel_loss, rel_grad = rel_diff(loss, ref[0]), rel_diff(grad_probe(model), ref[1])
            model.zero_grad(set_to_none=True)
            # Gradients go through one more bf16 pass than the loss: twice the tolerance.
            rel = max(rel_loss, rel_grad / 2)
            shown = f"loss {rel_loss:.1e}, grad {rel_grad:.1e}"
        _paths_note(paths, notes)
    return ms, first, host, batch.tokens, shown, rel


def _run_decode(case: Case, model: nn.Module, benchmark: Any, notes: list[str]) -> Measured:
    batch = int(case.row.split("-b")[1])
    static = case.row.startswith("static")
    prompt, first = decode_inputs(model.config.vocab_size, batch, model.device)
    key = (case.shape, case.layers, "decode", batch)
    if key not in _STATE["refs"]:
        _STATE["refs"][key] = decode_reference(model, prompt, first).cpu()
    ref = _STATE["refs"][key]
    with patched(model, case.variant, notes):
        torch.cuda.reset_peak_memory_stats()
        decoder = Decoder(model, prompt, first, DECODE_STEPS, static)
        paths = _attention_paths()
        if paths is not None:
            paths.clear()
        start = time.perf_counter()
        if case.variant.endswith("_compile"):
            _raise_recompile_limit()
            decoder.forward = torch.compile(model, dynamic=False)
        if static:
            decoder.capture()
        setup_s = time.perf_counter() - start
        ms, first_s, host = _timed(decoder.run, decoder.reset, benchmark)
        logits = decoder.first_logits()
        rel = rel_diff(logits, ref)
        shown = f"{rel:.1e}"
        if case.variant in QUANT_VARIANTS:
            with quantized_ops_on_reference():
                same_weights = Decoder(model, prompt, first, 1, False).first_logits()
            rel_bf16, rel = rel, rel_diff(logits, same_weights)
            shown = f"{rel:.1e} (to bf16 {rel_bf16:.1e})"
            if case.variant in DYNAMIC_ACTIVATIONS:
                noise = rel_diff(same_weights, ref)
                _CASE_TOL[case] = max(TOL, noise)
                shown += f" (bound: reference's own distance to bf16, {noise:.1e})"
        _paths_note(paths, notes)
        del decoder
    return ms / DECODE_STEPS, setup_s + first_s, host / DECODE_STEPS, batch, shown, rel


# The ops a quantized patch runs, and the reference backend each has.
QUANT_OPS = ("fp8_gemm", "int4_gemm", "fused_moe")


@contextlib.contextmanager
def quantized_ops_on_reference() -> Iterator[None]:
    """fp8_gemm, int4_gemm and fused_moe on their reference backends (KPT_BACKEND, with the
    ops' cached decisions and fast launchers dropped on the way in and out): the quantized
    model computed in float32 from the same quantized weights and activations."""
    import importlib

    specs = [importlib.import_module(f"kpt.ops.{m}").SPEC for m in ("fp8_gemm", "int4_gemm",
                                                                    "moe")]
    before = os.environ.get("KPT_BACKEND")
    os.environ["KPT_BACKEND"] = ",".join(f"{op}=reference" for op in QUANT_OPS)
    for spec in specs:
        spec.clear_cache()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KPT_BACKEND", None)
        else:
            os.environ["KPT_BACKEND"] = before
        for spec in specs:
            spec.clear_cache()


def _run_paged_decode(case: Case, model: nn.Module, benchmark: Any,
                      notes: list[str]) -> Measured:
    batch, context = paged_row(case.row)
    prompt, first = decode_inputs(model.config.vocab_size, batch, model.device, context=context)
    key = (case.shape, case.layers, case.row)
    if key not in _STATE["refs"]:
        reference = PagedDecoder(model, prompt, first, 1, paged=False)
        _STATE["refs"][key] = reference.first_logits().cpu()
        del reference
    ref = _STATE["refs"][key]
    paged = case.variant.startswith("kpt")
    with patched(model, case.variant, notes):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        decoder = PagedDecoder(model, prompt, first, DECODE_STEPS, paged)
        setup_s = time.perf_counter() - start
        paths = _attention_paths()
        if paths is not None:
            paths.clear()
        ms, first_s, host = _timed(decoder.run, decoder.reset, benchmark)
        rel = rel_diff(decoder.first_logits(), ref)
        _paths_note(paths, notes)
        if paged:
            notes.append(f"KV {decoder.cache.kv_bytes() / 2**30:.2f} GiB in "
                         f"{PAGE_SIZE}-token pages")
        del decoder
    return ms / DECODE_STEPS, setup_s + first_s, host / DECODE_STEPS, batch, f"{rel:.1e}", rel


def _speedup(row: dict[str, Any], base: str) -> str:
    """``base``'s ms / this row's ms in the same row, or "-"."""
    ms = next((r["ms"] for r in TABLE if r["key"] == row["key"] and r["variant"] == base), None)
    return f"{ms / row['ms']:.2f}" if ms else "-"


def _write_table() -> str:
    lines = [f"# kpt end to end, HF Llama and Qwen3-MoE bf16: {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, transformers {transformers.__version__}",
             "",
             "ms: per call (prefill, train) or per decode step; tokens/s: real tokens (pads "
             "excluded); x hf, x hfc: hf_sdpa's, hf_sdpa_compile's ms / this ms; rel diff: to "
             "HF's eager SDPA path on the same inputs (packed: each sequence alone); first s: "
             "first call, compile and graph capture included; peak: max allocated, weights "
             "included",
             "",
             "| case | variant | layers | ms | tokens/s | x hf | x hfc | peak GiB | rel diff "
             "| first s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['variant']} | {r['layers']} | {r['ms']:.2f} | "
              f"{r['tok_s']:,.0f} | {_speedup(r, 'hf_sdpa')} | {_speedup(r, 'hf_sdpa_compile')} "
              f"| {r['peak']:.1f} | {r['rel']} | {r['first']:.1f} | {r['note']} |"
              for r in TABLE]
    if SKIPPED:
        lines += ["", "Skipped: " + "; ".join(SKIPPED)]
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "e2e.md").write_text(text)
    return text


@pytest.fixture(scope="module", autouse=True)
def _e2e_table(pytestconfig):
    _STATE["reporter"] = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    yield
    if not (TABLE or SKIPPED):
        return
    if not os.environ.get("OUT") and _STATE["reporter"] is not None:
        _STATE["reporter"].write_line("\n" + _write_table())
    _STATE.update(key=None, model=None, refs={})
    torch._dynamo.reset()


def _skip(case: Case, why: str) -> None:
    SKIPPED.append(f"{case} ({why})")
    _write_table()
    pytest.skip(why)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_e2e_hf(cuda_only, benchmark, case: Case):
    _STATE["start"] = _STATE["start"] or time.perf_counter()
    if time.perf_counter() - _STATE["start"] > BUDGET_S:
        _skip(case, f"KPT_E2E_BUDGET_S={BUDGET_S:.0f} spent")
    model = _model(case)
    notes: list[str] = []
    runner = _run_decode if case.kind == "decode" else _run_prefill_or_train
    if case.row.startswith("paged"):
        runner = _run_paged_decode
    out_of_memory = False
    try:
        ms, first, host, tokens, shown, rel = runner(case, model, benchmark, notes)
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # cleaned up below, once the traceback no longer holds the frames
    except Exception as err:
        SKIPPED.append(f"{case} (failed: {type(err).__name__}: {str(err).splitlines()[0][:120]})")
        _write_table()
        raise
    if out_of_memory:
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        _skip(case, "out of memory: lower KPT_E2E_LAYERS")
    failure = _check(case, rel, notes)
    peak = torch.cuda.max_memory_allocated() / 2**30
    TABLE.append({"key": case.row_key, "case": f"{case.shape} {case.kind} {case.row}",
                  "variant": case.variant, "layers": case.layers, "ms": ms,
                  "tok_s": tokens / ms * 1e3, "peak": peak, "rel": shown, "first": first,
                  "note": "; ".join(notes)})
    _write_table()
    speedup = _speedup(TABLE[-1], "hf_sdpa")
    record(f"e2e {case.shape} L{case.layers} {case.kind} {case.row}", case.variant,
           kernel_us=ms * 1e3, latency_us=host * 1e3, tok_per_s=tokens / ms * 1e3,
           peak_gib=peak)
    _progress(f"{case}: {ms:.2f} ms, {tokens / ms * 1e3:,.0f} tok/s, x hf {speedup}, "
              f"rel {shown}, first call {first:.1f} s")
    assert failure is None, failure


@pytest.mark.skipif(os.environ.get("KPT_E2E_PROFILE") != "1",
                    reason="profiling runs with KPT_E2E_PROFILE=1")
def test_e2e_profile(cuda_only):
    """torch.profiler over one prefill and one train step of the 8B shape, hf_sdpa and kpt: the
    top ops by CUDA time (self) to ``$OUT/profile-<variant>-<kind>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    _STATE["start"] = _STATE["start"] or time.perf_counter()
    row = _env("KPT_E2E_PROFILE_ROW", "padded")
    layers = _per_shape("KPT_E2E_LAYERS", TRAIN_LAYERS)["8b"]
    model = _model(Case("8b", layers, "prefill", row, "hf_sdpa"))
    batch = make_batch(row, model.config.vocab_size, model.device)
    out_dir = Path(os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)

    def train() -> None:
        with hidden_only(model) as head:
            train_step(model, batch, head)
        model.zero_grad(set_to_none=True)

    for variant in ("hf_sdpa", "kpt"):
        with patched(model, variant):
            for kind, step in (("prefill", lambda: prefill(model, batch)), ("train", train)):
                step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
                path = out_dir / f"profile-{variant}-{kind}.txt"
                path.write_text(f"{variant} {kind}, 8b L{layers}, row {row}, "
                                f"{torch.cuda.get_device_name()}\n{table}\n")
                _progress(f"profile {variant} {kind}: {path}")


def _smoke(compile_layers: bool = False) -> None:
    """CPU check on a tiny float32 model: batches, labels, references, the loss and its
    gradient, kpt vs plain HF on every row, the packed check's sensitivity, both decoders."""
    tiny = dict(SHAPES["8b"], hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=256)
    lengths = (40, 31, 22, 17, 9, 5, 3, 2)
    model = build_model(tiny, 2, device="cpu", dtype=torch.float32)
    batches = {row: make_batch(row, 256, "cpu", lengths) for row in ("seq64", "padded", "packed")}
    hidden = torch.randn(70, 64, requires_grad=True)
    weight = torch.randn(256, 64, requires_grad=True)
    labels = torch.randint(0, 256, (70,))
    fake = Batch({}, 1, labels, labels, labels[None], torch.arange(70), 70)
    (lm_loss(hidden[None], weight, fake) * 3).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    (nn.functional.cross_entropy(hidden @ weight.t(), labels) * 3).backward()
    assert rel_diff(grads[0], hidden.grad) < 1e-5 and rel_diff(grads[1], weight.grad) < 1e-5
    same = (rel_diff(prefill_reference(model, batches["padded"], False),
                     prefill_reference(model, batches["packed"], True)),
            rel_diff(train_reference(model, batches["padded"], False)[0],
                     train_reference(model, batches["packed"], True)[0]))
    print(f"padded vs packed reference (same sequences): logits {same[0]:.1e}, loss {same[1]:.1e}")
    assert max(same) < 1e-5
    for row, batch in batches.items():
        ref_p = prefill_reference(model, batch, row == "packed")
        ref_t = train_reference(model, batch, row == "packed")
        for variant in ("hf_sdpa", "kpt"):
            with patched(model, variant), compiled_layers(model, compile_layers):
                logits = prefill(model, batch)
                with hidden_only(model) as head:
                    loss = train_step(model, batch, head)
                probe = grad_probe(model)
                model.zero_grad(set_to_none=True)
            rels = rel_diff(logits, ref_p), rel_diff(loss, ref_t[0]), rel_diff(probe, ref_t[1])
            print(f"{row:8} {variant:8} logits {rels[0]:.1e} loss {rels[1]:.1e} "
                  f"grad {rels[2]:.1e}")
            assert max(rels) < 1e-4, (row, variant, rels)
    packed = batches["packed"]
    across = dataclasses.replace(packed, inputs={"input_ids": packed.inputs["input_ids"]})
    off = rel_diff(prefill(model, across), prefill_reference(model, packed, True))
    print(f"attending across packed sequences: logits {off:.2f} off (float32)")
    prompt, first = decode_inputs(256, 2, "cpu", context=24)
    ref = decode_reference(model, prompt, first)
    for static in (False, True):
        for variant in ("hf_sdpa", "kpt", *QUANT_VARIANTS):
            with patched(model, variant):
                decoder = Decoder(model, prompt, first, 6, static)
                rel = rel_diff(decoder.first_logits(), ref)
                decoder.reset()
                decoder.run()
            print(f"decode {'static' if static else 'dynamic'} {variant:8} first step {rel:.1e}, "
                  f"token 6 {decoder.ids.flatten().tolist()}")
            # Quantized: the weights' rounding (fp8 ~2^-4, int4 g128 ~2^-3 relative per weight)
            # averaged over each product; a broken layer gives ~1.
            assert rel < (0.3 if variant in QUANT_VARIANTS else 1e-4), (variant, rel)
            if variant in QUANT_VARIANTS:
                with patched(model, variant):
                    logits = Decoder(model, prompt, first, 1, static).first_logits()
                    with quantized_ops_on_reference():
                        assert os.environ["KPT_BACKEND"].startswith("fp8_gemm=reference")
                        same = Decoder(model, prompt, first, 1, False).first_logits()
                assert rel_diff(logits, same) < 1e-4  # the CPU runs the reference already
    prompt, first = decode_inputs(256, 3, "cpu", context=37)
    ref = PagedDecoder(model, prompt, first, 1, paged=False).first_logits()
    for variant in ("hf_sdpa", "kpt"):
        with patched(model, variant):
            decoder = PagedDecoder(model, prompt, first, 6, paged=variant == "kpt")
            rel = rel_diff(decoder.first_logits(), ref)
            decoder.reset()
            decoder.run()
        print(f"decode paged-b3-c37 {variant:8} first step {rel:.1e}, "
              f"token 6 {decoder.ids.flatten().tolist()}")
        assert rel < 1e-4


def _smoke_moe() -> None:
    """CPU check of the MoE rows on a tiny float32 Qwen3-MoE: every MoE variant against the
    reference on the prefill rows and the first eager and static decode step."""
    tiny = dict(SHAPES["qwen3-a3b"], hidden_size=64, intermediate_size=96,
                moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    model = build_model(tiny, 2, device="cpu", dtype=torch.float32)
    lengths = (40, 31, 22, 17, 9, 5, 3, 2)
    for row in ("seq64", *MOE_PREFILL_ROWS[1:]):
        batch = make_batch(row, 256, "cpu", lengths)
        ref = prefill_reference(model, batch, False)
        for variant in MOE_VARIANTS:
            with patched(model, variant):
                rel = rel_diff(prefill(model, batch), ref)
            print(f"moe {row:8} {variant:18} logits {rel:.1e}")
            assert rel < 1e-4, (row, variant, rel)
    prompt, first = decode_inputs(256, 2, "cpu", context=24)
    ref = decode_reference(model, prompt, first)
    for static in (False, True):
        for variant in MOE_VARIANTS:
            if static and variant == "hf_sdpa_eager_moe":
                continue
            with patched(model, variant):
                decoder = Decoder(model, prompt, first, 6, static)
                rel = rel_diff(decoder.first_logits(), ref)
                decoder.reset()
                decoder.run()
            print(f"moe decode {'static' if static else 'dynamic'} {variant:18} first step "
                  f"{rel:.1e}, token 6 {decoder.ids.flatten().tolist()}")
            assert rel < 1e-4
        # fp8 (int4's default groups of 128 do not divide this model's hidden size of 64):
        # attention projections and the routed experts (QuantizedExperts) quantized.
        with patched(model, "kpt_fp8"):
            kinds = {type(m).__name__ for m in model.modules()}
            decoder = Decoder(model, prompt, first, 6, static)
            rel = rel_diff(decoder.first_logits(), ref)
        print(f"moe decode {'static' if static else 'dynamic'} kpt_fp8 first step {rel:.1e}")
        assert {"QuantizedExperts", "FP8Linear"} <= kinds, kinds
        assert rel < 0.3, rel  # e4m3 weights and activations (~2^-5 each), two layers


if __name__ == "__main__":
    import sys

    _smoke(compile_layers="--compile" in sys.argv)
    _smoke_moe()
