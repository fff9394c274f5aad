"""``python -m kpt.info``: which backends of which ops work on this machine, and why not.

For each op, a small typical call is described on the device in bf16 and every backend is asked
for its reasons; nothing is compiled (a backend needing a JIT build shows as available when a
build can be attempted). ``kpt-autotune doctor`` prints the same table with more detail.
"""

from __future__ import annotations

import argparse

import torch

# A small Llama-like layer: every op with tuning hooks describes one call of it (16 tokens), which
# is enough for backends to state their device, dtype and arch reasons.
_TYPICAL_CONFIG = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2,
                   "hidden_size": 256, "head_dim": 64}


def backend_rows(device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, str, str]]:
    """(op, backend, "ok" or the reasons) for every registered op and backend."""
    from kpt.ops._registry import all_ops

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rows = []
    for name, op in sorted(all_ops().items()):
        problem = None
        if op.tuning is not None:
            shape = op.tuning.shapes(_TYPICAL_CONFIG, [16])[0]
            problem = op.tuning.problem(op.tuning.make_call(shape, dtype, device, 0))
        for backend in op.backends:
            if problem is None:  # no typical call: the environment's reason only
                reasons = [r for r in [op.unavailable(backend)] if r]
                if not reasons and device.type not in backend.device_types:
                    reasons = [f"device {device.type} not in {sorted(backend.device_types)}"]
            else:
                reasons = op.reasons(backend, problem)
            rows.append((name, backend.name, "ok" if not reasons else "; ".join(reasons)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpt.info", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best)")
    args = parser.parse_args(argv)
    import kpt

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"kpt {kpt.__version__}  torch {torch.__version__}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = backend_rows(device)
    widths = [max(len(r[i]) for r in rows + [("op", "backend", "")]) for i in range(2)]
    print(f"{'op':<{widths[0]}}  {'backend':<{widths[1]}}  status")
    for op, backend, status in rows:
        print(f"{op:<{widths[0]}}  {backend:<{widths[1]}}  {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
