"""The Hopper (sm_90a, TMA + wgmma) forward and backward of flash_attention against the
reference.

GPU tests run only on a compute-capability 9.0 device; the CPU tests check the declared
reasons (``supports`` / ``call_reasons``), which must reject every unsupported call before a
launch. The dispatch-policy tests (the ``prefer`` hooks, their length threshold, the default
configs) are Python decisions: they run everywhere, on a real sm90 GPU as it is and elsewhere
with the device and the builds simulated (:func:`simulate_hopper`).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from kpt.ops.flash_attention import (
    SPEC,
    SPEC_BACKWARD,
    BackwardCall,
    Call,
    _cuda,
    _sm90,
    backward_problem_of,
    check,
    clone_backward_outputs,
    clone_outputs,
    make_backward_call,
    make_call,
    poison,
    poison_backward,
    problem_of,
)
from kpt.ops.flash_attention import reference as ref
from tests.ops.grad_checks import compare_grad


def _is_sm90() -> bool:
    return (torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability() == (9, 0))


needs_sm90 = pytest.mark.skipif(not _is_sm90(), reason="needs an sm90 GPU")


def simulate_hopper(monkeypatch: pytest.MonkeyPatch) -> bool:
    """Make dispatch see an NVIDIA sm_90 device with the cuda backend and the sm90 kernels
    built; returns False when it already does (a real sm90 GPU with both builds available:
    then nothing is patched), True when it patched.

    Patched for the test: ``torch.cuda.is_available`` and ``get_device_capability`` (read by
    the registry's capability check and by ``_sm90._capability``), ``torch.version.hip`` (an
    NVIDIA torch), ``_sm90.build_reason`` and ``_cuda.cuda_unavailable`` (the builds'
    availability; neither compiles anything). ``_sm90._capability`` gets a fresh cache around
    its own code, so that no value from the real device goes in and none from the simulated
    one stays. Problems must name a ``cuda`` device (:func:`on_cuda`): no tensor is made
    there. Only dispatch decisions are simulated: nothing may be launched.
    """
    if _is_sm90() and not _cuda.cuda_unavailable() and not _sm90.build_reason():
        return False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_sm90, "build_reason", lambda: None)
    monkeypatch.setattr(_cuda, "cuda_unavailable", lambda: None)
    monkeypatch.setattr(_sm90, "_capability", functools.cache(_sm90._capability.__wrapped__))
    return True


@pytest.fixture
def hopper(monkeypatch) -> bool:
    """An sm_90 device for dispatch, real or simulated (:func:`simulate_hopper`)."""
    return simulate_hopper(monkeypatch)


def on_cuda(problem):
    """``problem`` (of a call on CPU tensors) as the same call on the first CUDA device."""
    return dataclasses.replace(problem, device_type="cuda", device_index=0)
HALF = [torch.bfloat16, torch.float16]

# Lengths at the kernels' regime boundaries: a single row, partial tiles (query tiles are 128
# rows, 192 for the overlap variant at D = 64; key blocks of 128), several tiles with a ragged
# tail, and Sq != Sk both ways (bottom-right masks).
LENGTHS = [(1, 1), (17, 17), (113, 113), (1000, 1000), (17, 300), (300, 17), (128, 256),
           (257, 129), (385, 385), (200, 700)]
MASKS = {"full": {}, "causal": {"causal": True}}
# Every GPU test runs each kernel variant: the default, the FA3-schedule "overlap" one and its
# persistent forms (static tile stride, and tiles taken from a counter).
CONFIGS = {"base": {"impl": "sm90"}, "overlap": {"impl": "sm90", "variant": "overlap"},
           "persistent": {"impl": "sm90", "variant": "persistent"},
           "dynamic": {"impl": "sm90", "variant": "dynamic"}}


@pytest.fixture(params=list(CONFIGS))
def config(request) -> dict:
    return CONFIGS[request.param]


def _shape(sq: int, sk: int, d: int, **extra) -> dict:
    return dict(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=4, head_dim=d, **extra)


def _run_and_check(call: Call, config: dict, poisoned: bool = True) -> None:
    """The kernel against the reference; ``poisoned``: its outputs NaN-filled first (not for
    varlen, whose rows outside every sequence keep what the op put there)."""
    expected = clone_outputs(call)
    ref.run(expected, {})
    if poisoned:
        poison(call)
    reasons = _sm90.supports(problem_of(call)) + _sm90.call_reasons(call)
    assert not reasons, reasons
    _sm90.run(call, config)
    torch.cuda.synchronize()
    failure = check(call, expected)
    assert failure is None, failure


def reference_grid(test):
    """The GPU grid both directions run: every length, mask, head dim and dtype."""
    test = pytest.mark.parametrize("lengths", LENGTHS, ids=lambda sk: f"{sk[0]}x{sk[1]}")(test)
    test = pytest.mark.parametrize("mask", MASKS)(test)
    test = pytest.mark.parametrize("d", _sm90.HEAD_DIMS)(test)
    test = pytest.mark.parametrize("dtype", HALF, ids=str)(test)
    return needs_sm90(test)


@reference_grid
def test_matches_reference(lengths, mask, d, dtype, config):
    call = make_call(_shape(*lengths, d, **MASKS[mask]), dtype, torch.device("cuda"))
    _run_and_check(call, config)


@needs_sm90
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("extra", [
    dict(heads_q=8, heads_kv=2),                    # GQA
    dict(heads_q=6, heads_kv=1, causal=True),       # MQA
    dict(window_left=100, causal=True),             # sliding window (Gemma/Mistral style)
    dict(window_left=40, window_right=70),          # two-sided window
    dict(softcap=5.0, causal=True),                 # Gemma-2 soft cap
    dict(softcap=5.0),
    dict(scale=0.05),
], ids=["gqa", "mqa", "window_causal", "window", "softcap_causal", "softcap", "scale"])
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_features(extra, d, dtype, config):
    shape = dict(_shape(333, 700, d), **extra)
    _run_and_check(make_call(shape, dtype, torch.device("cuda"), seed=1), config)


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_transposed_views(d, config):
    """HF passes (B, H, S, D) tensors transposed to (B, S, H, D): read in place through TMA."""
    call = make_call(_shape(200, 300, d, causal=True), torch.bfloat16, torch.device("cuda"))

    def transposed(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    call = dataclasses.replace(call, q=transposed(call.q), k=transposed(call.k),
                               v=transposed(call.v))
    assert not call.q.is_contiguous()
    _run_and_check(call, config)


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_large_causal_rows_without_keys(d, config):
    """Sq > Sk with causal: the first Sq - Sk rows see nothing (out 0, lse -inf), spanning
    whole 128-row tiles that the kernel skips."""
    call = make_call(_shape(700, 200, d, causal=True), torch.bfloat16, torch.device("cuda"))
    _run_and_check(call, config)


@needs_sm90
@pytest.mark.parametrize("d,extra", [
    (128, {}),                                      # Q read into registers, released early
    (128, {"softcap": 5.0}),
    (128, {"causal": True}),                        # Sq > Sk: whole tiles see no key
    (128, {"causal": True, "window_left": 300}),    # own O buffer, 128-key blocks
    (64, {}),
    (64, {"causal": True}),
], ids=["full", "softcap", "causal", "window", "d64", "d64_causal"])
def test_persistent_walks_many_tiles_per_cta(d, extra):
    """Several query tiles per persistent CTA (the other tests' shapes have fewer tiles than
    SMs): the K/V ring's stages and parities run on across tiles, Q is reloaded only after its
    release (at D = 128 as soon as its fragments are in registers, while the tile still runs),
    O's staging buffer is reused after its previous store, tiles without keys are skipped by
    producer and consumers alike."""
    shape = dict(batch=3, seqlen_q=1999, seqlen_k=1408, heads_q=32, heads_kv=8, head_dim=d,
                 **extra)
    rows = 192 if d == 64 else 128  # the overlap kernel's query tile
    tiles = -(-shape["seqlen_q"] // rows) * shape["heads_q"] * shape["batch"]
    assert tiles >= 4 * torch.cuda.get_device_properties(0).multi_processor_count
    call = make_call(shape, torch.bfloat16, torch.device("cuda"), seed=5)
    for variant in ("persistent", "dynamic", "dynamic"):  # the counter is fresh each call
        _run_and_check(call, CONFIGS[variant])


# ---- varlen (the overlap kernel's variants) ------------------------------------------------

# (query lengths, key lengths) per sequence: one token; an empty sequence and one with queries
# but no keys; partial query tiles and key blocks, Sq < Sk and Sq > Sk (bottom-right masks);
# one long sequence beside one of a single token; one sequence of several tiles.
VARLEN_LENGTHS = {
    "one": ([1], [1]),
    "empty": ([5, 17, 0, 130, 2], [9, 17, 0, 200, 0]),
    "ragged": ([300, 129, 64], [300, 129, 700]),
    "long_short": ([257, 1], [129, 1000]),
    "single": ([1000], [1000]),
}
VARLEN_MASKS = {"full": {}, "causal": {"causal": True},
                "window_softcap": {"causal": True, "window_left": 100, "softcap": 20.0}}
VARLEN_PAD = 3  # tokens after the last sequence, which no sequence owns


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device="cuda")


def _varlen_call(lq, lk, d, dtype, *, heads=4, heads_kv=2, seed=0, transposed=False,
                 causal=False, window_left=-1, softcap=0.0) -> Call:
    """A varlen call on fresh random (Tq + VARLEN_PAD, H, D) tensors, outputs initialised as
    the op does (0 and -inf: rows outside every sequence are not written). ``transposed``:
    (T, H, D) views of (H, T, D) tensors."""
    g = torch.Generator().manual_seed(seed)

    def packed(total: int, h: int) -> torch.Tensor:
        if transposed:
            return torch.randn(h, total, d, generator=g).to("cuda", dtype).transpose(0, 1)
        return torch.randn(total, h, d, generator=g).to("cuda", dtype)

    tq, tk = sum(lq) + VARLEN_PAD, sum(lk) + VARLEN_PAD
    q, k, v = packed(tq, heads), packed(tk, heads_kv), packed(tk, heads_kv)
    return Call(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), d**-0.5, window_left,
                0 if causal else -1, softcap, torch.zeros(q.shape, dtype=dtype, device="cuda"),
                torch.full((heads, tq), float("-inf"), device="cuda"))


VARLEN_CONFIGS = {name: CONFIGS[name] for name in _sm90.VARLEN_VARIANTS}


@needs_sm90
@pytest.mark.parametrize("variant", list(VARLEN_CONFIGS))
@pytest.mark.parametrize("lengths", list(VARLEN_LENGTHS))
@pytest.mark.parametrize("mask", list(VARLEN_MASKS))
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_varlen_matches_reference(lengths, mask, d, dtype, variant):
    """Every row of every sequence against the reference; the rows after the last sequence
    keep 0 and -inf."""
    lq, lk = VARLEN_LENGTHS[lengths]
    call = _varlen_call(lq, lk, d, dtype, **VARLEN_MASKS[mask])
    _run_and_check(call, VARLEN_CONFIGS[variant], poisoned=False)


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_varlen_transposed_views_and_mqa(d):
    call = _varlen_call([300, 77], [500, 91], d, torch.bfloat16, heads=6, heads_kv=1,
                        transposed=True, causal=True)
    assert not call.q.is_contiguous()
    for variant in VARLEN_CONFIGS.values():
        _run_and_check(call, variant, poisoned=False)


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_varlen_never_reads_the_next_sequence(d):
    """A sequence's last key block runs into the next sequence's rows (the tensor maps span
    all of them): NaN in the next sequence's q, k and v must not reach this one's output, not
    even through P = 0 times v. The first sequence's rows match the reference of it alone."""
    lq, lk = [150, 40], [100, 40]
    call = _varlen_call(lq, lk, d, torch.bfloat16)
    for t, first in ((call.q, lq[0]), (call.k, lk[0]), (call.v, lk[0])):
        t[first:] = float("nan")
    alone = _varlen_call(lq[:1], lk[:1], d, torch.bfloat16)
    alone.q.copy_(call.q[: alone.q.shape[0]].nan_to_num(0.0))
    for name in ("k", "v"):
        getattr(alone, name).copy_(getattr(call, name)[: alone.k.shape[0]].nan_to_num(0.0))
    ref.run(alone, {})
    for variant in VARLEN_CONFIGS.values():
        call.out.zero_()
        _sm90.run(call, variant)
        torch.cuda.synchronize()
        first = call.out[: lq[0]]
        assert bool(first.isfinite().all()), "NaN of the next sequence reached the first one"
        failure = check(dataclasses.replace(call, out=first, lse=call.lse[:, : lq[0]]),
                        dataclasses.replace(alone, out=alone.out[: lq[0]],
                                            lse=alone.lse[:, : lq[0]]))
        assert failure is None, failure


@needs_sm90
def test_varlen_dispatch_runs_the_sm90_kernel():
    """The public op with cu_seqlens on Hopper: the cuda backend's sm90 config, matching the
    reference backend."""
    from kpt.ops import flash_attention
    call = _varlen_call([700, 300], [900, 300], 128, torch.bfloat16, causal=True)
    kw = dict(cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k,
              max_seqlen_q=call.max_seqlen_q, max_seqlen_k=call.max_seqlen_k, causal=True)
    chosen, config = SPEC.static_choice(problem_of(call))
    assert chosen.name == "cuda" and config == CONFIGS["dynamic"]
    out, lse = flash_attention(call.q, call.k, call.v, return_lse=True, **kw)
    want, want_lse = flash_attention(call.q, call.k, call.v, return_lse=True,
                                     backend="reference", **kw)
    failure = check(dataclasses.replace(call, out=out, lse=lse),
                    dataclasses.replace(call, out=want, lse=want_lse))
    assert failure is None, failure


def _split_shape(rounds: int, seqlen_q: int, seqlen_k: int, **extra) -> dict:
    """A D = 128 problem without a mask whose tiles fill `rounds` rounds of this GPU's SMs and
    a few tiles more: the dynamic variant splits those over their key blocks."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_head = -(-seqlen_q // 128)
    heads = rounds * sms // per_head + 1
    return dict(batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads, heads_kv=1,
                head_dim=128, **extra)


def _split_planned(call) -> bool:
    _, workspace = _sm90.SPEC.load().forward_scratch(
        call.q.shape[-1], call.q.shape[0], call.q.shape[1], call.k.shape[1], call.q.shape[2],
        call.window_left, call.window_right, _sm90.VARIANTS["dynamic"])
    return workspace > 0


@needs_sm90
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rounds,sq,sk,extra", [
    (1, 1000, 2000, {}),                  # 16 key blocks: 4 pieces per tail tile
    (3, 777, 1500, {"softcap": 5.0}),     # a ragged last query tile, 12 key blocks
    (2, 1024, 4096, {"scale": 0.05}),
], ids=["one_round", "softcap", "scale"])
def test_dynamic_splits_the_last_tiles(rounds, sq, sk, extra, dtype):
    """Without a mask, the tiles past the last full round of the SMs are split over their key
    blocks into pieces that idle SMs take; the last piece of each warp's rows to finish merges
    the others' partial O through the workspace (pieces finish in any order)."""
    call = make_call(_split_shape(rounds, sq, sk, **extra), dtype, torch.device("cuda"),
                     seed=13)
    assert _split_planned(call)
    for _ in range(2):  # fresh counters each call
        _run_and_check(call, CONFIGS["dynamic"])


@needs_sm90
def test_split_is_planned_only_where_it_helps():
    """No split with a mask, at D = 64, with too few key blocks for two pieces of 4, or when the
    tiles fill whole rounds of the SMs (nothing runs alone at the end)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    scratch = _sm90.SPEC.load().forward_scratch
    dynamic = _sm90.VARIANTS["dynamic"]
    assert scratch(128, 1, 1000, 2000, sms // 8 + 1, -1, -1, dynamic)[1] > 0
    assert scratch(128, 1, 1000, 2000, sms // 8 + 1, -1, 0, dynamic)[1] == 0    # causal
    assert scratch(64, 1, 1000, 2000, sms // 8 + 1, -1, -1, dynamic)[1] == 0     # D = 64
    assert scratch(128, 1, 1000, 896, sms // 8 + 1, -1, -1, dynamic)[1] == 0     # 7 blocks
    assert scratch(128, 1, 1000, 1024, sms // 8 + 1, -1, -1, dynamic)[1] > 0     # 8 blocks
    assert scratch(128, 1, 1024, 2048, sms, -1, -1, dynamic)[1] == 0           # 8 rounds
    assert scratch(128, 1, 1000, 2000, sms // 8 + 1, -1, -1,
                   _sm90.VARIANTS["persistent"]) == (0, 0)


@needs_sm90
@pytest.mark.parametrize("split", [False, True], ids=["causal", "split"])
def test_dynamic_variant_replays_in_a_cuda_graph(split):
    """The dynamic variant zeroes its tile counter (and its split tiles' counters) on the
    stream before each launch, so a captured call replays correctly (a counter left at its
    final value would skip every tile after the first wave and leave the poisoned outputs
    behind)."""
    shape = dict(batch=2, seqlen_q=2000, seqlen_k=2000, heads_q=32, heads_kv=8, head_dim=128,
                 causal=True)
    if split:
        shape = _split_shape(2, 1000, 2000)
    call = make_call(shape, torch.bfloat16, torch.device("cuda"), seed=7)
    assert _split_planned(call) is split
    _sm90.run(call, CONFIGS["dynamic"])  # build and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _sm90.run(call, CONFIGS["dynamic"])
    for seed in (11, 12):
        fresh = make_call(shape, torch.bfloat16, torch.device("cuda"), seed=seed)
        for name in ("q", "k", "v"):
            getattr(call, name).copy_(getattr(fresh, name))
        expected = clone_outputs(call)
        ref.run(expected, {})
        poison(call)
        graph.replay()
        torch.cuda.synchronize()
        failure = check(call, expected)
        assert failure is None, failure


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """An (B, S, H, D) tensor whose rows are D + 2 elements apart: even strides, 4-byte
    aligned, but not 16-byte multiples, so TMA cannot store it."""
    b, s, h, d = t.shape
    wide = torch.full((b, s, h, d + 2), float("nan"), device=t.device, dtype=t.dtype)
    return wide[..., :d]


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_unaligned_out_takes_the_register_epilogue(d, config):
    """out with rows TMA cannot describe is written from registers; the aligned case (every
    other test) goes through shared memory and TMA stores."""
    call = make_call(_shape(333, 300, d, causal=True), torch.bfloat16, torch.device("cuda"))
    call = dataclasses.replace(call, out=_unaligned(call.out))
    assert not _sm90.call_reasons(call)
    _run_and_check(call, config)
    assert torch.isnan(call.out._base[..., d:]).all()  # nothing written past each row


@needs_sm90
def test_misaligned_strides_are_rejected_before_launch(config):
    call = make_call(_shape(64, 64, 64), torch.bfloat16, torch.device("cuda"))
    wide = torch.randn(2, 64, 4, 65, device="cuda", dtype=torch.bfloat16)[..., :64]
    call = dataclasses.replace(call, q=wide)
    assert _sm90.call_reasons(call)
    with pytest.raises(ValueError, match="16-byte"):
        _sm90.run(call, config)


# ---- backward -------------------------------------------------------------------------------

BACKWARD = {"impl": "sm90"}


def _run_and_check_backward(call: BackwardCall) -> None:
    expected = clone_backward_outputs(call)
    ref.run_backward(expected, {})
    poison_backward(call)
    reasons = (_sm90.supports_backward(backward_problem_of(call))
               + _sm90.backward_call_reasons(call))
    assert not reasons, reasons
    _sm90.run_backward(call, BACKWARD)
    torch.cuda.synchronize()
    # check_backward, except that a gradient which is exactly 0 (every query seeing a single
    # key) is held to the absolute rounding bound of compare_grad.
    for name, other in (("dq", call.k), ("dk", call.q), ("dv", call.q)):
        failure = compare_grad(name, getattr(call, name), getattr(expected, name),
                               dout=call.dout, v=call.v, other=other, scale=abs(call.scale))
        assert failure is None, failure


@reference_grid
def test_backward_matches_reference(lengths, mask, d, dtype):
    # Key blocks are 128 per CTA and query items 64 rows: the lengths cover partial blocks of
    # both, a single row, and Sq != Sk both ways.
    call = make_backward_call(_shape(*lengths, d, **MASKS[mask]), dtype, torch.device("cuda"))
    _run_and_check_backward(call)


@needs_sm90
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("extra", [
    dict(heads_q=8, heads_kv=2),                    # GQA: one CTA sums its group's dK, dV
    dict(heads_q=6, heads_kv=1, causal=True),       # MQA
    dict(window_left=100, causal=True),             # sliding window
    dict(window_left=40, window_right=70),          # two-sided window
    dict(softcap=5.0, causal=True),                 # soft cap: dS carries 1 - tanh^2
    dict(softcap=5.0),
    dict(scale=0.05),
    dict(scale=-0.1),                               # a negative scale is legal
], ids=["gqa", "mqa", "window_causal", "window", "softcap_causal", "softcap", "scale",
        "negative_scale"])
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_backward_features(extra, d, dtype):
    shape = dict(_shape(333, 700, d), **extra)
    _run_and_check_backward(make_backward_call(shape, dtype, torch.device("cuda"), seed=1))


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_backward_with_lse_gradient(d):
    """return_lse makes lse differentiable: delta absorbs dlse (dS = P (dP - delta + dlse))."""
    call = make_backward_call(_shape(300, 257, d, causal=True), torch.bfloat16,
                              torch.device("cuda"), seed=2)
    gen = torch.Generator(device="cpu").manual_seed(7)
    dlse = torch.randn(call.lse.shape, generator=gen).to("cuda")
    _run_and_check_backward(dataclasses.replace(call, dlse=dlse))


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_backward_transposed_views_and_rows_without_keys(d):
    """(B, H, S, D) tensors viewed as (B, S, H, D) are read in place, gradients written in
    place into such views; Sq > Sk causal leaves rows (and whole query items) seeing no key."""
    call = make_backward_call(_shape(700, 200, d, causal=True), torch.bfloat16,
                              torch.device("cuda"), seed=3)

    def transposed(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    call = dataclasses.replace(call, q=transposed(call.q), k=transposed(call.k),
                               v=transposed(call.v), dout=transposed(call.dout),
                               dq=transposed(call.dq), dk=transposed(call.dk),
                               dv=transposed(call.dv))
    assert not call.q.is_contiguous() and not call.dk.is_contiguous()
    _run_and_check_backward(call)


@needs_sm90
@pytest.mark.parametrize("d", _sm90.HEAD_DIMS)
def test_backward_unaligned_outputs(d):
    """out, dq, dk and dv with rows 16-byte accesses and TMA cannot use: the backward reads
    and writes them two elements at a time (its aligned paths are what every other test runs)."""
    shape = dict(_shape(333, 300, d, causal=True), heads_q=8, heads_kv=2)  # GQA too
    call = make_backward_call(shape, torch.bfloat16, torch.device("cuda"), seed=4)
    out = _unaligned(call.out)
    out.copy_(call.out)
    call = dataclasses.replace(call, out=out, dq=_unaligned(call.dq), dk=_unaligned(call.dk),
                               dv=_unaligned(call.dv))
    assert not _sm90.backward_call_reasons(call)
    _run_and_check_backward(call)
    for t in (call.dq, call.dk, call.dv):
        assert torch.isnan(t._base[..., d:]).all()  # nothing written past each row


def _backward_problem(device: str, seqlen: int, d: int, mask: str, deterministic: bool = False,
                      window_left: int = -1, softcap: float = 0.0):
    """The Problem of a backward call on ``device`` (dispatch reads only shapes): made from
    empty CPU tensors and moved to the device, so that no GPU is needed."""
    q = torch.empty(1, seqlen, 2, d, dtype=torch.bfloat16)
    call = BackwardCall(q, None, q, q, q, q, q[..., 0], None, None, seqlen, seqlen, d ** -0.5,
                        window_left, 0 if mask == "causal" else -1, softcap, deterministic,
                        q, q, q)
    problem = backward_problem_of(call)
    return on_cuda(problem) if device == "cuda" else problem


# The sm90 backward's length threshold as measured (SM90_NOTES.md, "Backward": faster than
# Triton's from 512 tokens on, shorter sequences unmeasured). The cases below spell the
# lengths out rather than reading _cuda.SM90_BACKWARD_MIN_SEQLEN, so that moving the threshold
# without new measurements fails here instead of moving the expectations with it.
MEASURED_MIN_SEQLEN = 512


def test_backward_threshold_is_the_measured_one():
    """The constant dispatch reads is the measured threshold (the cases below pin its effect)."""
    assert _cuda.SM90_BACKWARD_MIN_SEQLEN == MEASURED_MIN_SEQLEN


@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d,mask,seqlen,sm90", [
    (128, "full", 256, False), (128, "causal", 256, False), (64, "full", 256, False),
    (64, "causal", 256, False),
    (128, "full", 512, True),
    (128, "causal", 512, True),
    (64, "full", 512, True),
    (64, "causal", 4096, True),
    (128, "full", 448, False),
    (128, "causal", 511, False),
])
def test_hopper_backward_dispatch(d, mask, seqlen, sm90, deterministic):
    """The dispatcher puts the sm90 backward first where it measured faster than Triton's
    (from 512 tokens at head dims 64 and 128, every mask) and never for a deterministic call;
    within the cuda backend the sm90 kernel is the default unless the call asks for
    determinism (it adds dq with fp32 reductions), where the deterministic mma kernel is."""
    problem = _backward_problem("cuda", seqlen, d, mask, deterministic)
    chosen, config = SPEC_BACKWARD.static_choice(problem)
    assert chosen.name == ("cuda" if sm90 and not deterministic else "triton")
    if chosen.name == "cuda":
        assert config == BACKWARD
    default = SPEC_BACKWARD.backend("cuda").configs(problem)[0]
    assert default == ({"impl": "mma"} if deterministic else BACKWARD)


@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("seqlen,extra,sm90", [
    (256, dict(mask="full", softcap=30.0), True),
    (256, dict(mask="causal", softcap=30.0), False),
    (512, dict(mask="causal", softcap=30.0), True),
    (512, dict(mask="causal", window_left=1024), True),
    (511, dict(mask="causal", window_left=1024), False),
    (256, dict(mask="causal", window_left=1024, softcap=30.0), False),
], ids=["softcap", "softcap_causal", "softcap_causal_long", "window", "window_short",
        "window_softcap"])
def test_hopper_backward_dispatch_softcap_and_windows(seqlen, extra, sm90):
    """A soft cap without a mask at D = 128 takes the sm90 backward at any length (measured
    faster at 4096 tokens); causal soft caps and sliding windows from the common threshold."""
    problem = _backward_problem("cuda", seqlen, 128, **extra)
    assert SPEC_BACKWARD.static_choice(problem)[0].name == ("cuda" if sm90 else "triton")


# ---- CPU: declared reasons -----------------------------------------------------------------


def _cpu_call(**extra) -> Call:
    shape = dict(_shape(5, 7, 64), **extra)
    return make_call(shape, torch.bfloat16, torch.device("cpu"))


@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("d,extra,backend", [
    (128, {}, "cuda"), (128, {"causal": True}, "cuda"),
    (128, {"causal": True, "window_left": 100}, "cuda"),
    (64, {}, "cuda"), (64, {"causal": True}, "cuda")])
def test_hopper_dispatch_prefers_the_dynamic_kernel_where_it_measured_faster(d, extra, backend):
    """On Hopper the overlap kernel in persistent CTAs with dynamic tile scheduling leads,
    wherever it measured faster than Triton's forward."""
    call = make_call(_shape(256, 256, d, **extra), torch.bfloat16, torch.device("cpu"))
    chosen, config = SPEC.static_choice(on_cuda(problem_of(call)))
    assert chosen.name == backend
    if backend == "cuda":
        assert config == CONFIGS["dynamic"]


def test_prefer_hooks_are_empty_off_hopper():
    assert _cuda.prefer(problem_of(_cpu_call())) == ()
    problem = _backward_problem("cpu", _cuda.SM90_BACKWARD_MIN_SEQLEN, 128, "full")
    assert _cuda.prefer_backward(problem) == ()
    problem = _backward_problem("cpu", _cuda.SM90_BACKWARD_MIN_SEQLEN, 128, "causal",
                                window_left=1024)
    assert problem["mask"] == "window" and _cuda.prefer_backward(problem) == ()


def test_reasons_on_cpu():
    reasons = _sm90.supports(problem_of(_cpu_call()))
    assert reasons == ["sm90 kernel needs an NVIDIA CUDA device"]


@pytest.mark.parametrize("extra,needle", [
    (dict(head_dim=96), "head_dim 96"),
    (dict(head_dim=256), "head_dim 256"),
])
def test_head_dim_reasons(extra, needle):
    reasons = _sm90.supports(problem_of(_cpu_call(**extra)))
    assert any(needle in r for r in reasons), reasons


def _cpu_varlen_call() -> Call:
    """Two sequences (5 and 2 queries, 7 and 3 keys) packed as (tokens, H, D) on the CPU."""
    call = make_call(_shape(7, 10, 64), torch.bfloat16, torch.device("cpu"))
    q, k, v = (t[0] for t in (call.q, call.k, call.v))
    return Call(q, k, v, torch.tensor([0, 5, 7], dtype=torch.int32),
                torch.tensor([0, 7, 10], dtype=torch.int32), 5, 7, 0.125, -1, -1, 0.0,
                torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), float("-inf")))


def test_dtype_and_varlen_reasons():
    call = make_call(_shape(5, 7, 64), torch.float32, torch.device("cpu"))
    assert any("float32" in r for r in _sm90.supports(problem_of(call)))
    # Varlen: the forward's overlap kernel runs it (its layout passes), the backward does not,
    # and the base variant is refused before anything.
    varlen = _cpu_varlen_call()
    problem = problem_of(varlen)
    assert not any("varlen" in r for r in _sm90.supports(problem))
    assert any("varlen" in r for r in _sm90.supports_backward(problem))
    assert _sm90.call_reasons(varlen) == []
    with pytest.raises(ValueError, match="varlen runs in the overlap kernel only"):
        _sm90.run(varlen, {"impl": "sm90"})
    # A 4-D tensor in a varlen call is named.
    bad = dataclasses.replace(varlen, k=varlen.k[None])
    assert any("k must be (tokens, H, D)" in r for r in _sm90.call_reasons(bad))
    # Only the token and head strides of (tokens, H, D) tensors are checked: an out with an
    # odd token stride is the one reason, a 16-byte-misaligned k head stride is k's.
    odd_out = torch.zeros(7, 4, 65, dtype=torch.bfloat16)[..., 1:]
    assert [r for r in _sm90.call_reasons(dataclasses.replace(varlen, out=odd_out))
            if "out" not in r] == []
    assert any("out" in r for r in _sm90.call_reasons(dataclasses.replace(varlen, out=odd_out)))
    k = torch.randn(10, 4, 72, dtype=torch.bfloat16)[..., :64]  # head stride 72: 144 bytes
    assert _sm90.call_reasons(dataclasses.replace(varlen, k=k)) == []
    k = torch.randn(10, 4, 68, dtype=torch.bfloat16)[..., :64]  # 136 bytes: not TMA-aligned
    reasons = _sm90.call_reasons(dataclasses.replace(varlen, k=k))
    assert reasons and all("k needs" in r for r in reasons), reasons


@pytest.mark.usefixtures("hopper")
def test_hopper_varlen_dispatch_takes_the_overlap_kernel():
    """Varlen forwards on Hopper: the cuda backend first, its dynamic then overlap variants
    (no base); the backward stays off the sm90 kernel."""
    problem = on_cuda(problem_of(_cpu_varlen_call()))
    assert _cuda.prefer(problem) == ("cuda",)
    assert _cuda.configs(problem)[:2] == [CONFIGS["dynamic"], CONFIGS["overlap"]]
    assert CONFIGS["base"] not in _cuda.configs(problem)
    long = tuple((key, 4096 if key in ("seqlen_q", "seqlen_k") else value)
                 for key, value in problem.dims)
    assert _cuda.prefer_backward(dataclasses.replace(problem, dims=long)) == ()


def test_call_reasons_strides():
    call = _cpu_call()
    assert _sm90.call_reasons(call) == []
    # A head stride of 65 elements (130 bytes) cannot be described to the TMA unit.
    q = torch.randn(2, 5, 4, 65, dtype=torch.bfloat16)[..., :64]
    assert any("16-byte" in r for r in _sm90.call_reasons(dataclasses.replace(call, q=q)))
    # A non-contiguous last dim neither.
    k = torch.randn(2, 7, 4, 64, dtype=torch.bfloat16).transpose(-1, -2).contiguous()
    k = k.transpose(-1, -2)
    assert any("last dim" in r for r in _sm90.call_reasons(dataclasses.replace(call, k=k)))
    # out only needs pairs: rows 66 elements apart are fine, an odd stride is not.
    out = torch.empty(2, 5, 4, 66, dtype=torch.bfloat16)[..., :64]
    assert _sm90.call_reasons(dataclasses.replace(call, out=out)) == []
    odd = torch.empty(2, 5, 4, 65, dtype=torch.bfloat16)[..., 1:]
    assert any("out" in r and "4-byte" in r
               for r in _sm90.call_reasons(dataclasses.replace(call, out=odd)))
    # Strides of size-1 dims are never used, so they need no alignment.
    one = torch.randn(1, 5, 4, 64, dtype=torch.bfloat16).as_strided((1, 5, 4, 64),
                                                                     (3, 256, 64, 1))
    assert _sm90.call_reasons(dataclasses.replace(call, q=one)) == []


def test_run_rejects_unknown_config_before_anything():
    with pytest.raises(ValueError, match="unknown config"):
        _sm90.run(_cpu_call(), {"impl": "sm90", "block_m": 64})


def test_run_rejects_unknown_variant_before_anything():
    with pytest.raises(ValueError, match="unknown variant"):
        _sm90.run(_cpu_call(), {"impl": "sm90", "variant": "pingpong"})


def test_run_rejects_unsupported_call_on_cpu(config):
    with pytest.raises(ValueError, match="cannot run"):
        _sm90.run(_cpu_call(), config)


def _cpu_backward_call(**extra) -> BackwardCall:
    return make_backward_call(dict(_shape(5, 7, 64), **extra), torch.bfloat16,
                              torch.device("cpu"))


def test_backward_reasons_name_determinism():
    call = dataclasses.replace(_cpu_backward_call(), deterministic=True)
    reasons = _sm90.supports_backward(backward_problem_of(call))
    assert any("not deterministic" in r for r in reasons), reasons
    assert _cuda.backward_configs(backward_problem_of(call))[0] == {"impl": "mma"}


def test_backward_call_reasons_strides():
    call = _cpu_backward_call()
    assert _sm90.backward_call_reasons(call) == []
    # dout is read by TMA: a 65-element head stride cannot be described.
    dout = torch.randn(2, 5, 4, 65, dtype=torch.bfloat16)[..., :64]
    reasons = _sm90.backward_call_reasons(dataclasses.replace(call, dout=dout))
    assert any("dout" in r and "16-byte" in r for r in reasons), reasons
    # dk is written in pairs: an odd head stride is rejected, an 8-element one is fine.
    odd = torch.empty(2, 7, 4, 65, dtype=torch.bfloat16)[..., 1:]
    reasons = _sm90.backward_call_reasons(dataclasses.replace(call, dk=odd))
    assert any("dk" in r and "4-byte" in r for r in reasons), reasons


def test_run_backward_rejects_bad_config_and_cpu_calls():
    with pytest.raises(ValueError, match="unknown backward config"):
        _sm90.run_backward(_cpu_backward_call(), {"impl": "sm90", "variant": "overlap"})
    with pytest.raises(ValueError, match="cannot run this backward"):
        _sm90.run_backward(_cpu_backward_call(), BACKWARD)
