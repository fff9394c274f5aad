"""rmsnorm_qkv_rope: reference vs float64, every backend vs the reference, API behaviour.

Backends are taken from the op's own declarations: a backend that cannot run a case is skipped
with the reasons it declares (``SPEC.reasons``), never by name.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kpt.ops import rmsnorm_qkv_rope
from kpt.ops._common import compare
from kpt.ops.rmsnorm_qkv_rope import BACKENDS, SPEC, TOLERANCE, problem_of, rope_inv_freq
from tests.conftest import devices

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Small odd cases for every machine (the Triton interpreter is slow), each a feature alone or
# combined. T: tokens; D: head dim; rd: rotary dim.
CASES = {
    "plain": dict(T=3, hidden=64, nq=4, nkv=2, D=16),
    "one_token": dict(T=1, hidden=48, nq=2, nkv=1, D=16),
    "odd_T_mqa": dict(T=17, hidden=40, nq=3, nkv=1, D=8),
    "residual_bias": dict(T=5, hidden=64, nq=4, nkv=2, D=16, residual=True, bias=True),
    "qk_norm": dict(T=6, hidden=64, nq=4, nkv=2, D=16, qk_norm=True, residual=True),
    "gptj_partial": dict(T=7, hidden=64, nq=2, nkv=2, D=24, rd=8, neox=False),
    "partial_neox": dict(T=4, hidden=64, nq=2, nkv=1, D=24, rd=16, qk_norm=True),
    "all_llama3": dict(T=9, hidden=96, nq=6, nkv=2, D=16, residual=True, bias=True,
                       qk_norm=True, scaling="llama3"),
}
# Sizes at the kernels' regime boundaries, on a GPU only.
GPU_CASES = {
    "llama8b_T1": dict(T=1, hidden=4096, nq=32, nkv=8, D=128, residual=True),
    "llama8b_T16": dict(T=16, hidden=4096, nq=32, nkv=8, D=128, residual=True),
    "llama8b_T17": dict(T=17, hidden=4096, nq=32, nkv=8, D=128),
    "llama8b_T300": dict(T=300, hidden=4096, nq=32, nkv=8, D=128, residual=True),
    "qwen3_T33": dict(T=33, hidden=2048, nq=16, nkv=8, D=128, qk_norm=True, residual=True),
    "d96_gptj_T5": dict(T=5, hidden=1536, nq=16, nkv=4, D=96, neox=False, bias=True),
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def make_inputs(case: dict, dtype: torch.dtype, device: str, seed: int, *,
                strided: bool = False) -> dict:
    """Fresh random inputs for a case (never zeros). ``strided``: x and residual are views into
    wider buffers whose padding is NaN, so any read past a row's end shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    T, hidden, nq, nkv, D = (case[k] for k in ("T", "hidden", "nq", "nkv", "D"))
    n_out = (nq + 2 * nkv) * D

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    def activations():
        if not strided:
            return rand(2, T, hidden) if T % 2 == 0 else rand(T, hidden)
        wide = torch.full((T, hidden + 24), float("nan"), dtype=dtype, device=device)
        wide[:, :hidden] = rand(T, hidden)
        return wide[:, :hidden]

    x = activations()
    lead = x.shape[:-1]
    args = dict(
        x=x,
        norm_weight=rand(hidden, scale=0.2, shift=1.0),
        qkv_weight=rand(n_out, hidden, scale=hidden**-0.5),
        positions=torch.randint(0, 5000, lead, generator=g).to(device),
        num_q_heads=nq,
        num_kv_heads=nkv,
        head_dim=D,
        rotary_dim=case.get("rd", D),
        rope_style="neox" if case.get("neox", True) else "gptj",
        rope_theta=10000.0 if case.get("scaling") is None else 500000.0,
        rope_scaling=LLAMA3_SCALING if case.get("scaling") == "llama3" else None,
        eps=1e-6,
    )
    if case.get("residual"):
        args["residual"] = activations()
    if case.get("bias"):
        args["qkv_bias"] = rand(n_out, scale=0.5)
    if case.get("qk_norm"):
        args["q_norm_weight"] = rand(D, scale=0.2, shift=1.0)
        args["k_norm_weight"] = rand(D, scale=0.2, shift=1.0)
    return args


def float64_truth(args: dict) -> tuple[torch.Tensor, ...]:
    """The op in float64 with no intermediate rounding at all."""
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in args.items()}
    lead, hidden = d["x"].shape[:-1], d["x"].shape[-1]
    x = d["x"].reshape(-1, hidden)
    h = x + d["residual"].reshape(-1, hidden) if "residual" in d else x

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + d["eps"]) * w

    qkv = norm(h, d["norm_weight"]) @ d["qkv_weight"].t()
    if "qkv_bias" in d:
        qkv = qkv + d["qkv_bias"]
    nq, nkv, D, rd = d["num_q_heads"], d["num_kv_heads"], d["head_dim"], d["rotary_dim"]
    T = x.shape[0]
    q = qkv[:, : nq * D].reshape(T, nq, D)
    k = qkv[:, nq * D : (nq + nkv) * D].reshape(T, nkv, D)
    v = qkv[:, (nq + nkv) * D :].reshape(T, nkv, D)
    if "q_norm_weight" in d:
        q, k = norm(q, d["q_norm_weight"]), norm(k, d["k_norm_weight"])
    inv_freq = rope_inv_freq(rd, d["rope_theta"], d["rope_scaling"], torch.device("cpu"))
    pos = d["positions"].expand(lead).reshape(-1).cpu().double()
    ang = (pos[:, None] * inv_freq.double()[None, :]).to(q.device)
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(t):
        rot, rest = t[..., :rd], t[..., rd:]
        if d["rope_style"] == "neox":
            a, b = rot[..., : rd // 2], rot[..., rd // 2 :]
            out = torch.cat([a * c - b * s, b * c + a * s], -1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)
        return torch.cat([out, rest], -1)

    outs = [rope(q).reshape(*lead, nq, D), rope(k).reshape(*lead, nkv, D),
            v.reshape(*lead, nkv, D)]
    if "residual" in d:
        outs.append(h.reshape(*lead, hidden))
    return tuple(outs)


def problem_for(args: dict, dtype: torch.dtype, device: str):
    """The dispatch Problem of a call with these arguments (to ask a backend for reasons)."""
    x = args["x"]
    hidden = x.shape[-1]
    from kpt.ops.rmsnorm_qkv_rope import Call

    empty = x.new_empty(0)
    call = Call(x.reshape(-1, hidden), args.get("residual"), args["norm_weight"],
                args["qkv_weight"], args.get("qkv_bias"), args.get("q_norm_weight"),
                args.get("k_norm_weight"), args["positions"], empty, args["num_q_heads"],
                args["num_kv_heads"], args["head_dim"], args["rotary_dim"], args["eps"],
                args["rope_style"] == "neox", empty, empty, empty, None)
    return problem_of(call)


def _skip_unless_runs(backend: str, args: dict, dtype: torch.dtype, device: str) -> None:
    reasons = SPEC.reasons(backend, problem_for(args, dtype, device))
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


# ---- the reference is the specification: check it against exact math ----------------------

# Each output passes through up to six roundings to the dtype (norm, weight multiply, GEMM
# output, q/k norm, two RoPE products and their sum); their errors add in quadrature to a
# few units in the last place: 4u for bf16 (u = 2^-8) and fp16 (u = 2^-11). In fp32 the RoPE
# angle pos*inv_freq is formed in float32 (as HF does): at position 5000 it is off by up to
# 5000 * 2^-24 = 3e-4 rad, a few 1e-5 relative on the rotated features.
REFERENCE_TOLERANCE = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11,
                       torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64(name, dtype):
    args = make_inputs(CASES[name], dtype, "cpu", seed=zlib.crc32(name.encode()) % 1000)
    outs = rmsnorm_qkv_rope(**args, backend="reference")
    for label, out, exact in zip("qkvr", outs, float64_truth(args)):
        assert out.dtype == dtype
        reason = compare(f"{name}.{label}", out, exact, REFERENCE_TOLERANCE[dtype])
        assert reason is None, reason


# ---- every backend against the reference --------------------------------------------------


def _check_backend(backend, case, dtype, device, seed, strided=False):
    args = make_inputs(case, dtype, device, seed, strided=strided)
    _skip_unless_runs(backend, args, dtype, device)
    expected = rmsnorm_qkv_rope(**args, backend="reference")
    got = rmsnorm_qkv_rope(**args, backend=backend)
    assert len(got) == len(expected)
    for label, out, ref in zip("qkvr", got, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        reason = compare(f"{backend}.{label}", out, ref, TOLERANCE[dtype])
        assert reason is None, reason


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS if b.name != "reference"])
def test_backend_matches_reference(backend, name, dtype, device):
    _check_backend(backend, CASES[name], dtype, device, seed=17 + len(name))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["residual_bias", "qk_norm"])
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS if b.name != "reference"])
def test_backend_non_contiguous_nan_padding(backend, name, device):
    _check_backend(backend, CASES[name], torch.bfloat16, device, seed=5, strided=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized cases need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS if b.name != "reference"])
def test_backend_gpu_sizes(backend, name, dtype):
    _check_backend(backend, GPU_CASES[name], dtype, "cuda", seed=3)


# Token counts on both sides of the backends' regime switches (decode tile, GEMV limit, the
# large-T configs); every config the tuner may pick must be right, and right twice over.
CONFIG_SWEEP_TOKENS = [3, 40, 513]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("tokens", CONFIG_SWEEP_TOKENS)
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS if b.name != "reference"])
def test_every_config_matches_reference_and_repeats_bit_for_bit(backend, tokens, device):
    from kpt.ops.rmsnorm_qkv_rope import make_call, shapes_from_hf_config

    config = {"model_type": "qwen3" if tokens == 40 else "llama", "hidden_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "attention_bias": tokens == 3}
    shape = shapes_from_hf_config(config, [tokens])[0]
    call = make_call(shape, torch.bfloat16, torch.device(device), seed=tokens)
    problem = problem_of(call)
    reasons = SPEC.reasons(backend, problem)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    chosen = SPEC.backend(backend)
    expected = SPEC.tuning.clone_outputs(call)
    SPEC.backend("reference").run(expected, {})
    # A result that moves between two runs is a race; the CPU interpreter runs programs one at
    # a time and cannot show one, so the second run happens on a GPU only.
    runs = 2 if device == "cuda" else 1
    for config_ in chosen.configs(problem):
        outs = [SPEC.tuning.clone_outputs(call) for _ in range(runs)]
        for out in outs:
            SPEC.tuning.poison(out)
            chosen.run(out, config_)
        reason = SPEC.tuning.check(outs[0], expected)
        assert reason is None, (config_, reason)
        for name in ("q", "k", "v"):
            assert all(torch.equal(getattr(o, name), getattr(outs[0], name)) for o in outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_cuda_graph_capture(backend):
    args = make_inputs(GPU_CASES["llama8b_T16"], torch.bfloat16, "cuda", seed=11)
    _skip_unless_runs(backend, args, torch.bfloat16, "cuda")
    expected = rmsnorm_qkv_rope(**args, backend=backend)  # warm-up: builds, caches
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rmsnorm_qkv_rope(**args, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rmsnorm_qkv_rope(**args, backend=backend)
    args["x"].copy_(torch.randn_like(args["x"]))
    graph.replay()
    fresh = rmsnorm_qkv_rope(**args, backend="reference")
    for label, out, ref in zip("qkvr", captured, fresh):
        reason = compare(f"graph.{label}", out, ref, TOLERANCE[torch.bfloat16])
        assert reason is None, reason
    assert not torch.equal(captured[0], expected[0])


# ---- API behaviour -------------------------------------------------------------------------


def test_auto_dispatch_and_shapes():
    args = make_inputs(CASES["qk_norm"], torch.bfloat16, "cpu", seed=1)
    q, k, v, res = rmsnorm_qkv_rope(**args)
    lead = args["x"].shape[:-1]
    assert q.shape == (*lead, 4, 16) and k.shape == (*lead, 2, 16) and v.shape == k.shape
    assert res.shape == args["x"].shape
    assert len(rmsnorm_qkv_rope(**{k: v for k, v in args.items() if k != "residual"})) == 3


def test_torch_compile_fullgraph():
    args = make_inputs(CASES["residual_bias"], torch.float32, "cpu", seed=2)
    x = args.pop("x")

    def step(x):
        q, k, v, res = rmsnorm_qkv_rope(x, **args)
        return q.sum(-1) + k.sum(-1).repeat_interleave(2, -1), res

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_positions_broadcast_like_hf():
    args = make_inputs(CASES["plain"], torch.float32, "cpu", seed=4)
    x = torch.randn(2, 6, 64)
    args["x"] = x
    args["positions"] = torch.arange(6)[None]  # HF's (1, S) position_ids
    q, _, _ = rmsnorm_qkv_rope(**args)
    args["positions"] = torch.arange(6).expand(2, 6)
    q_full, _, _ = rmsnorm_qkv_rope(**args)
    torch.testing.assert_close(q, q_full, rtol=0, atol=0)


def test_inv_freq_matches_hf_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                      rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                      max_position_embeddings=512)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(16, 500000.0, LLAMA3_SCALING, torch.device("cpu"))
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=0, atol=0)


BAD_CALLS = {
    "x int": (dict(x=torch.ones(3, 64, dtype=torch.int32)), TypeError, "x must be one of"),
    "x 1-D": (dict(x=torch.randn(64)), ValueError, "at least 2 dims"),
    "weight dtype": (dict(norm_weight=torch.randn(64, dtype=torch.float64)), TypeError,
                     "norm_weight"),
    "qkv shape": (dict(qkv_weight=torch.randn(10, 64)), ValueError, "qkv_weight must be"),
    "heads": (dict(num_q_heads=3), ValueError, "multiple of num_kv_heads"),
    "rotary": (dict(rotary_dim=18), ValueError, "rotary_dim"),
    "style": (dict(rope_style="llama"), ValueError, "rope_style"),
    "eps": (dict(eps=-1.0), ValueError, "eps"),
    "positions float": (dict(positions=torch.zeros(3)), TypeError, "positions"),
    "positions shape": (dict(positions=torch.arange(4)), ValueError, "broadcast"),
    "one qk norm": (dict(q_norm_weight=torch.randn(16)), ValueError, "both"),
    "scaling": (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ValueError, "yarn"),
    "backend": (dict(backend="magic"), ValueError, "unknown backend"),
    "residual shape": (dict(residual=torch.randn(3, 32)), ValueError, "residual shape"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD_CALLS[name]
    args = make_inputs(CASES["plain"] | {"T": 3}, torch.float32, "cpu", seed=0)
    args.update(override)
    launched = []
    monkeypatch.setattr(SPEC, "launch", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(SPEC, "launch_keyed", lambda *a, **k: launched.append(a))
    with pytest.raises(error, match=text) as info:
        rmsnorm_qkv_rope(**args)
    assert "rmsnorm_qkv_rope" in str(info.value)
    assert not launched


def test_explicit_backend_that_cannot_run_explains_why():
    args = make_inputs(CASES["plain"], torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run") as info:
        rmsnorm_qkv_rope(**args, backend="cuda")
    assert "device cpu" in str(info.value)
