"""rmsnorm_qkv_rope on positions that broadcast to the tokens (a 0-d tensor, one position for
a row, a (B, 1) column), and the dispatch's keyed cache: every backend that runs here against
the reference on the same broadcast positions materialised."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kpt.ops import rmsnorm_qkv_rope
from kpt.ops._registry import BackendUnavailable
from kpt.ops.rmsnorm_qkv_rope import SPEC, make_call, problem_of

HEADS = {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}
# float32 on the Triton interpreter: the same sums in another order, a few ulps of the
# activations (|q| ~ 1e1 after the projection); bf16/fp16 are covered by the main op tests.
# bf16 on a GPU: the kernels round where the reference rounds, but its fp32 sums run in
# another order, so an element may land one bf16 ulp (2^-8 relative) away; norm-wise 1e-2.
TOL = {"atol": 2e-4, "rtol": 2e-4}
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available()
                                    else [])


def _backends() -> list[tuple[str, torch.dtype, str]]:
    out = []
    for device, dtype in CASES:
        problem = problem_of(make_call({"tokens": 8, "hidden": 64, **HEADS}, dtype,
                                       torch.device(device)))
        out += [(device, dtype, b.name) for b in SPEC.backends if not SPEC.reasons(b, problem)]
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL)
    else:
        err = (got.double() - want.double()).norm() / want.double().norm()
        assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize(("device", "dtype", "backend"), _backends(),
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("positions", [torch.tensor(7), torch.tensor([7]),
                                       torch.tensor([[7]]), torch.tensor([[3], [11]]),
                                       torch.tensor([5, 1, 9, 2, 7, 7, 0, 3]).expand(2, 8)],
                         ids=["0-d", "[7]", "[[7]]", "column", "expanded"])
def test_broadcast_positions(device, dtype, backend, positions):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 64, generator=gen).to(device, dtype)
    norm = (torch.randn(64, generator=gen) * 0.1 + 1).to(device, dtype)
    weight = (torch.randn(8 * 16, 64, generator=gen) * 64**-0.5).to(device, dtype)
    positions = positions.to(device)
    dense = positions.expand(2, 8).contiguous()
    args = {**HEADS, "rope_theta": 10000.0}
    got = rmsnorm_qkv_rope(x, norm, weight, positions, backend=backend, **args)
    want = rmsnorm_qkv_rope(x, norm, weight, dense, backend="reference", **args)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    # ... and a position that differs per token does change the result (the check can fail).
    shifted = rmsnorm_qkv_rope(x, norm, weight, dense + 1, backend="reference", **args)
    assert (shifted[0] - want[0]).abs().max() > 1e-1


def test_keyed_dispatch_caches_and_recovers(monkeypatch):
    """launch_keyed: one decision per key (make_problem called once), cleared with the
    caches, and a backend failing with BackendUnavailable is recorded and replaced."""
    call = make_call({"tokens": 4, "hidden": 32, **HEADS}, torch.float32, torch.device("cpu"))
    made = []

    def make():
        made.append(1)
        return problem_of(call)

    SPEC.clear_cache()
    first = SPEC.launch_keyed(("k",), make, call)
    again = SPEC.launch_keyed(("k",), make, call)
    assert first == again and len(made) == 1
    SPEC.clear_cache()
    SPEC.launch_keyed(("k",), make, call)
    assert len(made) == 2

    # A failure at first use: recorded once, and dispatch moves on to the next backend.
    problem = problem_of(call)
    if SPEC.reasons("triton", problem):
        pytest.skip("the recovery half needs the Triton backend (interpreter) as a first choice")
    runs = []

    def broken(call, config):
        runs.append(1)
        raise BackendUnavailable("planted failure")

    monkeypatch.setitem(SPEC.priority, "cpu", ("triton", "reference"))
    monkeypatch.setattr(SPEC, "backends", tuple(
        dataclasses.replace(b, run=broken) if b.name == "triton" else b for b in SPEC.backends))
    SPEC.clear_cache()
    try:
        assert SPEC.launch_keyed(("k",), make, call) == "reference"
        assert len(runs) == 1 and "planted failure" in SPEC._broken["triton"]
        assert SPEC.launch_keyed(("k",), make, call) == "reference" and len(runs) == 1
        with pytest.raises(BackendUnavailable, match="planted failure"):
            SPEC.clear_cache()
            SPEC.launch_keyed(("k",), make, call, backend="triton")
    finally:
        SPEC.clear_cache()


BAD_ROPE = {
    "theta 0": (dict(rope_theta=0.0), ValueError, "rope_theta must be a finite number > 0"),
    "theta negative": (dict(rope_theta=-5.0), ValueError, "rope_theta"),
    "theta nan": (dict(rope_theta=float("nan")), ValueError, "rope_theta"),
    "theta string": (dict(rope_theta="1e4"), ValueError, "rope_theta"),
    "scaling string": (dict(rope_scaling="linear"), TypeError, "rope_scaling must be a dict"),
    "linear without factor": (dict(rope_scaling={"rope_type": "linear"}), ValueError,
                              "needs 'factor'"),
    "llama3 missing keys": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                            ValueError, "needs 'low_freq_factor'"),
    "factor nan": (dict(rope_scaling={"type": "linear", "factor": float("nan")}), ValueError,
                   "finite number > 0"),
    "llama3 band reversed": (dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192}), ValueError, "low_freq_factor <"),
    "unknown type": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ValueError,
                     "not supported"),
}


@pytest.mark.parametrize("name", list(BAD_ROPE))
def test_bad_rope_arguments_are_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD_ROPE[name]
    call = make_call({"tokens": 3, "hidden": 32, **HEADS}, torch.float32, torch.device("cpu"))
    launched = []
    monkeypatch.setattr(SPEC, "launch", lambda *a, **kw: launched.append(a))
    monkeypatch.setattr(SPEC, "launch_keyed", lambda *a, **kw: launched.append(a))
    with pytest.raises(error, match=text) as info:
        rmsnorm_qkv_rope(call.x, call.norm_weight, call.qkv_weight, call.positions, **HEADS,
                         **override)
    assert "rmsnorm_qkv_rope" in str(info.value)
    assert not launched
