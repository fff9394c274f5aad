"""int4_gemm's CUDA/HIP backends (``kpt.ops.int4_gemm._cuda``, kernels in ``csrc/int4_gemm``).

On any machine: reasons and configs (the default by M, the split heuristic), the tile tables
against the kernels' instantiations, the launcher against the binding and the C header, that
every csrc/int4_gemm kernel is in the compile checks, the backends' registration, and two
emulations in PyTorch of what the tensor-core kernel does by construction: the exponent trick
of its dequantisation (bit for bit against ``dequantize_int4``) and its fragment layout (the
permuted k slots and columns of x and w, through the PTX m16n8k16 fragment tables, give x @
w.T), with the shared-memory swizzles conflict-free.

On a GPU: every tile and split of both implementations (tensor cores, and the portable tiles
the HIP build runs) against the reference on odd M (1, 3, 17, 129), N not a multiple of any
tile, every group size, symmetric and zero-point, act-order, bias (float32 and x's dtype),
16-bit scales, fp16 and bf16, a K tail; one-hot x, which makes the output the dequantised
weight itself (bit-exact); strided, misaligned and NaN-poisoned inputs, a NaN-poisoned output
and workspace; determinism of split-K; CUDA graph replay; the benchmark's shapes; dispatch
through ``int4_gemm``. Registry-level behaviour (dispatch, validation, the kernel against the
reference on its own shape list) is test_int4_gemm.py's, which runs every registered backend.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from kpt.jit import csrc_dir
from kpt.ops import dequantize_int4, int4_gemm, pack_int4
from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.int4_gemm import GROUP_SIZES, SPEC, Call, _cuda
from kpt.ops.int4_gemm import reference as ref
from tests.ops.jit_backends import forward_arguments, unusable

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# A kernel against the reference: the same rounded weights (the dequantisation is exact) and
# one final rounding; only the order of the float32 sums differs (mma's internal order, the
# k-warp and split-K partial sums), which can move an element across a rounding boundary: one
# unit in the last place (bf16 2^-8, fp16 2^-11) bounds it, norm-wise and per element.
TOLERANCE = {BF16: 2**-8, FP16: 2**-11}


def _problem(device: str = "cuda", dtype: torch.dtype = BF16, **dims) -> Problem:
    base = dict(m=1, n=8192, k=8192, group_size=128, zero_point=True, act_order=False,
                bias=False, scale_dtype=FP32)
    return Problem.of(torch.device(device, 0), dtype, **(base | dims))


# ---- reasons and configs (any machine) -------------------------------------------------------


@pytest.mark.parametrize("dims", [
    dict(), dict(m=4096), dict(m=0), dict(n=8, k=8), dict(n=200, k=264, group_size=-1),
    dict(act_order=True, group_size=32), dict(bias=True, scale_dtype=BF16), dict(m=10**6),
], ids=str)
def test_supported_problems(dims):
    assert _cuda.supports(_problem(**dims)) == []


@pytest.mark.parametrize(("dims", "text"), [
    (dict(n=44), "N = 44 is not a multiple of 8"),
    (dict(n=2**30), "below 2^30"),
    (dict(k=2**30), "below 2^30"),
])
def test_unsupported_problems_say_why(dims, text):
    reasons = _cuda.supports(_problem(**dims))
    assert len(reasons) == 1 and text in reasons[0], reasons


def test_fp32_x_is_a_reason():
    assert any("float16 or bfloat16" in r for r in _cuda.supports(_problem(dtype=FP32)))


@pytest.mark.parametrize(("m", "n", "k", "tile", "split"), [
    (1, 8192, 8192, (16, 128), 5),      # decode: 64 tiles, 5 shares of 13 K steps
    (16, 8192, 8192, (16, 128), 5),
    (1, 4096, 14336, (16, 128), 9),     # Llama-3-8B down projection: 32 tiles
    (1, 8192, 512, (16, 128), 1),       # 4 K steps: too short to split
    (17, 8192, 8192, (64, 128), 5),
    (256, 8192, 8192, (64, 128), 1),    # 256 tiles: every SM busy without a split
    (512, 8192, 8192, (128, 128), 1),   # 128 x 256 would leave SMs idle
    (1024, 8192, 8192, (128, 256), 1),
    (4096, 8192, 8192, (128, 256), 1),
])
def test_default_config_by_m(m, n, k, tile, split):
    assert _cuda.default_config(m, n, k, 132) == {"impl": "mma", "block_m": tile[0],
                                                  "block_n": tile[1], "split_k": split}


def test_default_never_splits_without_an_sm_count_or_rows():
    assert _cuda.default_config(1, 8192, 8192, 0)["split_k"] == 1
    # M = 0: configs are asked for before the empty launch (was a division by zero)
    assert _cuda.default_config(0, 8192, 8192, 132)["split_k"] == 1
    assert _cuda.default_config(4096, 8192, 8192, 0)["block_m"] == 128


def test_configs_differ_and_are_instantiated(monkeypatch):
    monkeypatch.setattr(_cuda, "_sm_count", lambda index: 132)
    for m in (1, 3, 16, 17, 64, 255, 256, 4096):
        problem = _problem(m=m)
        cfgs = _cuda.configs(problem)
        # From DEQUANT_MIN_M rows the dequantise-then-GEMM config leads; from DEQUANT_TUNE_M
        # it is offered last; below, never.
        dequant = [c for c in cfgs if c["impl"] == "dequant"]
        if m >= _cuda.DEQUANT_MIN_M:
            assert cfgs[0] == _cuda.DEQUANT_CONFIG and cfgs[1:] and dequant == cfgs[:1]
            cfgs = cfgs[1:]
        elif m >= _cuda.DEQUANT_TUNE_M:
            assert dequant == [_cuda.DEQUANT_CONFIG] == cfgs[-1:]
            cfgs = cfgs[:-1]
        else:
            assert not dequant
        assert cfgs[0] == _cuda.default_config(m, 8192, 8192, 132)
        assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
        for c in cfgs:
            assert c["impl"] == "mma" and (c["block_m"], c["block_n"]) in _cuda.MMA_TILES
            assert 1 <= c["split_k"] <= _cuda.MAX_SPLIT
        if m <= 16:
            assert {c["block_m"] for c in cfgs} == {16}
            assert any(c["split_k"] == 1 for c in cfgs) and any(c["split_k"] > 1 for c in cfgs)
    monkeypatch.setattr(_cuda, "is_rocm", lambda: True)
    for m in (1, 300):
        cfgs = _cuda.configs(_problem(m=m))
        assert {c["impl"] for c in cfgs} == ({"simt", "dequant"} if m >= 256 else {"simt"})
        assert all((c["block_m"], c["block_n"]) in _cuda.SIMT_TILES for c in cfgs
                   if c["impl"] == "simt")


def test_unknown_tiles_and_splits_are_rejected_before_any_build():
    with pytest.raises(ValueError, match=r"no 'mma' tile \(32, 128\)"):
        _cuda._tile("mma", {"block_m": 32, "block_n": 128})
    with pytest.raises(ValueError, match=r"no 'simt' tile \(16, 128\)"):
        _cuda._tile("simt", {"block_m": 16, "block_n": 128})
    assert _cuda._tile("mma", {"block_m": 128, "block_n": 256}) == (128, 256)
    assert _cuda._tile("simt", {}) == (16, 64)
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="split_k must be an int"):
            _cuda._split({"split_k": bad})
    assert _cuda._split({}) == 1


def test_alignment_rules():
    t = torch.zeros(4, 16, dtype=BF16)
    assert _cuda._fits(t, 8, 16)
    assert not _cuda._fits(torch.zeros(4, 20, dtype=BF16)[:, :16], 8, 16)  # 40-byte rows
    assert _cuda._fits(torch.zeros(4, 24, dtype=BF16)[:, :16], 8, 16)  # 48-byte rows
    assert not _cuda._fits(t.view(-1)[1:17].view(1, 16), 8, 16)  # base off by 2 bytes
    assert not _cuda._fits(t.t(), 8, 16)
    assert not _cuda._fits(t[:1].expand(4, 16), 8, 16)  # rows overlap
    assert _cuda._fits(torch.zeros(3, 52, dtype=torch.uint8)[:, :48], 4, 4)
    assert not _cuda._fits(torch.zeros(3, 50, dtype=torch.uint8)[:, :48], 4, 4)
    assert not _cuda._fits(torch.zeros(8, dtype=torch.int32)[::2], 1, 16)
    copy = _cuda._fit(t.t(), 8, 16)
    assert copy.is_contiguous() and torch.equal(copy, t.t())
    assert _cuda._fit(t, 8, 16) is t and _cuda._fit(None, 8, 16) is None


def _small_call(device: str = "cpu", m: int = 3) -> Call:
    w = torch.randn(48, 64)
    packed, scales, zeros = pack_int4(w, 32, False)
    x = torch.randn(m, 64).to(BF16)
    return Call(*(t.to(device) for t in (x, packed, scales, zeros)), None, None, 32,
                torch.empty(m, 48, dtype=BF16, device=device))


def test_run_needs_gpu_tensors_and_skips_empty_calls(monkeypatch):
    with pytest.raises(ValueError, match="needs GPU tensors"):
        _cuda.run_cuda(_small_call(), {})

    def no_build():
        raise AssertionError("an empty call must not build or launch")

    monkeypatch.setattr(_cuda, "_module", no_build)
    _cuda.run_cuda(_small_call(m=0), {})
    _cuda.run_hip(_small_call(m=0), {})


# ---- the launcher, the binding and the header agree (any machine) ----------------------------


def _binding_text() -> str:
    return (csrc_dir() / "int4_gemm" / "binding.cpp").read_text()


def test_launcher_passes_every_binding_argument_in_order():
    """The binding first compiles on a GPU machine: check here that the launcher's call has as
    many positional arguments as the binding declares, and the C++ signature the same count."""
    text = _binding_text()
    args, names = forward_arguments(_cuda, text)
    assert args == len(names) == 13
    assert names[:7] == ["x", "packed", "scales", "zeros", "g_idx", "bias", "out"]
    signature = text[text.index("void forward("):]
    signature = signature[: signature.index(")")]
    assert signature.count(",") + 1 == len(names)


def test_python_limits_match_the_header():
    header = (csrc_dir() / "include" / "kpt" / "int4_gemm.h").read_text()
    assert re.search(rf"#define KPT_INT4_N_MULTIPLE {_cuda.N_MULTIPLE}\b", header)
    assert "#define KPT_INT4_MAX_DIM (1 << 30)" in header and _cuda.MAX_DIM == 1 << 30
    assert re.search(rf"#define KPT_INT4_MAX_SPLIT {_cuda.MAX_SPLIT}\b", header)
    for name, code in _cuda.IMPLS.items():
        assert re.search(rf"KPT_INT4_IMPL_{name.upper()} = {code}\b", header), name


def test_tile_tables_match_the_kernels():
    mma = (csrc_dir() / "int4_gemm" / "gemm_mma.cu").read_text()
    table = re.search(r"constexpr int kTiles\[\]\[3\] = \{(.*?)\};", mma, re.S).group(1)
    tiles = {(int(m), int(n)): int(k)
             for m, n, k in re.findall(r"\{(\d+), (\d+), (\d+)\}", table)}
    assert tiles == _cuda.MMA_TILES
    launched = re.findall(r"launch_tile<T, (\d+), (\d+), (\d+),", mma)
    assert {(int(m), int(n)): int(k) for m, n, k in launched} == tiles
    simt = (csrc_dir() / "int4_gemm" / "gemm_simt.cu").read_text()
    assert "constexpr int kBN = 64;" in simt and "constexpr int kBK = 32;" in simt
    assert set(re.findall(r"launch_tile<\w+, (\d+)>", simt)) == {
        str(m) for m, _ in _cuda.SIMT_TILES}
    assert set(_cuda.SIMT_TILES.values()) == {32}
    assert {n for _, n in _cuda.SIMT_TILES} == {64}


def test_every_kernel_is_compile_checked():
    """tests/jit/test_compile_kernels.py compiles every csrc/*/*.cu for sm_90a, sm_80 (nvcc)
    and gfx90a (hipcc) whenever the compilers are present; csrc/int4_gemm declares no target
    limit, so each of its kernels is checked for all three."""
    from tests.jit.test_compile_kernels import KERNELS, declared_targets

    sources = sorted((csrc_dir() / "int4_gemm").glob("*.cu"))
    assert {p.name for p in sources} == {"dequant.cu", "gemm_mma.cu", "gemm_simt.cu", "launch.cu"}
    assert set(sources) <= set(KERNELS)
    assert all(declared_targets(p.read_text()) is None for p in sources)
    assert {f"int4_gemm/{p.name}" for p in sources} | {"int4_gemm/binding.cpp"} == set(
        _cuda.SPEC.sources)


def test_backends_are_registered():
    cuda, hip = SPEC.backend("cuda"), SPEC.backend("hip")
    assert (cuda.rocm, cuda.min_capability, hip.rocm) == (False, (8, 0), True)
    assert cuda.dtypes == hip.dtypes == frozenset({BF16, FP16})
    assert SPEC.priority["cuda"] == ("triton", "cuda", "hip", "reference")
    problem = _problem(device="cpu")
    assert any("device cpu" in r for r in SPEC.reasons("cuda", problem))


# ---- the tensor-core kernel's construction, emulated (any machine) ---------------------------

# PTX ISA, mma.m16n8k16 with 16-bit A/B and float32 C/D: (row, col) of element i of a lane's
# fragment, lane = 4 g + t.
def _a_pos(g: int, t: int, i: int) -> tuple[int, int]:
    return g + 8 * ((i // 2) % 2), 2 * t + (i % 2) + 8 * (i // 4)


def _b_pos(g: int, t: int, i: int) -> tuple[int, int]:
    return 2 * t + (i % 2) + 8 * (i // 2), g


def _c_pos(g: int, t: int, i: int) -> tuple[int, int]:
    return g + 8 * (i // 2), 2 * t + (i % 2)


def _dequant_trick(word: torch.Tensor, j: int, s: torch.Tensor, z: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The kernel's dequantisation of nibble j (0..7) of int32 words: nibble j % 4 of the word
    (shifted by 16 for j >= 4) OR-ed into the mantissa of 2^(23 - 4 (j % 4)), minus 2^(23 - 4
    (j % 4)) + z, times s, all float32, rounded once to dtype."""
    jj = j % 4
    w = word.long() & 0xFFFFFFFF
    if j >= 4:
        w = w >> 16
    bits = (w & (0xF << (4 * jj))) | ((150 - 4 * jj) << 23)
    f = torch.where(bits >= 2**31, bits - 2**32, bits).int().view(torch.float32)
    magic = torch.tensor(float(2 ** (23 - 4 * jj)), dtype=torch.float32)
    return ((f - (magic + z.float())) * s.float()).to(dtype)


@pytest.mark.parametrize("scale_dtype", [FP32, FP16, BF16], ids=str)
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_dequant_trick_is_the_reference_bit_for_bit(dtype, scale_dtype):
    """Every code against every zero point, with scales across the float32 range (tiny,
    subnormal-producing, huge, odd mantissas): (2^(23-4j) + q) - (2^(23-4j) + z) is exact."""
    gen = torch.Generator().manual_seed(0)
    n = 16 * 16 * 8
    q = torch.arange(16).repeat_interleave(16 * 8)
    z = torch.arange(16).repeat(16).repeat_interleave(8)
    s = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-140, 100, (n,),
                                                                 generator=gen).float())
    s = s.to(scale_dtype).float()
    for j in range(8):
        word = (q << (4 * j))
        word = torch.where(word >= 2**31, word - 2**32, word)
        got = _dequant_trick(word, j, s, z, dtype)
        want = ((q.float() - z.float()) * s).to(dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), j


def test_fragment_layout_computes_x_times_w():
    """One k32 block and one 32-column run as the kernel lays them out: lane (g, t) loads x
    row g (and g + 8) channels 8t .. 8t + 7 and packed row t, columns 4g .. 4g + 3; step s
    takes channels 8t + 4s + {0, 1} / {2, 3} into k slots 2t + {0, 1} / 2t + 8 + {0, 1}; n8 tile
    a puts column 4j + a at mma column j; the epilogue writes lane (g, t)'s c0 of tile a to
    column 8t + a and c1 to 8t + 4 + a. Assembled through the PTX fragment tables, the mma
    products must be x @ w.T with w the dequantised weight."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=gen).to(BF16).float()
    q = torch.randint(0, 16, (32, 32), generator=gen)  # (N, K) codes
    packed = ref.pack(q)  # (4, 32) words
    scales = torch.rand(32, generator=gen) + 0.1
    zeros = torch.randint(0, 16, (32,), generator=gen)
    w = ((q.float() - zeros.float()[:, None]) * scales[:, None]).to(BF16).float()  # (N, K)

    out = torch.zeros(16, 32)
    for a in range(4):  # n8 tile
        acc = {}
        for s in range(2):  # k step
            A = torch.full((16, 16), float("nan"))
            B = torch.full((16, 8), float("nan"))
            for g, t in itertools.product(range(8), range(4)):
                xa = x[g, 8 * t: 8 * t + 8]
                xb = x[g + 8, 8 * t: 8 * t + 8]
                regs = [xa[4 * s: 4 * s + 2], xb[4 * s: 4 * s + 2], xa[4 * s + 2: 4 * s + 4],
                        xb[4 * s + 2: 4 * s + 4]]
                for i in range(8):
                    A[_a_pos(g, t, i)] = regs[i // 2][i % 2]
                col = 4 * g + a
                word = packed[t, col]
                v = [_dequant_trick(word.view(1), j, scales[col].view(1), zeros[col].view(1),
                                    BF16).float()[0] for j in range(8)]
                b = [v[4 * s], v[4 * s + 1], v[4 * s + 2], v[4 * s + 3]]
                for i in range(4):
                    B[_b_pos(g, t, i)] = b[i]
            assert not A.isnan().any() and not B.isnan().any()
            d = A.double() @ B.double()
            for key in itertools.product(range(8), range(4), range(4)):
                acc[key] = acc.get(key, 0.0) + float(d[_c_pos(*key)])
        for g, t in itertools.product(range(8), range(4)):
            for i in range(4):
                row = g + 8 * (i // 2)
                out[row, 8 * t + a + 4 * (i % 2)] = acc[(g, t, i)]
    torch.testing.assert_close(out.double(), x.double() @ w.double().t(), rtol=1e-6, atol=1e-6)


def test_shared_memory_reads_are_conflict_free():
    """The 16-byte shared loads of one k32 block, 8 lanes per phase: the x tile (rows of 128 or
    256 bytes, chunk c of row r at c ^ (r & 1) * 4) and the packed tile (rows of block_n words,
    chunk c of row r at c ^ (r & 3) * 2) hit 8 distinct 16-byte bank groups per phase."""
    def bank_groups(address) -> int:
        """Distinct 16-byte bank groups one phase's 8 lanes (g = lane // 4, t = lane % 4) hit."""
        return len({address(lane // 4, lane % 4) % 8 for lane in range(8)})

    for row_chunks in (8, 16):  # x rows of 128 or 256 bytes
        for kb, mi in itertools.product(range(row_chunks // 4), range(4)):
            for phase in range(4):
                def x_chunk(g, t, phase=phase, kb=kb, mi=mi, row_chunks=row_chunks):
                    r, c = 16 * mi + g + 2 * phase, 4 * kb + t
                    return r * row_chunks + (c ^ ((r & 1) << 2))
                assert bank_groups(x_chunk) == 8
    for run_chunks in (32, 64):  # packed rows of 128 or 256 words
        for kb, run in itertools.product(range(4), range(run_chunks // 8)):
            for phase in range(4):
                def w_chunk(g, t, phase=phase, kb=kb, run=run, run_chunks=run_chunks):
                    r, c = 4 * kb + t, 8 * run + g + 2 * phase
                    return r * run_chunks + (c ^ ((r & 3) << 1))
                assert bank_groups(w_chunk) == 8


# ---- on a GPU --------------------------------------------------------------------------------


needs_gpu = pytest.mark.skipif(unusable(_cuda) is not None, reason=str(unusable(_cuda)))
IMPLS = ["simt"] if torch.version.hip else ["mma", "simt"]
RUN = _cuda.run_hip if torch.version.hip else _cuda.run_cuda
BACKEND = "hip" if torch.version.hip else "cuda"


def _all_configs() -> list[dict]:
    """Every tile of each implementation, unsplit and split in 3 (fewer where K is short), and
    the dequantise-then-GEMM config."""
    out = []
    for impl in IMPLS:
        for bm, bn in _cuda._tiles(impl):
            for split in (1, 3):
                out.append(dict(impl=impl, block_m=bm, block_n=bn, split_k=split))
    return [*out, dict(_cuda.DEQUANT_CONFIG)]


def _weights(seed: int, n: int, k: int, group_size: int, symmetric: bool, act_order: bool,
             scale_dtype: torch.dtype = FP32):
    """(packed, scales, zeros, g_idx) on the GPU for a random (N, K) weight with outliers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(1, k, generator=gen).add(0.2)
    w[:, :: max(1, k // 5)] *= 6
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group_size).int()
    packed, scales, zeros = pack_int4(w, group_size, symmetric, g_idx=g_idx)
    move = lambda t: None if t is None else t.cuda()  # noqa: E731
    return move(packed), scales.to(scale_dtype).cuda(), move(zeros), move(g_idx)


def _x(seed: int, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


def _call(x, packed, scales, zeros, g_idx, bias, group_size, out=None) -> Call:
    m, n = x.shape[0], packed.shape[1]
    if out is None:
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    return Call(x, packed, scales, zeros, g_idx, bias, group_size, out)


def _reference(call: Call) -> torch.Tensor:
    return int4_gemm(call.x, call.packed, call.scales, call.zeros, group_size=call.group_size,
                     g_idx=call.g_idx, bias=call.bias, backend="reference")


def _check(call: Call, config: dict, what: str = "") -> None:
    call.out.fill_(float("nan"))
    RUN(call, config)
    torch.cuda.synchronize()
    reason = compare("out", call.out, _reference(call), TOLERANCE[call.x.dtype])
    assert reason is None, (reason, config, what)


# (M, N, K, group_size, symmetric, act_order, bias, scale dtype): every group size with both
# schemes; M through 1, 3, 17, 129; N = 200 (no multiple of 64, 128 or 256) and 72; K tails
# (288 = 2 x 128 + 32, 264 per channel = 33 x 8, 200 = 3 x 64 + 8 per channel).
SHAPES = [
    (1, 200, 256, 32, False, False, False, FP32), (3, 72, 256, 32, True, False, True, FP32),
    (17, 200, 256, 64, False, False, False, FP32), (129, 72, 256, 64, True, False, False, FP32),
    (1, 200, 512, 128, False, False, True, FP32), (3, 200, 512, 128, True, False, False, FP32),
    (17, 72, 512, 256, False, False, False, FP32), (129, 200, 512, 256, True, False, True, FP32),
    (1, 72, 264, -1, False, False, False, FP32), (17, 200, 200, -1, True, False, True, FP32),
    (3, 200, 288, 32, False, True, False, FP32), (129, 72, 512, 128, True, True, True, FP32),
    (17, 200, 256, 64, False, True, False, FP16), (5, 72, 288, 32, False, False, True, BF16),
    (1, 200, 256, 128, True, False, False, FP16),
]


def _shape_id(s: tuple) -> str:
    m, n, k, gs, sym, act, bias, sdt = s
    return (f"M{m}-N{n}-K{k}-g{gs}-{'sym' if sym else 'zp'}{'-act' if act else ''}"
            f"{'-bias' if bias else ''}-s{str(sdt).removeprefix('torch.')}")


@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_every_config_matches_the_reference(shape, dtype):
    m, n, k, group_size, symmetric, act, with_bias, scale_dtype = shape
    packed, scales, zeros, g_idx = _weights(m + n + k, n, k, group_size, symmetric, act,
                                            scale_dtype)
    x = _x(m, m, k, dtype)
    bias = None
    if with_bias:  # float32 for one dtype, x's dtype for the other
        bias = torch.randn(n, device="cuda").to(FP32 if dtype == BF16 else dtype)
    call = _call(x, packed, scales, zeros, g_idx, bias, group_size)
    for config in _all_configs():
        _check(call, config)


@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize(("group_size", "act", "scale_dtype"), [
    (32, False, FP32), (64, True, FP32), (128, False, FP16), (256, False, BF16),
    (-1, False, FP32),
], ids=str)
def test_one_hot_x_gives_the_dequantised_weight_exactly(group_size, act, scale_dtype, dtype):
    """x = rows of the identity (in a shuffled order): each output element is one weight times
    1 plus zeros, exact in float32, so the output is dequantize_int4's weight bit for bit: any
    slip in the fragment layouts, the k and column permutations or the dequantisation shows."""
    n, k = 72, 256
    packed, scales, zeros, g_idx = _weights(7, n, k, group_size, False, act, scale_dtype)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(8))
    x = torch.eye(k, dtype=dtype)[perm].cuda()
    want = dequantize_int4(packed, scales, zeros, group_size=group_size, g_idx=g_idx,
                           dtype=dtype).t()[perm.cuda()]
    call = _call(x, packed, scales, zeros, g_idx, None, group_size)
    for config in _all_configs():
        call.out.fill_(float("nan"))
        RUN(call, config)
        torch.cuda.synchronize()
        assert torch.equal(call.out.view(torch.int16), want.view(torch.int16)), config


@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize(("group_size", "symmetric", "act", "scale_dtype"), [
    (32, False, False, FP32), (64, True, True, FP32), (128, False, True, FP16),
    (256, True, False, BF16), (-1, False, False, FP32),
], ids=str)
def test_dequantize_kernel_is_the_reference_bit_for_bit(group_size, symmetric, act,
                                                        scale_dtype, dtype):
    """csrc's dequant.cu writes dequantize_int4's weight (transposed) exactly, into a padded
    buffer whose other columns it must leave alone."""
    n, k = 200, 512
    packed, scales, zeros, g_idx = _weights(11, n, k, group_size, symmetric, act, scale_dtype)
    want = dequantize_int4(packed, scales, zeros, group_size=group_size, g_idx=g_idx,
                           dtype=dtype).t()
    w = _poisoned(torch.empty(k, n, device="cuda", dtype=dtype), 8)
    _cuda._module().dequantize(packed, scales, zeros, g_idx, w, group_size,
                               torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(w.view(torch.int16), want.view(torch.int16))
    assert w.as_strided((k, 8), (w.stride(0), 1), n).isnan().all()


def _poisoned(t: torch.Tensor, extra_cols: int) -> torch.Tensor:
    """``t`` as the left columns of a wider buffer whose other columns are NaN (or the largest
    integer): a kernel reading past them shows in the result."""
    fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
    wide = torch.full((t.shape[0], t.shape[1] + extra_cols), fill, dtype=t.dtype,
                      device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


@needs_gpu
@pytest.mark.parametrize("layout", ["padded-rows", "column-major", "odd-offset"])
def test_strided_and_misaligned_inputs_are_served(layout):
    """Padded rows (x: K + 24, weight, scales, zeros: N + 8 columns of poison) are read in
    place; column-major x and an x at an odd element offset go through a copy; a transposed
    out through a temporary."""
    m, n, k, group_size = 17, 200, 256, 64
    packed, scales, zeros, _ = _weights(21, n, k, group_size, False, False)
    x = _x(22, m, k, BF16)
    if layout == "padded-rows":
        xv = _poisoned(x, 24)
        args = (_poisoned(packed, 8), _poisoned(scales, 8), _poisoned(zeros, 8))
        assert all(_cuda._fits(t, 4, 16) for t in (xv, args[0], args[1]))
    elif layout == "column-major":
        xv, args = x.t().contiguous().t(), (packed, scales, zeros)
    else:
        flat = torch.empty(m * k + 1, dtype=BF16, device="cuda")
        flat[1:] = x.reshape(-1)
        xv, args = flat[1:].view(m, k), (packed, scales, zeros)
    out = torch.empty(n, m, dtype=BF16, device="cuda").t()
    for config in _all_configs():
        call = _call(xv, *args, None, None, group_size, out=out)
        _check(call, config, layout)


@needs_gpu
def test_nan_poisoned_workspace_is_never_read():
    """The caching allocator hands the split workspace out of blocks freshly filled with NaN
    bits: every partial sum is written before the reduction reads it."""
    packed, scales, zeros, _ = _weights(31, 200, 1024, 128, False, False)
    call = _call(_x(32, 33, 1024, BF16), packed, scales, zeros, None, None, 128)
    for config in _all_configs():
        if config["impl"] == "dequant":  # no split workspace (its temporary is the weight)
            continue
        for split in (2, 5, 8, 64):
            poison = [torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")
                      for size in (1 << 16, 1 << 18, 1 << 20) for _ in "ab"]
            del poison
            _check(call, dict(config, split_k=split))


@needs_gpu
def test_non_finite_x_stays_in_its_row():
    packed, scales, zeros, _ = _weights(33, 72, 256, 32, False, False)
    x = _x(34, 9, 256, FP16)
    x[4, 5] = float("nan")
    x[6, 100] = float("inf")
    call = _call(x, packed, scales, zeros, None, None, 32)
    for config in _all_configs():
        RUN(call, config)
        torch.cuda.synchronize()
        clean = [0, 1, 2, 3, 5, 7, 8]
        assert torch.isfinite(call.out[clean]).all(), config
        assert not torch.isfinite(call.out[4]).any() and not torch.isfinite(call.out[6]).any()


@needs_gpu
def test_results_are_deterministic():
    packed, scales, zeros, g_idx = _weights(35, 256, 2048, 128, False, True)
    call = _call(_x(36, 16, 2048, BF16), packed, scales, zeros, g_idx, None, 128)
    for config in _all_configs():
        RUN(call, config)
        first = call.out.clone()
        for _ in range(3):
            RUN(call, config)
            assert torch.equal(call.out, first), config


@needs_gpu
def test_graph_replay_follows_new_inputs():
    """One capture per config (the split workspace from the graph's pool), replayed after x
    changed in place: nothing is planned from host-side data."""
    packed, scales, zeros, _ = _weights(37, 200, 1024, 128, True, False)
    x = _x(38, 5, 1024, BF16)
    bias = torch.randn(200, device="cuda")
    call = _call(x, packed, scales, None, None, bias, 128)
    for config in _all_configs():
        RUN(call, config)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            RUN(call, config)
        x.copy_(torch.randn(x.shape, device="cuda").to(BF16))
        call.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        reason = compare("out", call.out, _reference(call), TOLERANCE[BF16])
        assert reason is None, (reason, config)


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_benchmark_shapes_match_the_reference(m):
    """bench/bench_int4_gemm.py's shapes (N = K = 8192, g128 zero-point, bf16) with the default
    config, and the 16-row tiles' neighbours for decode."""
    packed, scales, zeros, _ = _weights(39, 8192, 8192, 128, False, False)
    call = _call(_x(40, m, 8192, BF16), packed, scales, zeros, None, None, 128)
    problem = Problem.of(torch.device("cuda", torch.cuda.current_device()), BF16, m=m, n=8192,
                         k=8192, group_size=128, zero_point=True, act_order=False, bias=False,
                         scale_dtype=FP32)
    cfgs = _cuda.configs(problem)
    for config in cfgs[:1] if m > 16 else cfgs:
        _check(call, config)


@needs_gpu
def test_public_function_dispatches_to_the_backend():
    packed, scales, zeros, g_idx = _weights(41, 200, 512, 64, False, True)
    x = _x(42, 6, 512, BF16).reshape(2, 3, 512)
    bias = torch.randn(200, device="cuda").to(BF16)
    kw = dict(group_size=64, g_idx=g_idx, bias=bias)
    got = int4_gemm(x, packed, scales, zeros, backend=BACKEND, **kw)
    want = int4_gemm(x, packed, scales, zeros, backend="reference", **kw)
    assert got.shape == (2, 3, 200)
    assert compare("out", got, want, TOLERANCE[BF16]) is None
    empty = int4_gemm(x[:0], packed, scales, zeros, backend=BACKEND, **kw)
    assert empty.shape == (0, 3, 200)


@needs_gpu
def test_group_sizes_are_all_served():
    """The full table: every group size, both schemes, through the default config."""
    for group_size, symmetric in itertools.product(GROUP_SIZES, (False, True)):
        packed, scales, zeros, _ = _weights(43, 72, 512, group_size, symmetric, False)
        call = _call(_x(44, 3, 512, FP16), packed, scales, zeros, None, None, group_size)
        problem = Problem.of(torch.device("cuda", torch.cuda.current_device()), FP16, m=3,
                             n=72, k=512, group_size=group_size, zero_point=not symmetric,
                             act_order=False, bias=False, scale_dtype=FP32)
        _check(call, _cuda.configs(problem)[0], f"g{group_size}")


# ---- dispatch (any machine: the device is pretended) -----------------------------------------


@pytest.mark.parametrize(("m", "cap", "rocm", "first"), [
    (1, (9, 0), False, "cuda"), (16, (9, 0), False, "cuda"), (16, (8, 0), False, "cuda"),
    (17, (9, 0), False, "triton"), (255, (9, 0), False, "triton"),  # Triton's fused kernel
    (256, (9, 0), False, "cuda"), (4096, (8, 0), False, "cuda"),  # csrc's dequantisation
    (1, (7, 5), False, "triton"), (1, (9, 0), True, "triton"),
])
def test_dispatch_prefers_the_cuda_kernel_for_decode(monkeypatch, m, cap, rocm, first):
    """On NVIDIA sm_80+ the csrc backend leads up to PREFER_MAX_M rows and from
    DEQUANT_MIN_M (it measured faster there on an H100), Triton between; ROCm and older GPUs
    keep the static order."""
    monkeypatch.setattr(_cuda, "capability", lambda index: cap)
    monkeypatch.setattr(_cuda, "is_rocm", lambda: rocm)
    problem = _problem(m=m)
    assert _cuda.prefer(problem) == (("cuda",) if first == "cuda" else ())
    assert _cuda.prefer(_problem("cpu", m=m)) == ()
    preferred_rows = m <= _cuda.PREFER_MAX_M or m >= _cuda.DEQUANT_MIN_M
    assert preferred_rows == (first == "cuda") or cap < (8, 0) or rocm
