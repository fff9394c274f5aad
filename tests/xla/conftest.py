"""tests/xla: kpt's ``xla`` backend on torch_xla's PJRT CPU device, against the reference.

They run in ``.venv-xla`` (``bash scripts/setup_xla.sh``; ``.ci/run`` runs them there); in an
environment without torch_xla every module here skips, saying so. ``PJRT_DEVICE`` defaults to
``CPU`` and must be set before torch_xla is imported, hence here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")

# (test id, graphs compiled by the first call, by a second call of the same shapes)
COMPILES: list[tuple[str, int, int]] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COMPILES:
        return
    terminalreporter.write_sep("-", "xla graph compilations per call shape (first, repeat)")
    for name, first, repeat in COMPILES:
        terminalreporter.write_line(f"{first:3d} {repeat:3d}  {name}")


@dataclass
class Counts:
    compiles: int
    reads: int


def counts() -> Counts:
    """Graphs compiled and device-to-host transfers so far (torch_xla's metrics)."""
    import torch_xla.debug.metrics as met

    compiled = met.metric_data("CompileTime")
    read = met.metric_data("TransferFromDeviceTime")
    return Counts(compiled[0] if compiled else 0, read[0] if read else 0)


@pytest.fixture
def xla_run(request):
    """``xla_run(fn)``: calls ``fn()`` (which issues kpt ops on XLA tensors and returns them)
    twice, each followed by one ``torch_xla.sync()``; asserts that neither call reads a tensor
    back to the host nor runs an op on torch_xla's CPU fallback (except ``fallbacks``, a known
    set, then asserted exactly), and that the second compiles nothing; records the first
    call's compilations; returns the first call's outputs on the CPU."""
    import torch_xla
    import torch_xla.debug.metrics as met

    def run(fn, fallbacks: frozenset[str] = frozenset()):
        results = []
        compiled = []
        for _ in range(2):
            met.clear_counters()  # executed_fallback_ops() reads counters
            before = counts()
            out = fn()
            during = counts()
            fell_back = set(met.executed_fallback_ops())
            assert fell_back == set(fallbacks), f"ops on torch_xla's CPU fallback: {fell_back}"
            if not fallbacks:
                assert during.reads == before.reads, "the call read a tensor back to the host"
            torch_xla.sync()
            compiled.append(counts().compiles - before.compiles)
            results.append(out)
        COMPILES.append((request.node.name, compiled[0], compiled[1]))
        assert compiled[0] >= 1, "the first call compiled no graph: did it run on XLA?"
        assert compiled[1] == 0, f"a repeat call with the same shapes compiled {compiled[1]}"
        return _to_cpu(results[0])

    return run


def _to_cpu(out):
    if isinstance(out, (tuple, list)):
        return type(out)(_to_cpu(t) for t in out)
    return out.cpu() if hasattr(out, "cpu") else out
