"""kpt's main job in one command: ``python -m kpt.demo [--config NAME_OR_PATH]``.

On whatever device is present (a GPU if there is one, else the CPU) it builds a random-weight
model from a config bundled with the package (no download), patches it with kpt, checks that
the patched model computes the same logits and the same greedy tokens as HF's eager model, and
times both, plus the fused op alone against the eager PyTorch sequence it replaces.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import kpt
from kpt.info import backend_rows
from kpt.ops import rmsnorm_qkv_rope
from kpt.ops.rmsnorm_qkv_rope import SPEC, make_call, problem_of, shapes_from_hf_config
from kpt.ops.rmsnorm_qkv_rope.reference import eager_unfused

BUNDLED = ("demo-llama", "demo-qwen3")


def load_config(name_or_path: str) -> dict[str, Any]:
    if name_or_path in BUNDLED:
        text = resources.files("kpt.data").joinpath(f"{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        text = (path / "config.json" if path.is_dir() else path).read_text()
    return json.loads(text)


def _timer(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall time per call in microseconds, synchronising around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def run(config_name: str, device: torch.device, new_tokens: int) -> list[tuple[str, str]]:
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
        handle = kpt_hf.patch(model)
        kpt_logits = model(prompt).logits.float()
        kpt_tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                    attention_mask=torch.ones_like(prompt))
        kpt_us = _timer(lambda: model(prompt[:, :1]), device, 20)
        patched = len(handle.patched)
        handle.unpatch()
    rel = ((kpt_logits - hf_logits).norm() / hf_logits.norm()).item()
    same = int((kpt_tokens == hf_tokens).all(-1).sum())
    rows += [
        ("patched layers", str(patched)),
        ("logits, relative difference to HF", f"{rel:.2e}"),
        ("greedy tokens equal to HF", f"{same}/{kpt_tokens.shape[0]} sequences, "
                                      f"{new_tokens} new tokens"),
        ("one-token forward, HF eager", f"{hf_us:.0f} us"),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpt.demo", description=__doc__)
    parser.add_argument("--config", default="demo-llama",
                        help=f"bundled config ({', '.join(BUNDLED)}) or a HF config.json path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"kpt {kpt.__version__}, torch {torch.__version__}, device {device}")
    print("\nbackends on this machine:")
    for op, backend, status in backend_rows(device):
        print(f"  {op:<18} {backend:<10} {status}")
    rows = run(args.config, device, args.new_tokens)
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
