"""fused_moe's Triton backward (kpt/ops/moe/_triton_backward.py) against the PyTorch recompute
(kpt/ops/moe/_backward.py), and both against float64 autograd of the reference's formula
(kpt/ops/moe/reference.py): bf16 and fp16 experts, every activation, T = 1, 3, 37 with odd
multiples of 16 for H and I, E = 4, 8, 16, top_k = 1, 2, 4, experts without tokens and one
expert holding every token, an expert_map with a quarter of the experts local, strided dout /
x / w13 / w2 / ids / weights, every listed config, each gradient alone, and NaN-poisoned
workspaces (the gradients themselves come from the same seam, so an unwritten element shows
as NaN); and every config compiled for sm_90a within Hopper's shared memory. On the CPU the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it), on small shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kpt.ops._common import compare, triton_interpreting
from kpt.ops.moe import _backward
from kpt.ops.moe import reference as ref

_tb = pytest.importorskip("kpt.ops.moe._triton_backward")
_fwd = pytest.importorskip("kpt.ops.moe._triton")

# The GPU when there is one (the Triton backward serves CUDA tensors), else the CPU under the
# interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(),
                                reason="runs the Triton kernels on CPU tensors: TRITON_INTERPRET=1")

BF16, FP16 = torch.bfloat16, torch.float16
NAMES = ("dx", "dw13", "dw2", "dweights")
# Triton backward against float64 autograd (which rounds nothing): the inputs are exact in
# both; the kernels' products accumulate in float32, and the GEMM operands dh, a, w * x and
# w * dout are rounded to x's dtype (half a unit each, 2^-9 bf16 / 2^-12 fp16, relative) before
# each gradient is rounded once more. Those roundings compound to about one unit norm-wise
# (measured up to 2^-8.3 bf16, 2^-11 fp16): two units bound it.
TOLERANCE = {BF16: 2**-7, FP16: 2**-10}
# The PyTorch recompute rounds more (its bf16/fp16 matmuls round gate/up, y, w * dout, the
# intermediate's gradient and dh to x's dtype): measured up to 2^-7.6 bf16, 2^-10.2 fp16
# against float64, about twice the kernels' error; and kernels against recompute add both.
RECOMPUTE_TOLERANCE = {BF16: 2**-6, FP16: 2**-9, torch.float32: 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poison_workspaces(monkeypatch) -> None:
    """Every scratch tensor (and gradient) starts as garbage: NaN floats, -7 ints."""
    real = _fwd._workspace

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(-7) if dtype in (torch.int32, torch.int64) else t.fill_(float("nan"))

    monkeypatch.setattr(_fwd, "_workspace", poisoned)


def _quarter_map(e: int, gen: torch.Generator) -> torch.Tensor:
    """An expert_map over e global experts with a quarter of them local (shuffled ids)."""
    local = max(1, e // 4)
    expert_map = torch.full((e,), -1, dtype=torch.int32)
    expert_map[torch.randperm(e, generator=gen)[:local]] = torch.randperm(
        local, generator=gen).int()
    return expert_map


def _problem(seed: int, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, *,
             ep: bool = False, same: bool = False) -> dict:
    """Random inputs on the CPU (gate/up and outputs of unit scale, positive weights); with
    ``ep`` the ids run over e global experts of which a quarter are local (w13/w2 hold those);
    with ``same`` every token picks the same k experts (those take every token, the rest
    none)."""
    gen = _gen(seed)
    expert_map = _quarter_map(e, gen) if ep else None
    local = e if expert_map is None else max(1, e // 4)
    if same:
        ids = torch.arange(k, dtype=torch.int32).repeat(t, 1) + (e - k) // 2
    else:
        ids = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :k].int()
    return dict(
        dout=torch.randn(t, h, generator=gen).to(dtype),
        x=torch.randn(t, h, generator=gen).to(dtype),
        w13=(torch.randn(local, 2 * i, h, generator=gen) / h**0.5).to(dtype),
        w2=(torch.randn(local, h, i, generator=gen) / i**0.5).to(dtype),
        weights=torch.rand(t, k, generator=gen) + 0.1, ids=ids, expert_map=expert_map)


def _oracle(p: dict, activation: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """float64 autograd of the reference's formula (no rounding anywhere), and the scale of
    each pair's dweights: |dout[t]| |y_pair| + |d| |a| with d = dout[t] @ w2[e] (0 for pairs
    without a local expert). dweights is one dot product (d . a = dout[t] . y_pair) that may
    cancel, so its error is bounded against that scale, not against its own value."""
    leaves = [p[n].double().requires_grad_(True) for n in ("x", "w13", "w2", "weights")]
    x, w13, w2, weights = leaves
    dout = p["dout"].double()
    i = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    scale = torch.zeros(weights.shape, dtype=torch.float64)
    local = ref.local_ids(p["ids"], p["expert_map"], w13.shape[0])
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = torch.where(local == e)
        hid = x[tok] @ w13[e].t()
        a = ref.activate(hid[:, :i], activation) * hid[:, i:]
        y = a @ w2[e].t()
        out = out.index_add(0, tok, y * weights[tok, slot, None])
        with torch.no_grad():
            d = dout[tok] @ w2[e]
            scale[tok, slot] = (dout[tok].norm(dim=1) * y.norm(dim=1)
                                + d.norm(dim=1) * a.norm(dim=1))
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)], scale


def _args(p: dict, device: str) -> tuple:
    return tuple(None if p[n] is None else p[n].to(device)
                 for n in ("dout", "x", "w13", "w2", "weights", "ids", "expert_map"))


def _triton(p: dict, activation: str, needs=(True,) * 4, config=None) -> list:
    grads = _tb.backward(*_args(p, DEVICE), activation, needs, config)
    return [None if g is None else g.cpu() for g in grads]


def _recompute(p: dict, activation: str) -> list:
    return list(_backward.backward(*_args(p, "cpu"), activation, (True,) * 4))


def _assert_close(got: list, want: list, tol: float, p: dict, dw_scale: torch.Tensor) -> None:
    for name, g, w, like in zip(NAMES, got, want, (p["x"], p["w13"], p["w2"], p["weights"])):
        assert g.dtype == like.dtype and g.shape == like.shape, (name, g.dtype, g.shape)
        assert not torch.isnan(g).any(), f"{name}: unwritten or NaN elements"
        if name == "dweights":
            err = (g.double() - w.double()).abs()
            worst = (err - tol * dw_scale).max().item() if err.numel() else 0.0
            assert worst <= 0, f"dweights: an error past {tol:.1e} * |dout| |y| + |d| |a|"
        else:
            reason = compare(name, g, w, tol)
            assert reason is None, reason


def _assert_exact_zeros(got: list, p: dict) -> None:
    """Experts without a pair get zero weight gradients; pairs without a local expert a zero
    dweights; tokens without one a zero dx row: exactly."""
    dx, dw13, dw2, dweights = got
    local = ref.local_ids(p["ids"], p["expert_map"], p["w13"].shape[0])
    idle = torch.ones(p["w13"].shape[0], dtype=torch.bool)
    idle[local[local >= 0]] = False
    assert not dw13[idle].any() and not dw2[idle].any(), "weight gradient of an idle expert"
    assert not dweights[local < 0].any(), "dweights of a pair without a local expert"
    assert not dx[(local < 0).all(dim=1)].any(), "dx of a token without a local expert"


def _check(p: dict, activation: str, dtype: torch.dtype, config=None) -> None:
    got = _triton(p, activation, config=config)
    _assert_exact_zeros(got, p)
    want, dw_scale = _oracle(p, activation)
    _assert_close(got, want, TOLERANCE[dtype], p, dw_scale)
    _assert_close(got, _recompute(p, activation), RECOMPUTE_TOLERANCE[dtype], p, dw_scale)


CASES = {
    # name: (T, H, I, E, top_k, dtype, activation, expert_map, same experts for all)
    "t1-top1": (1, 48, 80, 4, 1, BF16, "silu", False, False),
    "t3-top4-fp16": (3, 48, 80, 8, 4, FP16, "gelu", False, False),  # most experts idle
    "t37-e16-top4-ep": (37, 48, 80, 16, 4, BF16, "gelu_tanh", True, False),
    "t37-top1-ep-fp16": (37, 80, 48, 8, 1, FP16, "silu", True, False),  # dx rows left at 0
    "one-expert-all-tokens": (37, 48, 80, 8, 1, BF16, "gelu", False, True),
    "two-experts-all-tokens-fp16": (37, 80, 48, 16, 2, FP16, "silu", False, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_backward_matches_oracle_and_recompute(case, monkeypatch):
    t, h, i, e, k, dtype, activation, ep, same = CASES[case]
    _poison_workspaces(monkeypatch)
    _check(_problem(len(case), t, h, i, e, k, dtype, ep=ep, same=same), activation, dtype)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_every_activation(activation, dtype, monkeypatch):
    _poison_workspaces(monkeypatch)
    _check(_problem(7, 37, 48, 80, 8, 2, dtype), activation, dtype)


@pytest.mark.parametrize("index", range(len(_tb.configs(37, 2, 8))))
def test_every_config(index, monkeypatch):
    """Each listed config (the regimes' tiles, shrunk to the problem) on one problem."""
    _poison_workspaces(monkeypatch)
    config = _tb.configs(37, 2, 8)[index]
    _check(_problem(11, 37, 48, 80, 8, 2, BF16, ep=True), "silu", BF16, config)


def test_strided_inputs(monkeypatch):
    """dout and x with a strided last dim, w13 / w2 as transposed views, ids int64 and
    transposed, bf16 weights as a transposed view (their gradient comes back in bf16)."""
    p = _problem(13, 37, 48, 80, 8, 2, BF16)
    gen = _gen(14)
    for name in ("dout", "x"):
        wide = torch.randn(37, 96, generator=gen).to(BF16)
        p[name] = wide[:, ::2]
    for name in ("w13", "w2"):
        p[name] = p[name].transpose(1, 2).contiguous().transpose(1, 2)
    p["ids"] = p["ids"].long().t().contiguous().t()
    p["weights"] = p["weights"].to(BF16).t().contiguous().t()
    assert not any(p[n].is_contiguous() for n in ("dout", "x", "w13", "w2", "weights", "ids"))
    _poison_workspaces(monkeypatch)
    _check(p, "gelu", BF16)


def test_each_gradient_alone_is_the_full_run_bit_for_bit(monkeypatch):
    """needs=(one True) computes that gradient only (None elsewhere), bit-identical to the
    full run and to a second full run (deterministic: fixed-order sums, no atomics)."""
    _poison_workspaces(monkeypatch)
    p = _problem(17, 37, 48, 80, 8, 2, FP16, ep=True)
    full = _triton(p, "gelu_tanh")
    again = _triton(p, "gelu_tanh")
    for n in range(4):
        assert torch.equal(full[n], again[n]), NAMES[n]
        needs = tuple(j == n for j in range(4))
        alone = _triton(p, "gelu_tanh", needs)
        assert [j for j, g in enumerate(alone) if g is not None] == [n]
        assert torch.equal(alone[n], full[n]), NAMES[n]
    assert _triton(p, "gelu_tanh", (False,) * 4) == [None] * 4


def test_no_tokens():
    p = _problem(19, 0, 48, 80, 8, 2, BF16)
    dx, dw13, dw2, dweights = _triton(p, "silu")
    assert dx.shape == (0, 48) and dweights.shape == (0, 2)
    assert torch.equal(dw13, torch.zeros(8, 160, 48, dtype=BF16))
    assert torch.equal(dw2, torch.zeros(8, 48, 80, dtype=BF16))


def test_float32_experts_are_refused():
    p = _problem(23, 3, 48, 80, 4, 2, torch.float32)
    with pytest.raises(TypeError, match="bf16/fp16"):
        _triton(p, "silu")


def test_autograd_through_fused_moe_runs_the_triton_backward(monkeypatch):
    """fused_moe's autograd picks the kernels where they serve (forced here by the forward's
    backend="triton"; on an sm_80+ GPU by default), the recompute elsewhere, and both give
    the gradients the kernels give when called directly."""
    from kpt.ops import fused_moe
    from kpt.ops.moe import backward_impl

    _poison_workspaces(monkeypatch)
    p = _problem(31, 5, 48, 80, 8, 2, BF16)
    want = _triton(p, "gelu")
    called = []
    real = _tb.backward
    monkeypatch.setattr(_tb, "backward", lambda *a, **k: called.append(1) or real(*a, **k))
    leaves = {n: p[n].to(DEVICE).requires_grad_(True) for n in ("x", "w13", "w2", "weights")}
    out = fused_moe(leaves["x"], leaves["w13"], leaves["w2"], leaves["weights"],
                    p["ids"].to(DEVICE), activation="gelu", backend="triton")
    out.backward(p["dout"].to(DEVICE))
    assert called == [1]
    for n, name in enumerate(("x", "w13", "w2", "weights")):
        got = leaves[name].grad
        assert torch.equal(got.cpu(), want[n].to(got.dtype).cpu()), name
    if DEVICE == "cpu":
        assert backward_impl(p["x"]) == "recompute"  # unforced CPU tensors: the recompute
    assert backward_impl(p["x"].float(), "triton") == "recompute"  # float32: the recompute
    assert backward_impl(p["x"], "reference") == "recompute"  # a forced reference forward


@pytest.mark.parametrize("dtype", [BF16, FP16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_recompute_matches_oracle(dtype):
    """The PyTorch recompute, the kernels' second reference, against float64 autograd."""
    p = _problem(29, 37, 48, 80, 16, 4, dtype, ep=True)
    want, dw_scale = _oracle(p, "gelu")
    _assert_close(_recompute(p, "gelu"), want, RECOMPUTE_TOLERANCE[dtype], p, dw_scale)


HOPPER_SHARED = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90

# Every kernel of every config compiled for sm_90a (Triton's own ptxas, no GPU) at a DeepSeek-
# like size: T = 4096, H = 2048, I = 768, E = 64, top_k = 8, bf16. The arguments are specialised
# as a launch does (16-byte aligned pointers, ints divisible by 16 marked so, ints equal to 1 as
# constants): without that, loads are not vectorised, nothing is pipelined through cp.async and
# the shared memory reads 5-10x too low. Compiling needs a process without TRITON_INTERPRET,
# hence the subprocess (as in tests/ops/test_triton_shared_memory.py).
HOPPER_SCRIPT = textwrap.dedent('''
    import json
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from kpt.ops.moe import _triton as F, _triton_backward as B

    def shared(fn, args, const, warps, stages):
        names = fn.arg_names
        sig, attrs = dict.fromkeys(const, "constexpr"), {}
        for name, v in args.items():
            if v == 1:
                sig[name], const = "constexpr", const | {name: 1}
            else:
                sig[name] = v if isinstance(v, str) else "i32"
                if isinstance(v, str) or v % 16 == 0:
                    attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items()}, attrs)
        kernel = compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
        return kernel.metadata.shared

    t, h, i, e, k = 4096, 2048, 768, 64, 8
    tk = t * k
    bf, i32, f32 = "*bf16", "*i32", "*fp32"
    out = []
    for regime, entry in B._TILES.items():
        c = B._as_config(entry)
        p = F.capacity(tk, e, c["BLOCK_M"])
        tiles = dict(BLOCK_M=c["BLOCK_M"], GROUP_M=c["GROUP_M"], DTYPE=tl.bfloat16)
        args = dict(X=bf, DOUT=bf, W13=bf, W2=bf, SORTED=i32, BLOCK_EXPERT=i32, DH=bf, A_OUT=bf,
                    DW_PART=f32, tk=tk, top_k=k, N=i, K=h, P=p, stride_xm=h, stride_xk=1,
                    stride_gm=h, stride_gk=1, stride_ue=2 * i * h, stride_un=h, stride_uk=1,
                    stride_ve=h * i, stride_vk=i, stride_vn=1, stride_hm=2 * i, stride_hn=1,
                    stride_am=i, stride_an=1, stride_pm=i // c["BLOCK_N"], stride_pn=1)
        const = tiles | dict(ACT=2, WITH_D=True, STORE_DH=True, STORE_A=True, STORE_DW=True,
                             BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"])
        out.append([regime, "hidden", shared(B._hidden_bwd, args, const, c["num_warps"],
                                             c["num_stages"])])
        args = dict(A=bf, AS=bf, W=bf, WS=bf, WZ=bf, SORTED=i32, BLOCK_EXPERT=i32, WEIGHTS=f32,
                    DST=f32, tk=tk, top_k=k, N=h, K=2 * i, P=p, stride_am=2 * i, stride_ak=1,
                    stride_asm=0, stride_ask=0, stride_we=2 * i * h, stride_wn=1, stride_wk=h,
                    stride_se=0, stride_sn=0, stride_sk=0, stride_ze=0, stride_zn=0,
                    stride_zk=0, stride_wt=k, stride_wj=1, stride_dm=h, stride_dn=1)
        const = tiles | dict(QUANT=0, HAS_ZERO=False, GROUP_SIZE=1, DIRECT=False,
                             BLOCK_N=c["BLOCK_N2"], BLOCK_K=c["BLOCK_K2"])
        out.append([regime, "dx", shared(F._gemm2, args, const, c["num_warps2"],
                                         c["num_stages2"])])
        const = tiles | dict(ALIGN_M=c["BLOCK_M"], BLOCK_M=c["BLOCK_M3"], BLOCK_N=c["BLOCK_N3"],
                             BLOCK_K=c["BLOCK_K3"])
        for name, m, om, on in (("dw13", 2 * i, h, 1), ("dw2", i, 1, i)):
            args = dict(S=bf, G=bf, SORTED=i32, BOUNDS="*i64", WEIGHTS=f32, OUT=bf, tk=tk,
                        top_k=k, M=m, N=h, stride_sp=m, stride_sc=1, stride_gt=h, stride_gn=1,
                        stride_wt=k, stride_wj=1, stride_oe=2 * i * h, stride_om=om,
                        stride_on=on)
            out.append([regime, name, shared(B._wgrad, args, const, c["num_warps3"],
                                             c["num_stages3"])])
    print(json.dumps(out))
''')


def test_hopper_configs_fit_in_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HOPPER_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(sizes) == 4 * len(_tb._TILES)
    over = [row for row in sizes if row[2] > HOPPER_SHARED]
    assert not over, f"configs past {HOPPER_SHARED} bytes of shared memory: {over}"
