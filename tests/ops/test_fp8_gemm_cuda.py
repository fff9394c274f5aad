"""fp8_gemm's CUDA/HIP backends (``kpt.ops.fp8_gemm._cuda``, kernels in ``csrc/fp8_gemm``).

On any machine: reasons and configs (the default tile and K split by M, per device), the tile
tables against the kernels' instantiations, the launcher against the binding and the C header,
the layout rules for reading operands in place, the fp8 -> fp16 widening of the sm_80 path on
every code, the mma.sync fragment addressing of ``gemm_mma.cu`` against the PTX ISA's fragment
layouts, that every csrc/fp8_gemm kernel is in the compile checks, and the registration.

On a GPU: every config of every implementation (mma tiles, K splits, the portable tiles the
HIP build runs, the sm_90a wgmma kernel on Hopper) against the reference on odd M 1/3/17/129,
N and K that are not multiples of the tiles, every pair of granularities, e4m3 and e5m2, bias
of every dtype and every output dtype; strided, transposed and misaligned operands, broadcast
scales, a non-contiguous output; NaN-poisoned output and workspace; a NaN scale staying in its
block; determinism; CUDA graph replay on new inputs; the benchmark's shapes; dispatch.

Registry-level behaviour (validation, the Triton kernel) is test_fp8_gemm.py's, which also runs
every registered kernel backend against the reference where it can run.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from kpt.jit import csrc_dir
from kpt.ops import fp8_gemm, quantize_fp8
from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.fp8_gemm import SPEC, W_BLOCK, Call, _cuda
from tests.ops.jit_backends import forward_arguments, unusable

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_IDS = {E4M3: "e4m3", E5M2: "e5m2"}
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
OUT_DTYPES = [BF16, FP16, FP32]
GRAN_PAIRS = list(itertools.product(("tensor", "row", "block"), repeat=2))
GRAN_IDS = [f"{a}x{w}" for a, w in GRAN_PAIRS]
# mma and simt against the reference: the same exact fp8 products (float32 holds every product
# of two fp8 values, and the f16 mma path's products are exact too) summed in another order, the
# scales applied at another point: float32 rounding only (~1e-7 norm-wise at these K), so 1e-5;
# a rounded output may then differ by one unit where the float32 values straddle a rounding
# boundary, norm-wise far less, so one unit (bf16 2^-8, fp16 2^-11).
TOLERANCE = {FP32: 1e-5, BF16: 2**-8, FP16: 2**-11}
# sm90: Hopper's fp8 wgmma keeps about 14 mantissa bits while it accumulates inside one
# instruction chain (DeepGEMM's measurement); the kernel promotes every 128-wide k-tile into
# float32, which bounds that to a few 2^-14 relative per k-tile partial: 2^-10 norm-wise leaves
# a 4x margin. The rounded outputs keep their one unit, which is larger.
SM90_TOLERANCE = {FP32: 2**-10, BF16: 2**-8, FP16: 2**-10}


def _problem(device: str = "cuda", **dims) -> Problem:
    base = dict(m=4096, n=8192, k=8192, a_granularity="block", w_granularity="block",
                out_dtype=BF16, bias=False)
    return Problem.of(torch.device(device, 0), E4M3, **(base | dims))


# ---- reasons and configs (any machine) -------------------------------------------------------


@pytest.mark.parametrize("dims", [dict(), dict(m=0), dict(m=1, n=16, k=16),
                                  dict(a_granularity="tensor", w_granularity="row"),
                                  dict(k=272, n=144, bias=True, out_dtype=FP32)], ids=str)
def test_supported_problems(dims):
    assert _cuda.supports(_problem(**dims)) == []


def test_unsupported_problems_say_why():
    assert "multiples of 16" in _cuda.supports(_problem(n=40))[0]
    assert "exceeds the grid" in _cuda.supports(_problem(m=2**40, n=2**16))[0]


H100 = ((9, 0), 132, 227 * 1024)
A100 = ((8, 0), 108, 163 * 1024)
ADA = ((8, 9), 128, 99 * 1024)


@pytest.fixture
def device(monkeypatch):
    """Pretends to be one GPU (capability, SMs, shared memory) with the sm_90a build usable."""
    def use(info, sm90_ok=True):
        monkeypatch.setattr(_cuda, "device_info", lambda index: info)
        monkeypatch.setattr(_cuda, "sm90_unavailable", lambda: None if sm90_ok else "no")
        monkeypatch.setattr(_cuda, "is_rocm", lambda: False)
    return use


@pytest.mark.parametrize(("m", "tile"), [(1, (16, 64)), (16, (16, 64)), (17, (64, 64)),
                                         (64, (64, 64)), (65, (64, 128)), (128, (64, 128)),
                                         (129, (128, 128)), (8192, (128, 128))])
def test_default_mma_tile_follows_m(device, m, tile):
    device(A100)
    first = _cuda.configs(_problem(m=m))[0]
    assert first["impl"] == "mma" and (first["block_m"], first["block_n"]) == tile


@pytest.mark.parametrize(("m", "impl"), [(16, "mma"), (64, "mma"), (65, "sm90"), (4096, "sm90")])
def test_hopper_runs_the_wgmma_kernel_above_64_rows(device, m, impl):
    device(H100)
    cfgs = _cuda.configs(_problem(m=m))
    assert cfgs[0]["impl"] == impl
    assert {"impl": "sm90", "block_m": 128, "block_n": 128, "split_k": 1} in cfgs
    device(H100, sm90_ok=False)
    assert all(c["impl"] == "mma" for c in _cuda.configs(_problem(m=m)))


def test_no_wgmma_kernel_off_hopper(device):
    for info in (A100, ADA):
        device(info)
        assert all(c["impl"] == "mma" for c in _cuda.configs(_problem(m=4096)))


def test_tiles_fit_the_device_shared_memory(device):
    device(((8, 9), 128, 64 * 1024))  # a part with 64 KiB per block: two mma tiles fit
    cfgs = _cuda.configs(_problem(m=4096))
    assert {(c["block_m"], c["block_n"]) for c in cfgs} == {(16, 64), (64, 64)}
    assert (cfgs[0]["block_m"], cfgs[0]["block_n"]) == (64, 64)


@pytest.mark.parametrize(("n", "k", "split"), [
    (8192, 8192, 1),    # 128 tiles of 16 x 64 cover 132 SMs
    (4096, 14336, 3),   # 64 tiles: three splits of the 112 k-tiles
    (1024, 8192, 8),    # 16 tiles: 9 wanted, as equal splits 8 of 8 k-tiles
    (256, 8192, 16),    # 4 tiles: the most splits
    (256, 256, 1),      # 2 k-tiles: nothing to split
])
def test_decode_k_split_fills_the_sms(device, n, k, split):
    device(H100)
    first = _cuda.configs(_problem(m=16, n=n, k=k))[0]
    assert (first["block_m"], first["split_k"]) == (16, split)


def test_configs_differ_and_are_instantiated(device):
    device(H100)
    for m in (0, 1, 16, 100, 4096):  # M = 0: configs are asked for before the empty launch
        cfgs = _cuda.configs(_problem(m=m, n=1024))
        assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
        for c in cfgs:
            assert (c["block_m"], c["block_n"]) in _cuda.TILES[c["impl"]]
            assert 1 <= c["split_k"] <= _cuda.MAX_SPLIT_K
            assert c["split_k"] == 1 or c["impl"] == "mma"


def test_rocm_gets_the_portable_tiles(monkeypatch):
    monkeypatch.setattr(_cuda, "is_rocm", lambda: True)
    for m in (1, 16, 4096):
        cfgs = _cuda.configs(_problem(m=m))
        assert {c["impl"] for c in cfgs} == {"simt"}
        assert {(c["block_m"], c["block_n"]) for c in cfgs} == set(_cuda.TILES["simt"])


def test_unknown_tiles_and_splits_are_rejected_before_any_build():
    with pytest.raises(ValueError, match="no 'mma' tile 32 x 64"):
        _cuda._tile({"block_m": 32, "block_n": 64}, "mma")
    with pytest.raises(ValueError, match="no 'sm90' tile 64 x 64"):
        _cuda._tile({"block_m": 64, "block_n": 64}, "sm90")
    with pytest.raises(ValueError, match="split_k = 2"):
        _cuda._tile({"block_m": 16, "block_n": 64, "split_k": 2}, "simt")
    with pytest.raises(ValueError, match="split_k = 17"):
        _cuda._tile({"block_m": 16, "block_n": 64, "split_k": 17}, "mma")
    assert _cuda._tile({"block_m": 128, "block_n": 128}, "sm90") == (128, 128, 1)


def test_operands_read_in_place_only_as_16_byte_chunks():
    t = torch.zeros(4, 64, dtype=torch.uint8)
    assert _cuda._chunked(t)
    assert not _cuda._chunked(t.view(-1)[1:129].view(2, 64))  # base off by one byte
    assert not _cuda._chunked(torch.zeros(4, 72, dtype=torch.uint8)[:, :64])  # 72-byte rows
    assert _cuda._chunked(torch.zeros(4, 80, dtype=torch.uint8)[:, :64])  # 80-byte rows
    assert not _cuda._chunked(torch.zeros(64, 4, dtype=torch.uint8).t())  # transposed
    assert not _cuda._chunked(torch.zeros(1, 64, dtype=torch.uint8).expand(3, 64))
    copy = _cuda._plain(t.view(-1)[1:129].view(2, 64))
    assert _cuda._chunked(copy) and copy.is_contiguous()
    assert _cuda._plain(t) is t
    assert _cuda._writable(torch.zeros(3, 16))
    assert not _cuda._writable(torch.zeros(16, 3).t())
    assert not _cuda._writable(torch.zeros(3, 17)[:, :16])  # odd row stride


def _cpu_call(m=3, n=16, k=32) -> Call:
    a8 = torch.randn(m, k).to(E4M3)
    w8 = torch.randn(n, k).to(E4M3)
    return Call(a8, w8, torch.ones(1, 1), torch.ones(1, 1), "tensor", "tensor", None,
                torch.empty(m, n))


def test_run_needs_gpu_tensors_and_skips_empty_calls():
    with pytest.raises(ValueError, match="needs GPU tensors"):
        _cuda.run_cuda(_cpu_call(), {"block_m": 16, "block_n": 64})
    _cuda.run_cuda(_cpu_call(m=0), {})  # nothing built, nothing launched
    _cuda.run_hip(_cpu_call(m=0), {})


# ---- the launcher, the binding, the header and the kernels agree (any machine) ----------------


def _binding_text() -> str:
    return (csrc_dir() / "fp8_gemm" / "binding.cpp").read_text()


def test_launcher_passes_every_binding_argument_in_order():
    """The binding first compiles on a GPU machine: check here that the launcher's call has as
    many positional arguments as the binding declares, and the C++ signature the same."""
    text = _binding_text()
    args, names = forward_arguments(_cuda, text)
    assert args == len(names) == 14
    signature = text[text.index("void forward("):]
    assert signature[: signature.index(")")].count(",") + 1 == len(names)


def _header() -> str:
    return (csrc_dir() / "include" / "kpt" / "fp8_gemm.h").read_text()


def test_python_codes_match_the_header():
    header = _header()
    for name, code in _cuda.GRANULARITIES.items():
        assert re.search(rf"KPT_FP8_GEMM_{name.upper()} = {code}\b", header), name
    for name, code in _cuda.IMPLS.items():
        assert re.search(rf"KPT_FP8_GEMM_IMPL_{name.upper()} = {code}\b", header), name
    assert f"#define KPT_FP8_GEMM_MAX_SPLIT_K {_cuda.MAX_SPLIT_K}" in header
    assert f"#define KPT_FP8_GEMM_SCALE_K {_cuda.SCALE_K}" in header
    from kpt.ops.fp8_gemm import ALIGN
    assert f"#define KPT_FP8_GEMM_ALIGN {ALIGN}" in header


def test_tile_tables_match_the_kernels():
    mma = (csrc_dir() / "fp8_gemm" / "gemm_mma.cu").read_text()
    launched = re.findall(r"launch_tile<kFmt, kBlock, (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)>",
                          mma)
    tiles = {(int(bm), int(bn)): (int(bm) + int(bn)) * 128 * int(st)
             for bm, bn, _wm, _wn, st, _min in launched}
    assert set(tiles) == set(_cuda.TILES["mma"])
    assert tiles == _cuda.MMA_SMEM  # shared memory: stages x (block_m + block_n) rows of 128 B
    simt = (csrc_dir() / "fp8_gemm" / "gemm_simt.cu").read_text()
    assert {int(bm) for bm in re.findall(r"launch_tile<kFmt, (\d+)>", simt)} == {
        bm for bm, _ in _cuda.TILES["simt"]}
    assert "constexpr int kBN = 64;" in simt
    sm90 = (csrc_dir() / "fp8_gemm" / "gemm_sm90.cu").read_text()
    assert "constexpr int kBlockM = 128;" in sm90 and "constexpr int kBlockN = 128;" in sm90
    assert _cuda.TILES["sm90"] == ((128, 128),)


def test_every_kernel_is_compile_checked():
    """tests/jit/test_compile_kernels.py compiles every csrc/*/*.cu for sm_90a, sm_80 (nvcc)
    and gfx90a (hipcc) whenever the compilers are present: the wgmma kernel declares sm_90a
    only, the others every target."""
    from tests.jit.test_compile_kernels import KERNELS, declared_targets

    files = sorted((csrc_dir() / "fp8_gemm").glob("*.cu"))
    assert set(files) <= set(KERNELS)
    declared = {p.name: declared_targets(p.read_text()) for p in files}
    assert declared.pop("gemm_sm90.cu") == ("sm_90a",)
    assert set(declared) == {"api.cu", "errors.cu", "gemm_mma.cu", "gemm_simt.cu"}
    assert all(d is None for d in declared.values())
    for spec in (_cuda.SPEC, _cuda.SM90_SPEC):
        assert all((csrc_dir() / s).is_file() for s in spec.sources)
    assert "fp8_gemm/gemm_sm90.cu" not in _cuda.SPEC.sources  # sm_90a only: its own build


def test_backends_are_registered():
    cuda, hip = SPEC.backend("cuda"), SPEC.backend("hip")
    assert (cuda.rocm, cuda.min_capability, hip.rocm) == (False, (8, 0), True)
    assert cuda.dtypes == hip.dtypes == {E4M3, E5M2}
    order = SPEC.priority["cuda"]
    assert order.index("triton") < order.index("cuda") < order.index("reference")
    assert "hip" in order


# ---- the fp8 -> fp16 widening and the fragment addressing (any machine) ----------------------


def _codes() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32)


def test_e5m2_codes_are_the_top_byte_of_fp16():
    """common.cuh's widen_e5m2: a code over a zero byte is the fp16 of the same value."""
    half = (_codes() << 8).to(torch.int16).view(FP16).float()
    want = _codes().to(torch.uint8).view(E5M2).float()
    assert torch.equal(half.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(half[ok], want[ok])


def test_e4m3_widening_gives_value_over_256():
    """common.cuh's widen_e4m3 (sm_80 mma path, the portable tiles): (x & 0x8000) | ((x >> 1)
    & 0x3f80) of x = code << 8 is the fp16 of value / 2^8, exactly, subnormals included; the
    NaN codes become +-1.875 (which the portable tiles test for)."""
    x = _codes() << 8
    bits = (x & 0x8000) | ((x >> 1) & 0x3F80)
    half = bits.to(torch.int16).view(FP16).float() * 256
    want = _codes().to(torch.uint8).view(E4M3).float()
    nan = want.isnan()
    assert nan.sum() == 2 and torch.equal(half[~nan], want[~nan])
    assert half[nan].abs().tolist() == [480.0, 480.0]


def _swz(row: int, chunk: int) -> int:
    """gemm_mma.cu's swz: chunk c of row r at c ^ (r % 8)."""
    return row * 128 + ((chunk ^ (row & 7)) << 4)


def _ldmatrix_x4(owner: dict, addresses: list[int]) -> list[list[list]]:
    """PTX ldmatrix.m8n8.x4.b16: lane l gives the address of row l % 8 of matrix l / 8; lane l
    receives, of each matrix j, 32-bit word l % 4 of row l / 4 (here: the 4 byte owners)."""
    regs = [[None] * 4 for _ in range(32)]
    for lane in range(32):
        for j in range(4):
            row_addr = addresses[8 * j + lane // 4]
            regs[lane][j] = [owner[row_addr + 4 * (lane % 4) + b] for b in range(4)]
    return regs


@pytest.mark.parametrize("tile", _cuda.TILES["mma"], ids=str)
def test_mma_fragments_hold_the_elements_the_ptx_layout_names(tile):
    """gemm_mma.cu's ldmatrix addressing, modelled byte by byte on a swizzled stage: the
    registers of every lane must be mma.m16n8k32's 8-bit fragments (PTX ISA, "Matrix
    Fragments for mma.m16n8k32"): A reg i: row g + 8 (i % 2), k 4t + b + 16 (i // 2);
    B reg i: n g, k 4t + b + 16 i (g = lane / 4, t = lane % 4, b the byte)."""
    bm, bn = tile
    warps = {(16, 64): (1, 4), (64, 64): (2, 2), (64, 128): (2, 4), (128, 128): (2, 4)}[tile]
    wm_count, wn_count = warps
    tm, tn = bm // wm_count, bn // wn_count
    # Who owns each byte of the stage: ("a", row, k) or ("w", row, k), as cp.async writes it.
    owner = {}
    for r in range(bm + bn):
        for chunk in range(8):
            for b in range(16):
                owner[_swz(r, chunk) + b] = ("a", r, chunk * 16 + b) if r < bm else \
                    ("w", r - bm, chunk * 16 + b)
    for wm, wn, s in itertools.product(range(wm_count), range(wn_count), range(4)):
        for mi in range(tm // 16):
            addrs = [_swz(wm * tm + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                          2 * s + (lane >> 4)) for lane in range(32)]
            regs = _ldmatrix_x4(owner, addrs)
            for lane, i, b in itertools.product(range(32), range(4), range(4)):
                g, t = lane // 4, lane % 4
                want = ("a", wm * tm + mi * 16 + g + 8 * (i % 2),
                        32 * s + 4 * t + b + 16 * (i // 2))
                assert regs[lane][i][b] == want
        for ni in range(0, tn // 8, 2):
            addrs = [_swz(bm + wn * tn + ni * 8 + (lane & 7) + (lane >> 4) * 8,
                          2 * s + ((lane >> 3) & 1)) for lane in range(32)]
            regs = _ldmatrix_x4(owner, addrs)
            for lane, i, b in itertools.product(range(32), range(4), range(4)):
                g, t = lane // 4, lane % 4
                # Registers 0, 1: b0, b1 of n8 block ni; 2, 3: of block ni + 1.
                want = ("w", wn * tn + (ni + i // 2) * 8 + g, 32 * s + 4 * t + b + 16 * (i % 2))
                assert regs[lane][i][b] == want


def test_sm80_k16_slots_pair_a_and_b_alike():
    """gemm_mma.cu's make_a / make_b on sm_80: code b of a lane's word stands for f16 slot
    2t + b (b < 2) or 2t + 8 + b - 2 in both operands, so every k16 slot pairs the A and B
    elements of one k: the two f16 mmas compute the k32 dot product exactly."""
    def a_slots(t):  # f16 A regs {lo(a0), lo(a1), hi(a0), hi(a1)}: row g slots per code
        return {0: 2 * t, 1: 2 * t + 1, 2: 2 * t + 8, 3: 2 * t + 9}

    def b_slots(t):  # f16 B regs {lo(b0), hi(b0)}
        return {0: 2 * t, 1: 2 * t + 1, 2: 2 * t + 8, 3: 2 * t + 9}

    for t in range(4):
        for code in range(4):
            assert a_slots(t)[code] == b_slots(t)[code]
    slots = sorted(a_slots(t)[c] for t in range(4) for c in range(4))
    assert slots == list(range(16))


# ---- on a GPU --------------------------------------------------------------------------------


needs_gpu = pytest.mark.skipif(unusable(_cuda) is not None, reason=str(unusable(_cuda)))
HOPPER = torch.cuda.is_available() and torch.version.hip is None and \
    torch.cuda.get_device_capability() == (9, 0)
RUN = _cuda.run_hip if torch.version.hip else _cuda.run_cuda


def _configs_under_test() -> list[dict]:
    if torch.version.hip:
        return [{"impl": "simt", "block_m": bm, "block_n": bn} for bm, bn in _cuda.TILES["simt"]]
    out = [{"impl": "mma", "block_m": bm, "block_n": bn, "split_k": 1}
           for bm, bn in _cuda.TILES["mma"]]
    out += [{"impl": "mma", "block_m": 16, "block_n": 64, "split_k": s} for s in (2, 3)]
    out += [{"impl": "mma", "block_m": 64, "block_n": 128, "split_k": 2}]
    out += [{"impl": "simt", "block_m": bm, "block_n": bn} for bm, bn in _cuda.TILES["simt"]]
    if HOPPER:
        out.append({"impl": "sm90", "block_m": 128, "block_n": 128})
    return out


CONFIGS = _configs_under_test() if torch.cuda.is_available() else [{"impl": "mma"}]


def _config_id(c: dict) -> str:
    return f"{c['impl']}-{c.get('block_m')}x{c.get('block_n')}-k{c.get('split_k', 1)}"


def _tolerance(config: dict, out_dtype: torch.dtype) -> float:
    return (SM90_TOLERANCE if config["impl"] == "sm90" else TOLERANCE)[out_dtype]


def _operands(seed: int, m: int, n: int, k: int, a_gran: str, w_gran: str,
              dtype: torch.dtype = E4M3):
    """Quantised random activations (rows of different magnitudes) and weight on the GPU;
    scales as 2-D tensors (a per-tensor scale as a (1, 1) view), as fp8_gemm passes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, generator=gen, device="cuda") * \
        torch.exp(torch.randn(m, 1, generator=gen, device="cuda"))
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.05
    a8, sa = quantize_fp8(a, a_gran, dtype)
    w8, sw = quantize_fp8(w, w_gran, dtype, block=W_BLOCK if w_gran == "block" else None)
    bias = torch.randn(n, generator=gen, device="cuda")
    sa, sw = (s.reshape(1, 1) if s.dim() == 0 else s for s in (sa, sw))
    return a8, w8, sa, sw, bias


def _call(a8, w8, sa, sw, a_gran, w_gran, bias=None, out_dtype=BF16, out=None) -> Call:
    if out is None:
        out = torch.full((a8.shape[0], w8.shape[0]), float("nan"), device="cuda",
                         dtype=out_dtype)
    return Call(a8, w8, sa, sw, a_gran, w_gran, bias, out)


def _reference(call: Call) -> torch.Tensor:
    from kpt.ops.fp8_gemm import reference

    return reference.forward(call)  # float32, before the output rounding


def _check(call: Call, config: dict, tol: float | None = None) -> None:
    RUN(call, config)
    torch.cuda.synchronize()
    want = _reference(call)
    if call.out.dtype != FP32:
        want = want.to(call.out.dtype).float()
    reason = compare("out", call.out, want, tol or _tolerance(config, call.out.dtype))
    assert reason is None, (reason, config)


M_SIZES = [1, 3, 17, 129]
NK_SIZES = [(48, 144), (144, 400), (272, 1040)]


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=FP8_IDS.get)
@pytest.mark.parametrize("a_gran,w_gran", GRAN_PAIRS, ids=GRAN_IDS)
def test_every_config_matches_the_reference(config, dtype, a_gran, w_gran):
    """Odd M, and N / K that are not multiples of any tile (K = 400, 1040: a partial last
    k-tile, 4 and 9 k-tiles for the splits); bias and output dtype vary with the case."""
    for index, (m, (n, k)) in enumerate(itertools.product(M_SIZES, NK_SIZES)):
        a8, w8, sa, sw, bias = _operands(index, m, n, k, a_gran, w_gran, dtype)
        out_dtype = OUT_DTYPES[index % 3]
        bias = bias.to(OUT_DTYPES[(index // 3) % 3]) if index % 2 else None
        _check(_call(a8, w8, sa, sw, a_gran, w_gran, bias, out_dtype), config)


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, *OUT_DTYPES], ids=str)
def test_bias_and_out_dtypes(config, out_dtype, bias_dtype):
    a8, w8, sa, sw, bias = _operands(3, 37, 144, 272, "block", "row")
    bias = None if bias_dtype is None else bias.to(bias_dtype)
    _check(_call(a8, w8, sa, sw, "block", "row", bias, out_dtype), config)


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_many_tiles_and_partial_groups(config):
    """M = 1000, N = 1040: several groups of 8 tile rows, the last one partial, and a last
    column of tiles half outside N."""
    for grans in (("tensor", "tensor"), ("block", "block")):
        a8, w8, sa, sw, bias = _operands(5, 1000, 1040, 528, *grans)
        _check(_call(a8, w8, sa, sw, *grans, bias, FP32), config)


def _poisoned(x: torch.Tensor, pad: int, offset: int = 0) -> torch.Tensor:
    """``x`` as a strided view inside a NaN-filled buffer (NaN in x's dtype, fp8 included),
    starting ``offset`` elements past an aligned address."""
    buf = torch.full((x.shape[0] + 2 * pad, x.shape[1] + 3 * pad + offset), float("nan"),
                     device=x.device).to(x.dtype)
    view = buf[pad:pad + x.shape[0], 2 * pad + offset:2 * pad + offset + x.shape[1]]
    view.copy_(x)
    return view


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_strided_transposed_and_misaligned_operands(config):
    """Operands inside NaN buffers (16-byte aligned rows: read in place; one element off:
    copied), transposed (copied), broadcast and strided scales and bias, a transposed output
    (written through a temporary): the results are those of the contiguous call, exactly."""
    for a_gran, w_gran in (("row", "block"), ("block", "tensor"), ("tensor", "row")):
        a8, w8, sa, sw, bias = _operands(7, 33, 144, 400, a_gran, w_gran)
        want = _call(a8, w8, sa, sw, a_gran, w_gran, bias, FP32)
        RUN(want, config)
        variants = [
            (_poisoned(a8, 16), _poisoned(w8, 16)),
            (_poisoned(a8, 16, offset=1), _poisoned(w8, 16, offset=3)),
            (a8.T.contiguous().T, w8.T.contiguous().T),
        ]
        scales = [(s if s.numel() == 1 else _poisoned(s, 1)) for s in (sa, sw)]
        if a_gran == "row":  # one scale broadcast over the rows: stride 0
            scales[0] = sa[:1].expand_as(sa)
            want.a_scale = scales[0]
            RUN(want, config)
        bias_view = torch.full((3 * 144,), float("nan"), device="cuda")[::3]
        bias_view.copy_(bias)
        for a_v, w_v in variants:
            for out in (torch.full((33, 144), float("nan"), device="cuda"),
                        torch.full((144, 33), float("nan"), device="cuda").T):
                got = _call(a_v, w_v, *scales, a_gran, w_gran, bias_view, out=out)
                RUN(got, config)
                torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_nan_poisoned_workspace_is_never_read(config):
    """The caching allocator hands out blocks freshly filled with 0xff bytes (NaN in float32):
    a K split's partial tiles and every output element must be written before they are read."""
    a8, w8, sa, sw, bias = _operands(9, 17, 1040, 1040, "block", "block")
    for _ in range(2):
        poison = [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda")
                  for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24) for _ in "ab"]
        del poison
        _check(_call(a8, w8, sa, sw, "block", "block", bias, FP32), config)


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_a_nan_scale_stays_in_its_block(config):
    """A block holding a NaN gets a NaN scale (quantize_fp8): its row of the output is NaN,
    every other row finite."""
    a = torch.randn(5, 400, device="cuda")
    a[2, 130] = float("nan")
    a8, sa = quantize_fp8(a, "block")
    _, w8, _, sw, _ = _operands(11, 5, 144, 400, "block", "block")
    call = _call(a8, w8, sa, sw, "block", "block", None, FP32)
    RUN(call, config)
    assert torch.isnan(call.out[2]).all() and torch.isfinite(call.out[[0, 1, 3, 4]]).all()


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_results_are_deterministic(config):
    a8, w8, sa, sw, bias = _operands(13, 129, 272, 2064, "row", "row")
    call = _call(a8, w8, sa, sw, "row", "row", bias, FP32)
    RUN(call, config)
    first = call.out.clone()
    for _ in range(3):
        RUN(call, config)
        assert torch.equal(call.out, first)


@needs_gpu
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_graph_replay_reads_new_inputs(config):
    """One capture (workspace from the graph's pool), replayed after a8 and its scales changed
    in place: nothing is planned from values on the host."""
    a8, w8, sa, sw, bias = _operands(15, 40, 272, 1040, "block", "block")
    call = _call(a8, w8, sa, sw, "block", "block", bias, BF16)
    RUN(call, config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        RUN(call, config)
    new_a8, _, new_sa, _, _ = _operands(16, 40, 272, 1040, "block", "block")
    a8.copy_(new_a8)
    sa.copy_(new_sa)
    call.out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = _reference(call).to(BF16).float()
    assert compare("out", call.out, want, _tolerance(config, BF16)) is None


@needs_gpu
def test_empty_m_launches_nothing():
    a8, w8, sa, sw, _ = _operands(17, 0, 32, 32, "row", "row")
    for config in CONFIGS:
        call = _call(a8, w8, sa, sw, "row", "row")
        RUN(call, config)
        assert call.out.shape == (0, 32)


@needs_gpu
@pytest.mark.parametrize("case", [
    (8192, 8192, 8192, "tensor"), (8192, 8192, 8192, "row"), (4096, 8192, 8192, "block"),
    (16, 8192, 8192, "tensor"), (16, 8192, 8192, "block"), (16, 4096, 14336, "block"),
], ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}")
def test_benchmark_shapes_with_the_default_config(case):
    """The shapes bench/bench_fp8_gemm.py times, with the default config of each (bf16 out)."""
    m, n, k, gran = case
    a8, w8, sa, sw, _ = _operands(19, m, n, k, gran, gran)
    call = _call(a8, w8, sa, sw, gran, gran, None, BF16)
    problem = Problem.of(torch.device("cuda", torch.cuda.current_device()), E4M3, m=m, n=n,
                         k=k, a_granularity=gran, w_granularity=gran, out_dtype=BF16,
                         bias=False)
    config = _cuda.configs(problem)[0]
    _check(call, config)


@needs_gpu
def test_public_function_dispatches_to_the_backend():
    backend = "hip" if torch.version.hip else "cuda"
    a8, w8, sa, sw, bias = _operands(21, 50, 144, 272, "block", "block")
    got = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=FP16, backend=backend)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=FP16, backend="reference")
    # 50 rows: the mma tiles by default (the wgmma kernel starts above 64 rows).
    assert compare("out", got, want.float(), TOLERANCE[FP16]) is None


@pytest.mark.parametrize(("m", "a", "w", "info", "want"), [
    (4096, "block", "block", H100, ("cuda",)), (65, "block", "block", H100, ("cuda",)),
    (64, "block", "block", H100, ()),             # the mma tiles: Triton led at 16 rows
    (4096, "tensor", "tensor", H100, ()), (4096, "row", "row", H100, ()),  # Triton led
    (4096, "block", "block", A100, ()), (4096, "block", "block", ADA, ()),
])
def test_dispatch_prefers_the_wgmma_kernel_for_block_scales(device, m, a, w, info, want):
    device(info)
    assert _cuda.prefer(_problem(m=m, a_granularity=a, w_granularity=w)) == want
    assert _cuda.prefer(_problem("cpu", m=m)) == ()
    device(H100, sm90_ok=False)  # no sm_90a build: nothing to prefer
    assert _cuda.prefer(_problem(m=4096)) == ()
