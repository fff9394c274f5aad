"""``python -m kpt.info``: which backends of which ops work on this machine, and why not.

For each op, a small typical call is described on the device in bf16 and every backend is asked
for its reasons; nothing is compiled (a backend needing a JIT build shows as available when a
build can be attempted). ``kpt-autotune doctor`` prints the same table with more detail.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from kpt._table import format_table

if TYPE_CHECKING:
    from kpt.ops._registry import Op, Problem

# A small Llama-like layer: every op with tuning hooks describes one call of it (16 tokens), which
# is enough for backends to state their device, dtype and arch reasons.
_TYPICAL_CONFIG = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2,
                   "hidden_size": 256, "head_dim": 64}


def example_problem(op: Op, device: torch.device, dtype: torch.dtype) -> Problem | None:
    """The problem of a small typical call of ``op``: its ``example`` hook's, else one made
    with its tuning hooks (a decoder layer of :data:`_TYPICAL_CONFIG`, 16 tokens); None when
    the op declares neither."""
    if op.example is not None:
        return op.example(device, dtype)
    if op.tuning is not None:
        shape = op.tuning.shapes(_TYPICAL_CONFIG, [16])[0]
        return op.tuning.problem(op.tuning.make_call(shape, dtype, device, 0))
    return None


def backend_rows(device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, str, str]]:
    """(op, backend, "ok" or the reasons) for every registered op and backend.

    The reasons are dispatch's own (:meth:`Op.reasons`) for a typical call, so "ok" means such
    a call with ``backend=`` that backend runs (or, for a JIT backend not built yet, tries to
    build).
    """
    from kpt.ops._registry import all_ops

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rows = []
    for name, op in sorted(all_ops().items()):
        problem = example_problem(op, device, dtype)
        for backend in op.backends:
            if problem is None:
                status = "not checked: the op describes no example call"
            else:
                status = "; ".join(op.reasons(backend, problem)) or "ok"
            rows.append((name, backend.name, status))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpt.info", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best)")
    args = parser.parse_args(argv)
    import kpt

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"kpt {kpt.__version__}  torch {torch.__version__}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(format_table(backend_rows(device), ["op", "backend", "status"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
