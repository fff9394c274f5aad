"""``kpt.ops._triton_launch.Launchers``: the keyed table of bound launchers for Triton call
sites without an op signature (the cascade merge). Off the GPU ``bind`` declines, so the table's
logic is checked here with a recording kernel and a recording ``bind``; the bound launcher
itself (``bind``) is checked on the GPU by the paged-attention fast-path tests and by
test_cascade_attention.py's repeated merges."""

from __future__ import annotations

import pytest
import torch

from kpt.ops import _triton_launch
from kpt.ops._triton_launch import Launchers


class _Kernel:
    """Records plain launches ``fn[grid](*args, **kwargs)``."""

    def __init__(self):
        self.plain = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.plain.append((grid, args, kwargs))


def _tensors(n=2):
    return tuple(torch.randn(3) for _ in range(n))


def test_first_call_of_a_key_launches_plainly_then_the_bound_launcher_runs(monkeypatch):
    kernel, bound_calls, binds = _Kernel(), [], []

    def bind(fn, grid, args, kwargs, tensors):
        binds.append((fn, tuple(grid), args, kwargs, tensors))
        return lambda *ts: bound_calls.append(ts)

    monkeypatch.setattr(_triton_launch, "bind", bind)
    table = Launchers(kernel)
    built = []

    def arguments(ts):
        def make():
            built.append(ts)
            return (*ts, 7), {"BLOCK": 16}
        return make

    a = _tensors()
    table.launch(("k", 1), a, (4, 2), arguments(a))
    assert kernel.plain == [((4, 2), (*a, 7), {"BLOCK": 16})]
    assert binds == [(kernel, (4, 2), (*a, 7), {"BLOCK": 16}, a)] and built == [a]
    b = _tensors()
    table.launch(("k", 1), b, (4, 2), arguments(b))
    assert bound_calls == [b] and len(kernel.plain) == 1
    assert built == [a]  # a bound key never builds its arguments again
    c = _tensors()
    table.launch(("k", 2), c, (1,), arguments(c))  # another key: plain, then bound
    assert len(kernel.plain) == 2 and len(binds) == 2 and bound_calls == [b]


def test_declined_keys_keep_the_plain_launch_and_the_table_is_bounded(monkeypatch):
    kernel, binds = _Kernel(), []

    def bind(fn, grid, args, kwargs, tensors):
        binds.append(grid)
        return None  # what the interpreter / the CPU / another Triton give

    monkeypatch.setattr(_triton_launch, "bind", bind)
    table = Launchers(kernel, limit=3)
    for _ in range(3):
        t = _tensors(1)
        table.launch("same", t, (1,), lambda t=t: (t, {}))
    assert len(kernel.plain) == 3 and len(binds) == 1  # declined once, not asked again
    for i in range(5):
        t = _tensors(1)
        table.launch(i, t, (1,), lambda t=t: (t, {}))
    assert len(table.bound) <= 3


def test_bind_declines_off_the_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    t = torch.randn(4)
    assert _triton_launch.bind(_Kernel(), (1,), (t,), {}, (t,)) is None
