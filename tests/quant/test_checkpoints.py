"""from_gptq / from_awq against the formats' published bit layouts: known integer codes, zero
points and scales are packed here by an independent packer written from the layout
descriptions (python ints, one nibble at a time), converted, and dequantize_int4 must give
exactly (q - z) * s."""

from __future__ import annotations

import pytest
import torch

from kpt.ops import dequantize_int4, int4_gemm
from kpt.quant import from_awq, from_gptq, gptq_int4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i holds column 8c + AWQ_ORDER[i]


def _word(nibbles: list[int]) -> int:
    """Eight 4-bit values, nibble j at bits 4j, as a signed int32 value."""
    value = 0
    for j, v in enumerate(nibbles):
        assert 0 <= v <= 15
        value |= v << (4 * j)
    return value - (1 << 32) if value >= 1 << 31 else value


def _words(rows: list[list[list[int]]]) -> torch.Tensor:
    return torch.tensor([[_word(nib) for nib in row] for row in rows], dtype=torch.int32)


def pack_gptq_qweight(q: list[list[int]]) -> torch.Tensor:
    """q[n][k] -> (K // 8, N): word [i, n] holds q[n][8i + j] at nibble j."""
    n, k = len(q), len(q[0])
    return _words([[[q[c][8 * i + j] for j in range(8)] for c in range(n)]
                   for i in range(k // 8)])


def pack_columns(z: list[list[int]], order: list[int]) -> torch.Tensor:
    """z[r][n] -> (R, N // 8): word [r, c] holds z[r][8c + order[j]] at nibble j (GPTQ qzeros:
    order 0..7; AWQ qweight (rows = K) and qzeros: AWQ_ORDER)."""
    return _words([[[row[8 * c + order[j]] for j in range(8)] for c in range(len(row) // 8)]
                   for row in z])


def _expected(q, z, s, g_idx) -> torch.Tensor:
    """(N, K) float32 (q - z[g(k)]) * s[g(k)] from the plain integer lists."""
    qt, zt = torch.tensor(q), torch.tensor(z)
    g = g_idx.long()
    return (qt - zt[g].t()).float() * s.float()[g].t()


def _case(n: int, k: int, group_size: int, seed: int, zero_low: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size < 0 else k // group_size
    q = torch.randint(0, 16, (n, k), generator=gen).tolist()
    z = torch.randint(zero_low, 16, (groups, n), generator=gen).tolist()
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half()
    return q, z, s


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size, act_order", [(32, False), (32, True), (128, True),
                                                   (-1, False)])
def test_from_gptq_exact(checkpoint_format, group_size, act_order):
    n, k = 24, 256
    q, z, s = _case(n, k, group_size, seed=group_size + act_order,
                    zero_low=1 if checkpoint_format == "gptq" else 0)
    groups = len(z)
    contiguous = torch.arange(k) // group_size if group_size > 0 else torch.zeros(k, dtype=int)
    if act_order:
        g_idx = contiguous[torch.randperm(k, generator=torch.Generator().manual_seed(5))]
    else:
        g_idx = contiguous
    g_idx = g_idx.to(torch.int32)
    stored = [[v - 1 for v in row] for row in z] if checkpoint_format == "gptq" else z
    qweight, qzeros = pack_gptq_qweight(q), pack_columns(stored, list(range(8)))
    assert qweight.shape == (k // 8, n) and qzeros.shape == (groups, n // 8)

    out = from_gptq(qweight, qzeros, s, g_idx, bits=4, group_size=group_size, sym=False,
                    checkpoint_format=checkpoint_format)
    assert out.zeros.dtype == torch.uint8 and out.scales.dtype == torch.float16
    assert (out.g_idx is None) == (not act_order)  # the stored contiguous g_idx is dropped
    w = dequantize_int4(out.packed, out.scales, out.zeros, group_size=group_size,
                        g_idx=out.g_idx)
    assert torch.equal(w, _expected(q, z, s, g_idx))


def test_from_gptq_symmetric():
    n, k, gs = 16, 64, 32
    q, _, s = _case(n, k, gs, seed=7)
    z = [[8] * n for _ in range(k // gs)]
    for fmt, stored in (("gptq", 7), ("gptq_v2", 8)):
        qzeros = pack_columns([[stored] * n for _ in range(k // gs)], list(range(8)))
        out = from_gptq(pack_gptq_qweight(q), qzeros, s, None, group_size=gs, sym=True,
                        checkpoint_format=fmt)
        assert out.zeros is None and out.g_idx is None
        w = dequantize_int4(out.packed, out.scales, None, group_size=gs)
        assert torch.equal(w, _expected(q, z, s, torch.arange(k) // gs))


def test_from_gptq_refuses():
    n, k, gs = 16, 64, 32
    q, z, s = _case(n, k, gs, seed=8)
    qweight = pack_gptq_qweight(q)
    wrapped = pack_columns([[15] + row[1:] for row in z], list(range(8)))  # v1 zero 0 -> 15
    with pytest.raises(ValueError, match="from_gptq: .*zero point 16"):
        from_gptq(qweight, wrapped, s, group_size=gs, sym=False)
    qzeros = pack_columns([[min(v, 14) for v in row] for row in z], list(range(8)))
    with pytest.raises(ValueError, match="from_gptq: sym=True"):
        from_gptq(qweight, qzeros, s, group_size=gs, sym=True)
    with pytest.raises(ValueError, match="from_gptq: only bits=4"):
        from_gptq(qweight, qzeros, s, bits=8, group_size=gs, sym=False)
    with pytest.raises(ValueError, match="from_gptq: qzeros"):
        from_gptq(qweight, qzeros, s, group_size=16 * 2 * 2, sym=False)
    with pytest.raises(ValueError, match="from_gptq: g_idx"):
        from_gptq(qweight, qzeros, s, torch.full((k,), 2, dtype=torch.int32), group_size=gs,
                  sym=False)
    with pytest.raises(ValueError, match="from_gptq: checkpoint_format"):
        from_gptq(qweight, qzeros, s, group_size=gs, sym=False, checkpoint_format="v1")


@pytest.mark.parametrize("group_size", [32, 128])
def test_from_awq_exact(group_size):
    n, k = 32, 128
    q, z, s = _case(n, k, group_size, seed=11 + group_size)
    qt = [list(col) for col in zip(*q)]  # (K, N): AWQ packs along N
    qweight, qzeros = pack_columns(qt, AWQ_ORDER), pack_columns(z, AWQ_ORDER)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // group_size, n // 8)
    out = from_awq(qweight, qzeros, s, group_size=group_size)
    assert out.g_idx is None and out.packed.shape == (k // 8, n)
    w = dequantize_int4(out.packed, out.scales, out.zeros, group_size=group_size)
    assert torch.equal(w, _expected(q, z, s, torch.arange(k) // group_size))
    x = torch.randn(3, k).half()
    torch.testing.assert_close(
        int4_gemm(x, *out[:3], group_size=group_size, backend="reference"),
        (x.float() @ w.half().float().t()).half())


def test_from_awq_interleave_matters():
    # A code that differs per column in one word tells AWQ's order from the plain one.
    q = [[c] * 8 for c in range(8)]  # column c holds code c everywhere; N = 8, K = 8
    qweight = pack_columns([list(col) for col in zip(*q)], AWQ_ORDER)
    assert int(qweight[0, 0]) == _word(AWQ_ORDER)
    s = torch.ones(1, 8, dtype=torch.float16)
    out = from_awq(qweight, pack_columns([[0] * 8], AWQ_ORDER), s, group_size=-1)
    w = dequantize_int4(out.packed, out.scales, out.zeros, group_size=-1)
    assert torch.equal(w[:, 0], torch.arange(8.0))


def test_from_awq_refuses():
    qweight = torch.zeros(64, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="from_awq: scales"):
        from_awq(qweight, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 8), 32)
    with pytest.raises(ValueError, match="from_awq: K=64 is not a multiple"):
        from_awq(qweight, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 16), 128)


def test_gptq_result_round_trips_through_gptq_format():
    """kpt's own GPTQ output written out as a v1 GPTQ checkpoint comes back bit for bit."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    q = gptq_int4(w, x, 32, act_order=True)
    z = q.zeros.long()
    assert int(z.min()) >= 1  # v1 cannot store zero point 0
    qzeros = pack_columns((z - 1).tolist(), list(range(8)))
    out = from_gptq(q.packed, qzeros, q.scales, q.g_idx, group_size=32, sym=False)
    assert torch.equal(out.packed, q.packed) and torch.equal(out.zeros, q.zeros)
    assert torch.equal(out.g_idx, q.g_idx)
