"""Shared by the autotune tests: a fake GPU fingerprint, a fake clock, and a small fake op
whose backends advance the clock by a known cost per call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kpt.autotune import db, provenance
from kpt.autotune.timing import ClockTimer
from kpt.ops._registry import Backend, Op, Problem, Tuning

FINGERPRINT = "Test GPU/sm_00/1sm/1GiB/cuda0.0"
FAKE_OP = "fake_scale"


class FakeClock:
    """Time that passes only when a fake backend runs: ``cost`` microseconds per call."""

    def __init__(self) -> None:
        self.now_us = 0.0

    def __call__(self) -> float:
        return self.now_us / 1e6

    def spend(self, cost_us: float) -> None:
        self.now_us += cost_us


@dataclass
class FakeCall:
    x: torch.Tensor
    out: torch.Tensor


def _make_call(shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> FakeCall:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape["n"], generator=gen) + 3.0).to(device=device, dtype=dtype)
    return FakeCall(x, torch.empty_like(x))


def _check(call: FakeCall, expected: FakeCall) -> str | None:
    if not torch.allclose(call.out, expected.out):
        return "fake_scale.out differs from the reference"
    return None


class FakeOp:
    """``out = 2 * x`` with backends: ``reference`` (50 us), ``slow`` (10 us, the static default
    on cuda and cpu) and ``fast``, whose configs are ``block=1`` (5 us, correct), ``block=2``
    (wrong values) and ``block=4`` (raises, like a compile error)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

        def reference(call: FakeCall, config: dict) -> None:
            clock.spend(50.0)
            torch.mul(call.x, 2, out=call.out)

        def slow(call: FakeCall, config: dict) -> None:
            clock.spend(10.0)
            torch.mul(call.x, 2, out=call.out)

        def fast(call: FakeCall, config: dict) -> None:
            if config["block"] == 4:
                raise RuntimeError("ptxas error: too many resources requested for launch")
            clock.spend(5.0)
            torch.mul(call.x, 2 if config["block"] == 1 else 3, out=call.out)

        devices = frozenset({"cpu", "cuda"})
        dtypes = frozenset({torch.float32})
        self.op = Op(
            name=FAKE_OP,
            backends=(
                Backend("fast", devices, dtypes, fast,
                        configs=lambda p: [{"block": 1}, {"block": 2}, {"block": 4}]),
                Backend("slow", devices, dtypes, slow),
                Backend("reference", devices, dtypes, reference),
            ),
            priority={"cpu": ("slow", "fast", "reference"), "cuda": ("slow", "fast", "reference")},
            bucket=lambda p: f"n{p['n']}",
            tuning=Tuning(
                shapes=lambda config, tokens: [{"n": t} for t in tokens],
                make_call=_make_call,
                problem=lambda call: Problem.of(call.x.device, call.x.dtype, n=call.x.numel()),
                check=_check,
                poison=lambda call: call.out.fill_(float("nan")),
                clone_outputs=lambda call: FakeCall(call.x, torch.empty_like(call.out)),
            ),
        )
        self.timer = ClockTimer(clock=clock)


def make_row(backend: str, config: str = "{}", *, median_us: float | None = 10.0,
             spread: float = 0.0, valid: int = 1, is_default: int = 0, bucket: str = "n8",
             dtype: str = "float32", op: str = FAKE_OP, **extra) -> dict:
    """A row measured "now" on the fake fingerprint (fresh provenance) unless overridden."""
    row = {"op": op, "backend": backend, "config": config, "dtype": dtype, "bucket": bucket,
           "fingerprint": FINGERPRINT, "valid": valid, "is_default": is_default,
           "median_us": median_us if valid else None, "spread": spread, "samples": 20,
           "error": None if valid else "RuntimeError: boom",
           **provenance.provenance(op, backend)}
    row.update(extra)
    return db.normalize(row)
