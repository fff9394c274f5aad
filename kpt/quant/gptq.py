"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") to kpt's packed int4 format, and the calibration that feeds it.

For an nn.Linear weight W (N, K) and layer inputs X (tokens, K), GPTQ minimises the output
error ``||X W^T - X Wq^T||`` one input column at a time: it quantises column k, then spreads
that column's error over the columns not yet quantised, weighted by the inverse Hessian
``H^-1`` of the layer's squared error, ``H = 2 X^T X / tokens``. Steps, as in the paper:

1. Columns whose ``H[k, k]`` is 0 (an input channel that is always zero) get weight 0 and
   ``H[k, k] = 1``. With ``act_order`` the columns are processed in descending ``diag(H)``
   (most active input channels first; ties keep their order).
2. Dampening: ``H += damp * mean(diag(H)) * I``, so the Cholesky factorisation exists.
3. ``U``: the upper Cholesky factor of ``H^-1``. Row k of U gives the update of the columns
   after k when column k's quantisation error is ``e``: ``W[:, k:] -= (e / U[k, k]) U[k, k:]``.
4. Columns go in blocks of ``block_size``: inside a block the update is applied column by
   column, to the columns after the block once per block (one matrix product; the result is
   the same, the order of the float sums differs).
5. Per-group scales and zero points are computed when a group's first column comes up, from
   the group's current weights (error updates of all earlier columns included). The quantiser
   is kpt's round-to-nearest one (``pack_int4``; ``kpt/ops/int4_gemm/reference.py``), so with a
   diagonal Hessian (no error to spread) GPTQ returns exactly ``pack_int4``'s codes.

Differences from the GPTQ reference code (and GPTQModel/AutoGPTQ):

* Symmetric scales are ``max|w| / 7`` (kpt's ``pack_int4``: the extreme lands on +-7, codes
  hold -8..7), not GPTQ's ``2 max|w| / 15``.
* A group that starts inside a block and reaches past it reads its columns past the block with
  the block's updates so far applied; the reference code reads them without the updates of the
  block's earlier columns (it only matters when group_size does not divide block_size).
* With ``act_order`` groups are runs of ``group_size`` columns in processing order, and
  ``g_idx[k]`` (the group of original column k) records them, as GPTQModel/AutoGPTQ do with
  ``desc_act=True`` (not their ``static_groups`` variant).

``Calibrator`` collects H for a model's Linear layers through forward hooks;
``quantize_model`` runs GPTQ on every one of them (see its docstring for what it simplifies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kpt.ops._common import check_tensor
from kpt.ops.fp8_gemm import GRANULARITIES, W_BLOCK, quantize_fp8
from kpt.ops.fp8_gemm.reference import expand_scale
from kpt.ops.int4_gemm import _check_group_size
from kpt.ops.int4_gemm import reference as _int4

log = logging.getLogger("kpt")

OP = "gptq_int4"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Int4Weight(NamedTuple):
    """A weight in kpt's int4 format (``kpt/ops/int4_gemm/__init__.py``): packed (K // 8, N)
    int32, scales (G, N), zeros (G, N) uint8 or None (symmetric), g_idx (K,) int32 or None
    (contiguous groups). Pass them to ``int4_gemm`` / ``dequantize_int4`` with the
    group_size they were made with."""

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    g_idx: Tensor | None


def hessian_from_inputs(x: Tensor, op: str = "hessian_from_inputs") -> Tensor:
    """``2 X^T X / tokens`` (K, K) float32 of layer inputs ``x`` (..., K), summed in float64."""
    check_tensor(op, "inputs", x, dtypes=_FLOATS)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: inputs must be (..., K) with K > 0, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).double()
    if x2.shape[0] == 0:
        raise ValueError(f"{op}: inputs hold no tokens")
    if not bool(torch.isfinite(x2).all()):
        raise ValueError(f"{op}: inputs must be finite")
    return (2.0 / x2.shape[0] * (x2.t() @ x2)).float()


def _group_params(w: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) float32 (N,) of a group w (N, g): the same float32 operations as
    ``reference.quantize``, so the two agree bit for bit."""
    if symmetric:
        scale = w.abs().amax(1) / 7
        zero = torch.full_like(scale, float(_int4.SYMMETRIC_ZERO))
    else:
        lo = torch.clamp(w.amin(1), max=0.0)
        hi = torch.clamp(w.amax(1), min=0.0)
        scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    return scale, zero


# Clip search (``clip=True``): each group's range shrunk by 0, 5, ..., 20 % (GPTQ's reference
# code searches the same grid with its ``mse`` option), keeping the one whose rounding error
# has the smallest sum of |error|^2.4 per output row.
CLIP_SHRINKS = tuple(i / 20 for i in range(5))
CLIP_NORM = 2.4


def _clipped_group_params(w: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``_group_params`` of the best shrunk range of each row of the group w (N, g)."""
    best_scale, best_zero = _group_params(w, symmetric)
    best_err = None
    for shrink in CLIP_SHRINKS:
        scale, zero = _group_params(w * (1 - shrink), symmetric) if shrink else (best_scale,
                                                                                  best_zero)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
        err = ((q - zero[:, None]) * scale[:, None] - w).abs().pow(CLIP_NORM).sum(1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{OP}: {name} must be a bool, got {value!r}")
    return value


def _hessian_arg(h_or_x: Any, k: int, is_hessian: bool | None, device: torch.device,
                 op: str = OP) -> Tensor:
    check_tensor(op, "hessian_or_inputs", h_or_x, dtypes=_FLOATS, device=device)
    auto = is_hessian is None
    if auto:
        is_hessian = h_or_x.dim() == 2 and tuple(h_or_x.shape) == (k, k)
    if not is_hessian:
        if h_or_x.dim() == 0 or h_or_x.shape[-1] != k:
            what = f"the (K, K) = ({k}, {k}) Hessian or " if auto else ""
            raise ValueError(f"{op}: hessian_or_inputs must be {what}(..., K={k}) inputs, got "
                             f"shape {tuple(h_or_x.shape)}")
        return hessian_from_inputs(h_or_x, op)
    if tuple(h_or_x.shape) != (k, k):
        raise ValueError(f"{op}: the Hessian must be (K, K) = ({k}, {k}), got shape "
                         f"{tuple(h_or_x.shape)}")
    if not bool(torch.isfinite(h_or_x).all()):
        raise ValueError(f"{op}: the Hessian must be finite")
    return h_or_x.float().clone()


def gptq_int4(
    weight: Tensor,
    hessian_or_inputs: Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    *,
    is_hessian: bool | None = None,
    clip: bool = False,
) -> Int4Weight:
    """Quantise an nn.Linear weight (N, K) to 4 bits with GPTQ (algorithm: module docstring).

    Args:
        weight: (N, K) float16, bfloat16, float32 or float64, finite; K a multiple of 8 and of
            group_size.
        hessian_or_inputs: the Hessian ``2 X^T X / tokens`` (K, K), or calibration inputs X
            (..., K) of the layer (the Hessian is then formed in float64). A (K, K) tensor is
            read as a Hessian unless ``is_hessian=False``.
        group_size: 32, 64, 128, 256, or -1 (one group per output channel).
        symmetric: zeros None (implied zero point 8, scale ``max|w| / 7``) instead of uint8
            zero points over ``[min(w, 0), max(w, 0)]``, as ``pack_int4``.
        act_order: process columns in descending ``diag(H)``; groups then follow that order and
            ``g_idx`` records them (None without act_order or with group_size=-1).
        damp: fraction of ``mean(diag(H))`` added to the diagonal, >= 0.
        block_size: columns per lazy-update block, > 0 (speed only; results agree up to float32
            rounding).
        clip: each group's range is the one of CLIP_SHRINKS (its full range shrunk by up to
            20 %) whose rounding error is smallest (sum of |error|^2.4 per output row), instead
            of the full range: outliers then saturate and the rest gets finer steps.

    Returns ``Int4Weight(packed, scales, zeros, g_idx)``: packed (K // 8, N) int32, scales
    (G, N) float32, zeros (G, N) uint8 or None, g_idx (K,) int32 or None, in the original column
    order, ready for ``int4_gemm(x, *result, group_size=group_size)`` (keyword g_idx). Runs
    on weight's device in float32. Raises ValueError when the dampened Hessian is not positive
    definite (raise damp).
    """
    check_tensor(OP, "weight", weight, ndim=2, dtypes=_FLOATS)
    symmetric = _check_flag("symmetric", symmetric)
    act_order = _check_flag("act_order", act_order)
    params_of = _clipped_group_params if _check_flag("clip", clip) else _group_params
    n, k = weight.shape
    if n == 0:
        raise ValueError(f"{OP}: weight has N = 0 output features")
    groups = _check_group_size(OP, group_size, k)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"{OP}: damp must be a number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{OP}: block_size must be a positive int, got {block_size!r}")
    if is_hessian is not None and not isinstance(is_hessian, bool):
        raise TypeError(f"{OP}: is_hessian must be a bool or None, got {is_hessian!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{OP}: weight must be finite")
    h = _hessian_arg(hessian_or_inputs, k, is_hessian, weight.device)
    w, u, perm = _prepare(weight, h, act_order, damp)

    codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
    scales = torch.empty(groups, n, dtype=torch.float32, device=w.device)
    zeros = torch.empty(groups, n, dtype=torch.float32, device=w.device)
    params: list[tuple[Tensor, Tensor]] = []
    if group_size < 0:
        params.append(params_of(w, symmetric))
        scales[0], zeros[0] = params[0]

    def quantize(col: int, column: Tensor, ahead: Callable[[int], Tensor]) -> Tensor:
        if group_size > 0 and col % group_size == 0:
            params[:] = [params_of(ahead(col + group_size), symmetric)]
            scales[col // group_size], zeros[col // group_size] = params[0]
        scale, zero = params[0]
        q = torch.clamp(torch.round(column / scale) + zero, 0, 15)
        codes[:, col] = q.to(torch.int32)
        return (q - zero) * scale

    _solve(w, u, block_size, quantize)
    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if group_size > 0:
            g_idx = (inverse // group_size).to(torch.int32)
    return Int4Weight(_int4.pack(codes), scales,
                      None if symmetric else zeros.to(torch.uint8), g_idx)


def _prepare(weight: Tensor, h: Tensor, act_order: bool, damp: float, op: str = OP
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Steps 1-3 of the module docstring: (w float32 with dead columns zeroed, in processing
    order; U, the upper Cholesky factor of the dampened H^-1; the column order or None)."""
    k = weight.shape[1]
    w = weight.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    h += float(damp) * torch.diagonal(h).mean() * torch.eye(k, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(f"{op}: the dampened Hessian is not positive definite (damp={damp}); "
                         f"raise damp")
    return w, chol, perm


def _solve(w: Tensor, u: Tensor, block_size: int,
           quantize: Callable[[int, Tensor, Callable[[int], Tensor]], Tensor]) -> None:
    """Steps 4-5: the column loop over ``w`` (N, K), in place. ``quantize(col, column, ahead)``
    quantises column ``col`` (its current values ``column``) and returns the dequantised
    column; ``ahead(end)`` gives the current columns ``col .. end - 1``, the updates of every
    earlier column applied (for parameters computed when a group starts)."""
    k = w.shape[1]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j

            def ahead(end: int, j: int = j, col: int = col, i1: int = i1, i2: int = i2,
                      w1: Tensor = w1, err1: Tensor = err1) -> Tensor:
                current = w1[:, j:end - i1]
                if end > i2:  # the columns past the block, with this block's updates
                    beyond = w[:, i2:end] - err1[:, :j] @ u[i1:col, i2:end]
                    current = torch.cat([current, beyond], 1)
                return current

            err = (w1[:, j] - quantize(col, w1[:, j], ahead)) / u1[j, j]
            w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]


def gptq_fp8(
    weight: Tensor,
    hessian_or_inputs: Tensor,
    granularity: str = "row",
    dtype: torch.dtype = torch.float8_e4m3fn,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    *,
    is_hessian: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantise an nn.Linear weight (N, K) to fp8 with GPTQ: the same column loop and error
    feedback as ``gptq_int4``, with fp8's round-to-nearest cast as the quantiser.

    The scales are ``rtn_fp8``'s (``quantize_fp8`` of the unquantised weight: ``amax / fp8
    max`` per output channel, per 128x128 block or for the tensor) and stay fixed; each column
    is divided by its scale, saturated to +-fp8 max and cast, and its rounding error is spread
    over the columns not yet quantised. With a diagonal Hessian the codes are exactly
    ``rtn_fp8``'s. On SmolLM2-135M (tests/integrations/test_quant_quality.py) this takes the
    perplexity cost of fp8 weights from the RTN one to about nothing.

    Args:
        weight: (N, K) float16, bfloat16, float32 or float64, finite.
        hessian_or_inputs, damp, block_size, is_hessian: as ``gptq_int4``.
        granularity: ``"row"``, ``"block"`` (128x128) or ``"tensor"``, as ``rtn_fp8``.
        dtype: torch.float8_e4m3fn or torch.float8_e5m2.
        act_order: process columns in descending ``diag(H)`` (the scales do not depend on
            the order, so the result needs no ``g_idx``).

    Returns ``(w8, w_scale)`` as ``rtn_fp8`` does, for ``fp8_gemm`` and ``FP8Linear``.
    """
    op = "gptq_fp8"
    check_tensor(op, "weight", weight, ndim=2, dtypes=_FLOATS)
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {GRANULARITIES}, got "
                         f"{granularity!r}")
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{op}: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got "
                        f"{dtype!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"{op}: act_order must be a bool, got {act_order!r}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"{op}: weight must be (N, K) with N, K > 0, got {tuple(weight.shape)}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"{op}: damp must be a number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
    if is_hessian is not None and not isinstance(is_hessian, bool):
        raise TypeError(f"{op}: is_hessian must be a bool or None, got {is_hessian!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{op}: weight must be finite")
    h = _hessian_arg(hessian_or_inputs, k, is_hessian, weight.device, op)
    block = W_BLOCK if granularity == "block" else None
    _, scale = quantize_fp8(weight.float(), granularity, dtype, block=block)
    full = (scale if block is None else expand_scale(scale, (n, k), block)).expand(n, k)
    w, u, perm = _prepare(weight, h, act_order, damp, op)
    if perm is not None:
        full = full[:, perm]
    fmax = torch.finfo(dtype).max
    codes = torch.empty(n, k, dtype=dtype, device=w.device)

    def quantize(col: int, column: Tensor, ahead: Callable[[int], Tensor]) -> Tensor:
        codes[:, col] = (column / full[:, col]).clamp(-fmax, fmax).to(dtype)
        return codes[:, col].float() * full[:, col]

    _solve(w, u, block_size, quantize)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale


class Calibrator:
    """Accumulates the GPTQ Hessian ``2 X^T X / tokens`` of a model's nn.Linear layers from the
    inputs they see while the caller runs the model on calibration data::

        with Calibrator(model) as cal:
            for batch in batches:
                model(batch)
        h = cal.hessian("model.layers.0.mlp.down_proj")

    ``modules``: names (as in ``model.named_modules()``) of the Linear layers to watch; None:
    every nn.Linear. Sums ``X^T X`` in ``dtype`` (float64 by default; float32 halves the memory
    and suits devices without float64) on the inputs' device. Hooks are forward hooks, attached
    by ``attach()`` / ``with`` and removed by ``detach()`` / leaving the block.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None, *,
                 dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Calibrator: dtype must be float32 or float64, got {dtype}")
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        if modules is not None:
            wanted = list(modules)
            missing = [name for name in wanted if name not in linears]
            if missing:
                raise ValueError(f"Calibrator: not nn.Linear modules of the model: {missing}")
            linears = {name: linears[name] for name in wanted}
        self.modules: dict[str, nn.Linear] = linears
        self.dtype = dtype
        self._sums: dict[str, Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            xtx = x.t() @ x
            if name in self._sums:
                self._sums[name] += xtx
            else:
                self._sums[name] = xtx
            self._tokens[name] = self._tokens.get(name, 0) + x.shape[0]
        return hook

    def attach(self) -> Calibrator:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                             for name, m in self.modules.items()]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Calibrator:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def tokens(self, name: str) -> int:
        """How many input rows ``name`` has seen."""
        return self._tokens.get(name, 0)

    def hessian(self, name: str) -> Tensor:
        """(K, K) float32 ``2 X^T X / tokens`` of module ``name``."""
        if name not in self.modules:
            raise ValueError(f"Calibrator: {name!r} is not a watched module")
        if not self._tokens.get(name):
            raise ValueError(f"Calibrator: {name!r} has seen no inputs; run the model first")
        return (2.0 / self._tokens[name] * self._sums[name]).float()

    def reset(self) -> None:
        self._sums.clear()
        self._tokens.clear()


def quantize_model(
    model: nn.Module,
    calibrate: Callable[[], object],
    modules: Iterable[str] | None = None,
    *,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    sequential: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Int4Weight]:
    """GPTQ on the model's nn.Linear layers (``modules`` names, or all); ``calibrate()`` runs
    the model on the caller's calibration data (its return value is ignored).

    Each quantised layer's weight is overwritten in place with its dequantised value (fake
    quantisation, in the weight's dtype), and the packed form is returned by module name for
    ``int4_gemm``. ``sequential=True`` quantises the layers one at a time in
    ``named_modules()`` order, calling ``calibrate()`` once per layer, so a layer's Hessian
    comes from inputs that already pass through the quantised layers before it (the paper's
    sequential scheme). ``sequential=False`` calls it once and takes every Hessian from the
    unquantised model.

    Simplifications: the model runs whole for every layer (no caching of a block's inputs, as
    GPTQModel does per decoder layer), so the sequential mode costs one calibration pass per
    layer; ``named_modules()`` order stands for execution order, and a layer registered before
    a layer that feeds it sees that layer unquantised.
    """
    if not isinstance(sequential, bool):
        raise TypeError(f"quantize_model: sequential must be a bool, got {sequential!r}")
    names = list(Calibrator(model, modules).modules)
    options = dict(group_size=group_size, symmetric=symmetric, act_order=act_order, damp=damp,
                   block_size=block_size, is_hessian=True)
    results: dict[str, Int4Weight] = {}
    if not sequential:
        with Calibrator(model, names, dtype=dtype) as cal:
            calibrate()
    for name in names:
        if sequential:
            with Calibrator(model, [name], dtype=dtype) as cal:
                calibrate()
        linear = cal.modules[name]
        with torch.no_grad():
            weight = linear.weight.detach()
            result = gptq_int4(weight, cal.hessian(name).to(weight.device), **options)
            linear.weight.copy_(_int4.dequantize(*result[:3], group_size, result.g_idx,
                                                 weight.dtype))
        results[name] = result
        log.debug("quantize_model: %s (%d x %d) from %d tokens", name, *weight.shape,
                  cal.tokens(name))
    return results


__all__ = ["gptq_int4", "gptq_fp8", "hessian_from_inputs", "Calibrator", "quantize_model",
           "Int4Weight"]
