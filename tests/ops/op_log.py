"""A dispatch mode that records which ops reach the dispatcher (tests of the eager fast paths,
which must skip the custom ops in plain eager code and keep them wherever a mode can see)."""

from __future__ import annotations

import torch


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
