"""rmsnorm_qkv_rope's backward: the gradient of every input, on every backend that runs here,
against float64 autograd through the reference (exact math) and against autograd through the
reference at the call's dtype; strided and 3-D inputs, torch.compile, gradcheck, the eager fast
path against the custom op, and the nn module in training.

Backends come from the op's declarations: a backend that cannot run a case is skipped with the
reasons it declares (``SPEC.reasons``), never by name. Whatever backend runs the forward, the
backward is the same PyTorch code; what differs per backend is the forward's saved new residual
and the wiring around it.
"""

from __future__ import annotations

import contextlib
import importlib
import zlib

import pytest
import torch

from kpt.nn import RMSNormQKVRoPE
from kpt.ops import rmsnorm_qkv_rope
from kpt.ops._common import compare
from kpt.ops.rmsnorm_qkv_rope import BACKENDS, SPEC, rope_inv_freq
from kpt.ops.rmsnorm_qkv_rope import reference as ref
from tests.conftest import devices
from tests.ops.op_log import OpLog
from tests.ops.test_rmsnorm_qkv_rope import make_inputs, problem_for

OP_MODULE = importlib.import_module("kpt.ops.rmsnorm_qkv_rope")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIFFERENTIABLE = ("x", "residual", "norm_weight", "qkv_weight", "qkv_bias", "q_norm_weight",
                  "k_norm_weight")

# Small odd cases (the Triton interpreter is slow); hidden sizes are not powers of two. An even
# T makes make_inputs build a 3-D x of (2, T, hidden).
CASES = {
    "one_token_mqa": dict(T=1, hidden=48, nq=2, nkv=1, D=16),
    "t3_gqa_bias": dict(T=3, hidden=40, nq=4, nkv=2, D=8, bias=True),
    "t17_qwen3": dict(T=17, hidden=72, nq=4, nkv=2, D=16, residual=True, bias=True,
                      qk_norm=True),
    "gptj_partial_qk_norm": dict(T=3, hidden=56, nq=2, nkv=2, D=24, rd=8, neox=False,
                                 qk_norm=True, residual=True),
    "neox_partial_3d": dict(T=6, hidden=56, nq=3, nkv=1, D=24, rd=16, residual=True),
    "all_llama3": dict(T=5, hidden=96, nq=6, nkv=2, D=16, residual=True, bias=True,
                       qk_norm=True, scaling="llama3"),
}

# Against float64 truth. On its longest path the backward rounds to the dtype three times (the
# projection's gradient before the GEMMs, the GEMM output d xn, the final gradient), with float32
# math in between; each rounding is at most u/2 per element, and norm-wise the errors measure up
# to 1.25 u over these cases on the CPU. Tolerance 3u (bf16 3 * 2^-8, fp16 3 * 2^-11) leaves
# room for cuBLAS, whose split-K GEMMs may reduce partial sums in the 16-bit type (torch's
# reduced-precision-reduction default). fp32 lands within 3e-7 of the truth (float32 sums of up
# to a hundred terms); 1e-5 leaves room for other summation orders and still catches a term.
TRUTH_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3 * 2**-8, torch.float16: 3 * 2**-11}
# Against autograd through the reference at the call's dtype, whose backward rounds every
# intermediate to the dtype and lands up to 1.7 u from the truth (measured): the two may differ
# by the sum of both errors; measured up to 1.7 u, tolerance 4u.
SAME_DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4 * 2**-8,
                        torch.float16: 4 * 2**-11}


def case_seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 1000


def leaves(args: dict) -> dict:
    """The differentiable inputs of ``args`` made leaves that require grad."""
    for name in DIFFERENTIABLE:
        if name in args:
            args[name] = args[name].detach().requires_grad_()
    return args


def upstream(outs, seed: int) -> list[torch.Tensor]:
    """Random gradients for the outputs (never zeros), in their dtype."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]


def op_grads(args: dict, outs, grads: list[torch.Tensor]) -> dict:
    """Gradients of every differentiable input from the op's outputs ``outs``."""
    names = [n for n in DIFFERENTIABLE if n in args]
    return dict(zip(names, torch.autograd.grad(outs, [args[n] for n in names], grads)))


def reference_grads(args: dict, grads: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """Gradients by autograd through ``rmsnorm_qkv_rope_reference`` with the inputs and the
    outputs' gradients converted to ``dtype`` (float64: exact math, the truth)."""
    a = {n: args[n].detach().to(dtype).requires_grad_() for n in DIFFERENTIABLE if n in args}
    x = a["x"]
    lead, hidden = x.shape[:-1], x.shape[-1]
    inv_freq = rope_inv_freq(args["rotary_dim"], args["rope_theta"], args["rope_scaling"],
                             x.device)
    outs = ref.rmsnorm_qkv_rope_reference(
        x.reshape(-1, hidden), a["residual"].reshape(-1, hidden) if "residual" in a else None,
        a["norm_weight"], a["qkv_weight"], a.get("qkv_bias"), a.get("q_norm_weight"),
        a.get("k_norm_weight"), args["positions"].expand(lead).reshape(-1), inv_freq,
        args["num_q_heads"], args["num_kv_heads"], args["head_dim"], args["rotary_dim"],
        args["eps"], args["rope_style"] == "neox")
    outs = [o for o in outs if o is not None]
    values = torch.autograd.grad(outs, list(a.values()),
                                 [g.reshape(o.shape).to(dtype) for o, g in zip(outs, grads)])
    return dict(zip(a, values))


def mismatches(label: str, got: dict, expected: dict, tol: float) -> list[str]:
    assert got.keys() == expected.keys()
    reasons = [compare(f"{label}.d{n}", got[n], expected[n], tol) for n in got]
    reasons += [f"{label}.d{n}: dtype {got[n].dtype}" for n in got
                if got[n].dtype != expected[n].dtype and expected[n].dtype != torch.float64]
    return [r for r in reasons if r]


def skip_unless_runs(backend: str, args: dict) -> None:
    x = args["x"]
    reasons = SPEC.reasons(backend, problem_for(args, x.dtype, x.device.type))
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


# ---- every input's gradient, every backend, against the reference's autograd ----------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_gradients_match_float64_and_reference(backend, name, dtype, device):
    args = leaves(make_inputs(CASES[name], dtype, device, seed=case_seed(name)))
    skip_unless_runs(backend, args)
    outs = rmsnorm_qkv_rope(**args, backend=backend)
    grads = upstream(outs, case_seed(name) + 1)  # the new residual gets a gradient too
    got = op_grads(args, outs, grads)
    reasons = mismatches("truth", got, reference_grads(args, grads, torch.float64),
                         TRUTH_TOLERANCE[dtype])
    reasons += mismatches("same_dtype", got, reference_grads(args, grads, dtype),
                          SAME_DTYPE_TOLERANCE[dtype])
    assert not reasons, reasons


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["nan_padded_rows", "transposed"])
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_non_contiguous_activations(backend, layout, device):
    """x and residual as views: rows inside NaN-padded buffers (read in place; the padding must
    be neither read nor given a gradient), or transposed (copied to rows, differentiably)."""
    dtype = torch.bfloat16
    args = make_inputs(CASES["t17_qwen3"], dtype, device, seed=7)
    T, hidden = args["x"].shape
    bufs = {}
    for n in ("x", "residual"):
        if layout == "nan_padded_rows":
            buf = torch.full((T, hidden + 24), float("nan"), dtype=dtype, device=device)
            buf[:, :hidden] = args[n]
            bufs[n] = buf.requires_grad_()
            args[n] = bufs[n][:, :hidden]
        else:
            bufs[n] = args[n].t().contiguous().requires_grad_()
            args[n] = bufs[n].t()
    skip_unless_runs(backend, args)
    outs = rmsnorm_qkv_rope(**args, backend=backend)
    grads = upstream(outs, 8)
    torch.autograd.backward(outs, grads)
    truth = reference_grads(args, grads, torch.float64)
    for n in ("x", "residual"):
        grad = bufs[n].grad
        if layout == "nan_padded_rows":
            assert torch.equal(grad[:, hidden:], torch.zeros_like(grad[:, hidden:]))
            grad = grad[:, :hidden]
        else:
            grad = grad.t()
        reason = compare(f"{layout}.d{n}", grad, truth[n], TRUTH_TOLERANCE[dtype])
        assert reason is None, reason


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_batched_x_with_broadcast_positions(backend):
    """3-D x (batch, seq, hidden) with HF's (1, seq) position_ids."""
    args = make_inputs(CASES["gptj_partial_qk_norm"], torch.float32, "cpu", seed=9)
    g = torch.Generator().manual_seed(9)
    args["x"] = torch.randn(2, 5, args["x"].shape[-1], generator=g)
    args["residual"] = torch.randn(2, 5, args["x"].shape[-1], generator=g)
    args["positions"] = torch.arange(100, 105)[None]
    leaves(args)
    skip_unless_runs(backend, args)
    outs = rmsnorm_qkv_rope(**args, backend=backend)
    assert outs[0].shape[:2] == (2, 5) and outs[3].shape == args["x"].shape
    grads = upstream(outs, 10)
    got = op_grads(args, outs, grads)
    reasons = mismatches("truth", got, reference_grads(args, grads, torch.float64),
                         TRUTH_TOLERANCE[torch.float32])
    assert not reasons, reasons


def test_gradient_only_through_some_outputs():
    """Outputs that take no part in the loss (here k, v and the new residual) give no
    gradient: autograd hands the backward zeros for them."""
    args = leaves(make_inputs(CASES["all_llama3"], torch.float32, "cpu", seed=12))
    outs = rmsnorm_qkv_rope(**args)
    dq = upstream(outs[:1], 13)[0]
    got = op_grads(args, (outs[0] * dq).sum(), None)
    grads = [dq] + [torch.zeros_like(o) for o in outs[1:]]
    reasons = mismatches("q_only", got, reference_grads(args, grads, torch.float64),
                         TRUTH_TOLERANCE[torch.float32])
    assert not reasons, reasons
    assert torch.equal(got["k_norm_weight"], torch.zeros_like(got["k_norm_weight"]))


# ---- the wiring: autograd on both paths, compile, gradcheck ---------------------------------


@pytest.mark.parametrize("path", ["eager", "op"])
def test_leaf_gradients_accumulate_independently(path):
    """x and residual get the same gradient, but not one shared tensor: a second backward must
    add to each .grad once. Under a dispatch mode the call takes the custom op's autograd."""
    args = leaves(make_inputs(CASES["t17_qwen3"], torch.float32, "cpu", seed=11))

    def backward_once():
        with OpLog() if path == "op" else contextlib.nullcontext():
            outs = rmsnorm_qkv_rope(**args)
        torch.autograd.backward(outs, upstream(outs, 12))

    backward_once()
    first = {n: args[n].grad.clone() for n in DIFFERENTIABLE}
    backward_once()
    for n in DIFFERENTIABLE:
        torch.testing.assert_close(args[n].grad, 2 * first[n], msg=n)


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_outputs_carry_autograd_only_when_needed(backend, monkeypatch):
    args = make_inputs(CASES["t17_qwen3"], torch.bfloat16, "cpu", seed=14)
    skip_unless_runs(backend, args)
    args["qkv_weight"].requires_grad_()  # one input is enough
    outs = rmsnorm_qkv_rope(**args, backend=backend)
    assert len(outs) == 4
    for out in outs[:3]:
        assert out.requires_grad and out.grad_fn is not None
    # With no gradient to track the call runs without the autograd.Function, as inference did
    # before the op had a backward.
    monkeypatch.setattr(OP_MODULE._RMSNormQKVRoPEFunction, "apply", None)
    with torch.no_grad():
        outs = rmsnorm_qkv_rope(**args, backend=backend)
    args["qkv_weight"].requires_grad_(False)
    outs += rmsnorm_qkv_rope(**args, backend=backend)
    for out in outs:
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("layout", ["adjacent", "separate"])
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_weight_and_bias_as_row_blocks(backend, path, layout, monkeypatch):
    """q/k/v weights and biases passed as blocks (as the HF integration passes them): the same
    outputs as the stacked tensors, each block gets its slice of the gradient, and blocks that
    are adjacent views of one storage reach the kernel without a copy."""
    args = make_inputs(CASES["t3_gqa_bias"], torch.bfloat16, "cpu", seed=15)
    skip_unless_runs(backend, args)
    nq, nkv, d = args["num_q_heads"], args["num_kv_heads"], args["head_dim"]
    rows = [nq * d, nkv * d, nkv * d]
    blocks = {}
    for name in ("qkv_weight", "qkv_bias"):
        whole = args[name].clone()
        if layout == "adjacent":  # views of one buffer, as patch() leaves a layer's weights
            blocks[name] = [b.detach().requires_grad_() for b in whole.split(rows)]
            storage = whole
        else:
            blocks[name] = [b.clone().requires_grad_() for b in whole.split(rows)]
        if layout == "adjacent":
            for b, view in zip(blocks[name], storage.split(rows)):
                b.data = view
    seen = []
    launch = SPEC.launch_keyed
    monkeypatch.setattr(SPEC, "launch_keyed", lambda key, make, call, *rest: seen.append(
        call.qkv_weight.data_ptr()) or launch(key, make, call, *rest))

    def run(**kw):
        return rmsnorm_qkv_rope(**kw, backend=backend)

    fn = torch.compile(run, fullgraph=True, backend="aot_eager") if path == "compiled" else run
    q, k, v = fn(**{**args, "qkv_weight": blocks["qkv_weight"], "qkv_bias": blocks["qkv_bias"]})
    kernel_weight = seen[0]
    want = rmsnorm_qkv_rope(**args, backend=backend)
    for got, exp in zip((q, k, v), want):
        assert torch.equal(got, exp)
    first = blocks["qkv_weight"][0].data_ptr()
    assert (kernel_weight == first) == (layout == "adjacent")
    grads = upstream((q, k, v), 16)
    torch.autograd.backward((q, k, v), grads)
    expected = reference_grads(args, grads, torch.float64)
    for name in ("qkv_weight", "qkv_bias"):
        got = torch.cat([b.grad for b in blocks[name]])
        reason = compare(f"blocks.d{name}", got, expected[name], TRUTH_TOLERANCE[torch.bfloat16])
        assert reason is None, reason


def test_torch_compile_fullgraph_forward_and_backward():
    args = leaves(make_inputs(CASES["all_llama3"], torch.float32, "cpu", seed=17))
    names = [n for n in DIFFERENTIABLE if n in args]

    def step(**kw):
        q, k, v, res = rmsnorm_qkv_rope(**kw)
        return q.square().sum() + (k * 1.5).sum() + v.pow(3).sum() + res.sin().sum()

    eager_loss = step(**args)
    eager = torch.autograd.grad(eager_loss, [args[n] for n in names])
    compiled_loss = torch.compile(step, fullgraph=True, backend="aot_eager")(**args)
    compiled = torch.autograd.grad(compiled_loss, [args[n] for n in names])
    torch.testing.assert_close(compiled_loss, eager_loss)
    for n, a, b in zip(names, compiled, eager):
        torch.testing.assert_close(a, b, msg=n)


def test_eager_fast_path_matches_the_custom_op(monkeypatch):
    """Plain eager calls go through the autograd.Function, calls a dispatch mode can see go
    through the custom op and its registered autograd: the same gradients, bit for bit."""
    function, apply = OP_MODULE._RMSNormQKVRoPEFunction, OP_MODULE._RMSNormQKVRoPEFunction.apply
    applied = []
    monkeypatch.setattr(function, "apply", lambda *a: applied.append(1) or apply(*a))
    args = leaves(make_inputs(CASES["t17_qwen3"], torch.bfloat16, "cpu", seed=18))
    outs = rmsnorm_qkv_rope(**args)
    assert applied
    grads = upstream(outs, 19)
    fast = op_grads(args, outs, grads)
    with OpLog() as log:
        logged = op_grads(args, rmsnorm_qkv_rope(**args), grads)
    assert "kpt.rmsnorm_qkv_rope.default" in log.ops and len(applied) == 1
    for n in fast:
        assert torch.equal(fast[n], logged[n]), n


def _float64_call(case: dict, seed: int):
    """A tiny float64 call of the op's eager autograd.Function and of its custom op, with the
    inputs to differentiate; float64 is no backend's declared dtype, so the caller makes
    ``SPEC.launch`` run the reference backend directly."""
    args = make_inputs(case, torch.float64, "cpu", seed=seed)
    names = [n for n in DIFFERENTIABLE if n in args]
    inputs = tuple(args[n].requires_grad_() for n in names)
    inv_freq = rope_inv_freq(args["rotary_dim"], args["rope_theta"], None, torch.device("cpu"))
    rest = (args["positions"].reshape(-1), inv_freq, args["num_q_heads"], args["num_kv_heads"],
            args["head_dim"], args["rotary_dim"], args["eps"], args["rope_style"] == "neox",
            "reference")

    def bind(op, blocks: bool):
        def call(*tensors):
            given = dict(zip(names, tensors))
            if blocks:  # the custom op takes the weight and bias as lists of row blocks
                given["qkv_weight"] = [given["qkv_weight"]]
                given["qkv_bias"] = [] if given.get("qkv_bias") is None else [given["qkv_bias"]]
            return op(*(given.get(n) for n in DIFFERENTIABLE), *rest)
        return call

    function = OP_MODULE._RMSNormQKVRoPEFunction
    return bind(function.apply, False), bind(torch.ops.kpt.rmsnorm_qkv_rope, True), inputs


# Tiny: slow-mode gradcheck runs the forward twice per input element.
GRADCHECK_CASES = {
    "gptj_partial_everything": dict(T=3, hidden=6, nq=2, nkv=1, D=4, rd=2, neox=False,
                                    residual=True, bias=True, qk_norm=True),
    "neox_gqa": dict(T=3, hidden=6, nq=2, nkv=1, D=4),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64_reference(name, monkeypatch):
    reference = SPEC.backend("reference")
    monkeypatch.setattr(SPEC, "launch_keyed",
                        lambda key, make, call, *rest: reference.run(call, {}))
    eager, op, inputs = _float64_call(GRADCHECK_CASES[name], seed=20)
    assert torch.autograd.gradcheck(eager, inputs)
    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_float64_reference(path, monkeypatch):
    """The backward is differentiable PyTorch, so eager double backward is exact as well."""
    reference = SPEC.backend("reference")
    monkeypatch.setattr(SPEC, "launch_keyed",
                        lambda key, make, call, *rest: reference.run(call, {}))
    eager, op, inputs = _float64_call(GRADCHECK_CASES["gptj_partial_everything"], seed=21)
    assert torch.autograd.gradgradcheck(eager if path == "eager" else op, inputs, fast_mode=True)


# ---- the nn module trains through the op ---------------------------------------------------


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_module_trains_through_the_op(backend):
    dtype = torch.bfloat16
    module = RMSNormQKVRoPE(40, 4, 2, 8, bias=True, qk_norm=True, rotary_dim=4,
                            rope_style="gptj", backend=backend, dtype=dtype)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():  # away from the ones/zeros init, so every gradient term is exercised
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(dtype))
    x = torch.randn(2, 7, 40, generator=g).to(dtype).requires_grad_()
    residual = torch.randn(2, 7, 40, generator=g).to(dtype).requires_grad_()
    positions = torch.arange(7)[None]
    args = dict(x=x, residual=residual, positions=positions, norm_weight=module.norm_weight,
                qkv_weight=module.qkv_weight, qkv_bias=module.qkv_bias,
                q_norm_weight=module.q_norm_weight, k_norm_weight=module.k_norm_weight,
                num_q_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4, rope_style="gptj",
                rope_theta=module.rope_theta, rope_scaling=None, eps=module.eps)
    skip_unless_runs(backend, args)
    outs = module(x, positions, residual)
    assert all(o.grad_fn is not None for o in outs)
    grads = upstream(outs, 23)
    torch.autograd.backward(outs, grads)
    expected = reference_grads(args, grads, dtype)
    got = {"x": x.grad, "residual": residual.grad}
    got.update({n: p.grad for n, p in module.named_parameters()})
    reasons = mismatches("module", got, expected, SAME_DTYPE_TOLERANCE[dtype])
    assert not reasons, reasons
