"""Many requests sharing one long system prompt, decoded through kpt's ``cascade_attention``.

    python examples/shared_prompt.py           # GPU: 64 requests, 16384-token prompt, bf16
    python examples/shared_prompt.py --small   # CPU check: tiny float32 model, 4 requests

The model: a random-weight ``LlamaForCausalLM`` of the Llama-3-8B shape
(``bench/llama3-8b-config.json``: hidden 4096, 32 query / 8 kv heads, head dim 128) with
``--layers`` decoder layers (4 by default: the KV cache is what this example is about, and the
naive layout of 64 x 16k tokens already takes 4 GiB per layer), patched by
``kpt.integrations.hf.patch``. ``--small``: the same config shrunk to hidden 64, 4 / 2 heads of
16, 2 layers, 256 tokens, float32 on the CPU.

The system prompt is prefilled once (batch 1) into a ``PagedCache``; then the N requests get
one of two layouts of the same tokens:

* cascade: ``cache.share_prefix(N)``: the prompt's pages are kept once; each request's own
  tokens go to pages of its own. Attention is ``cascade_attention`` over two levels: level 0 the
  prompt, read once for the whole group; level 1 the request's own pages.
* naive: ``cache.batch_repeat_interleave(N)``: each request gets its own copy of the prompt's
  pages (what a per-request cache holds); attention is ``paged_attention``.

Each request then prefills its own question (``--question`` random tokens, different per
request) and decodes ``--steps`` tokens greedily. Printed per layout: KV bytes in use (every
layer, keys and values), the question prefill's time and the decode tokens/s. The check: the
naive layout is fed the cascade layout's tokens and must choose the same token at every step,
which is the same as both generating the same tokens (a step that agrees on the same input
keeps them on the same path). On the CPU in float32 they must agree exactly; in bf16 a
disagreement where the naive layout's two candidates are closer than the two layouts' measured
logit difference is reported as a near tie (random weights give nearly flat logits), any
other fails the run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

import kpt.integrations.hf as kpt_hf
from kpt.integrations import _hf_attention

CONFIG = Path(__file__).resolve().parents[1] / "bench" / "llama3-8b-config.json"
# The model's KV cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"
SMALL = dict(requests=4, prompt=45, question=3, steps=6, layers=2, page_size=16)


@dataclass
class Run:
    """One layout's result: tokens (N, steps + 1), the margin of its own choice over the token
    it was fed (N, steps + 1; 0 where they agree), the question prefill's last logits, KV bytes
    in use, pool bytes, seconds of the question prefill and of the decode steps."""

    layout: str
    tokens: Tensor
    margins: Tensor
    first_logits: Tensor
    kv_bytes: int
    pool_bytes: int
    prefill_s: float
    decode_s: float
    paths: dict[str, int]


@dataclass
class Report:
    requests: int
    prompt: int
    question: int
    steps: int
    cascade: Run
    naive: Run
    logit_diff: float  # max |cascade - naive| of the question prefill's last logits
    disagree: int  # steps where the naive layout chose another token than the cascade one
    near_ties: int  # of those, where its margin was within logit_diff

    @property
    def ok(self) -> bool:
        return self.disagree == self.near_ties

    @property
    def equal(self) -> bool:
        return self.disagree == 0

    def table(self) -> str:
        lines = [f"{self.requests} requests x ({self.prompt}-token shared prompt + "
                 f"{self.question}-token question), {self.steps} greedy steps",
                 "",
                 "| layout | attention calls | KV in use | pool | question prefill ms "
                 "| decode tokens/s |",
                 "|---|---|---|---|---|---|"]
        for run in (self.cascade, self.naive):
            rate = self.requests * self.steps / run.decode_s if run.decode_s else float("nan")
            paths = ", ".join(f"{k} x{v}" for k, v in sorted(run.paths.items()))
            lines.append(f"| {run.layout} | {paths} | {_size(run.kv_bytes)} | "
                         f"{_size(run.pool_bytes)} | {run.prefill_s * 1e3:.1f} | {rate:,.0f} |")
        memory = self.naive.kv_bytes / max(self.cascade.kv_bytes, 1)
        speed = self.naive.decode_s / max(self.cascade.decode_s, 1e-12)
        lines += ["", f"cascade vs naive: {memory:.1f}x less KV memory, {speed:.2f}x the decode "
                      f"tokens/s",
                  f"question-prefill logits, cascade vs naive: max difference "
                  f"{self.logit_diff:.2e}"]
        if self.equal:
            lines.append(f"tokens equal: yes ({self.requests} x {self.steps + 1})")
        else:
            lines.append(f"tokens equal: no, {self.disagree} steps disagree, {self.near_ties} of "
                         f"them near ties (margin <= {self.logit_diff:.2e})")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def build_model(layers: int, small: bool, device: torch.device,
                dtype: torch.dtype) -> LlamaForCausalLM:
    fields = {k: v for k, v in json.loads(CONFIG.read_text()).items()
              if k not in ("model_type", "torch_dtype")}
    if small:
        fields |= dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=256)
    fields |= dict(num_hidden_layers=layers, attn_implementation="sdpa",
                   max_position_embeddings=131072)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**fields), dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_layout(model: LlamaForCausalLM, layout: str, prompt: Tensor, questions: Tensor,
               steps: int, page_size: int, forced: Tensor | None = None) -> Run:
    """Prefill ``prompt`` (1, P) once, lay the N requests out as ``layout``, prefill each
    request's question (N, U), decode ``steps`` greedy tokens; ``forced`` (N, steps + 1): feed
    these tokens instead of this layout's own choices (its choices are still recorded)."""
    device = prompt.device
    n, u = questions.shape
    p = prompt.shape[1]
    own = n * math.ceil((u + steps) / page_size)
    shared = math.ceil(p / page_size)
    cache = kpt_hf.PagedCache(model.config, page_size=page_size,
                              num_pages=(shared if layout == "cascade" else n * shared) + own)
    tokens, margins = [], []

    def forward(ids: Tensor, start: int) -> Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=device).expand(ids.shape[0],
                                                                                     -1)
        out = model(ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{CACHE_KW: cache})
        return out.logits[:, -1]

    def choose(logits: Tensor, step: int) -> Tensor:
        choice = logits.argmax(-1)
        fed = choice if forced is None else forced[:, step]
        tokens.append(choice)
        margins.append((logits.gather(1, choice[:, None]) - logits.gather(1, fed[:, None]))[:, 0])
        return fed[:, None]

    with torch.no_grad():
        forward(prompt, 0)
        if layout == "cascade":
            cache.share_prefix(n)
        else:
            cache.batch_repeat_interleave(n)
        _hf_attention.calls.clear()
        _sync(device)
        start = time.perf_counter()
        first_logits = forward(questions, p)
        _sync(device)
        prefill_s = time.perf_counter() - start
        ids = choose(first_logits, 0)
        _sync(device)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            ids = choose(forward(ids, p + u + step - 1), step)
        _sync(device)
        decode_s = time.perf_counter() - start
    return Run(layout, torch.stack(tokens, 1).cpu(), torch.stack(margins, 1).float().cpu(),
               first_logits.float().cpu(), cache.kv_bytes(), cache.pool_bytes(), prefill_s,
               decode_s, dict(_hf_attention.calls))


def run(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny float32 model on the CPU")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16384, help="shared prompt tokens")
    parser.add_argument("--question", type=int, default=32, help="own tokens per request")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.small:
        for name, value in SMALL.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(args.layers, args.small, device, dtype)
    kpt_hf.patch(model)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(device)
    questions = torch.randint(0, vocab, (args.requests, args.question), generator=gen).to(device)
    cascade = run_layout(model, "cascade", prompt, questions, args.steps, args.page_size)
    naive = run_layout(model, "naive", prompt, questions, args.steps, args.page_size,
                       forced=cascade.tokens.to(device))
    diff = float((cascade.first_logits - naive.first_logits).abs().max())
    disagree = naive.tokens != cascade.tokens
    # float32: no slack (the layouts differ by summation order only, ~1e-6 on these logits)
    slack = diff if dtype != torch.float32 else 0.0
    near = disagree & (naive.margins <= slack)
    return Report(args.requests, args.prompt, args.question, args.steps, cascade, naive, diff,
                  int(disagree.sum()), int(near.sum()))


def main(argv: list[str] | None = None) -> int:
    report = run(argv)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
