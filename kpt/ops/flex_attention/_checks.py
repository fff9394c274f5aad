"""The rules every ``score_mod`` / ``mask_mod`` must follow, checked before any backend runs.

Mods are *elementwise*: ``score_mod(score, b, h, q_idx, kv_idx)`` returns one score and
``mask_mod(b, h, q_idx, kv_idx)`` one bool per element, computed from that element's arguments
only. torch's ``flex_attention`` enforces this by calling them under ``vmap`` on 0-d tensors;
kpt's backends call them in other ways (the Triton generator traces them with proxies, the
reference calls them on broadcast index tensors), and a mod that breaks the rule used to fail
differently on each: a reduction or slice in ``score_mod`` broadcast over the whole score tensor
on the reference (uniform attention, no error) and was refused by the Triton path, branching
on a traced value gave the reference an obscure "Boolean value of Tensor ... is ambiguous".

:func:`check_mods` gives every backend the same verdict, from what is cheapest to know:

* a mod the Triton tracer translated is elementwise by construction (its IR has only
  elementwise nodes); only the kind of its result is checked (a bool score, a non-bool mask);
* a mod that branches on a traced value (or turns one into a Python number) is rejected from
  its trace, :class:`~._codegen.DataDependentError`;
* any other mod (one the tracer cannot translate: ``torch.erf``, ``.sum()``, a slice) is
  *probed*: called once on a small grid of broadcast tensors whose four sizes differ, then on
  single elements of that grid; its result must broadcast to the grid and agree with the
  per-element calls. A probe passed is remembered per mod code (:func:`._codegen.code_key`),
  so it costs one small evaluation per mod, not per call.

A mod that captures tensors is also called at the ends of the call's index ranges
(:func:`_check_bounds`): a table shorter than the positions it is indexed with (document ids,
slopes per head) is refused, where the kernels would read its missing entries as 0.

Violations raise ``TypeError`` (the result's type or dtype) or ``ValueError`` (shape,
cross-element dependence, control flow, a captured table too short) naming ``flex_attention``
and the rule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _codegen

OP = "flex_attention"
SCORE_MOD = "score_mod"
MASK_MOD = "mask_mod"
RULE = ("score_mod(score, b, h, q_idx, kv_idx) and mask_mod(b, h, q_idx, kv_idx) must be "
        "elementwise: called with broadcastable tensors they return one value per element, "
        "computed from that element's arguments only (no reduction, slicing, or Python "
        "branching on them)")

# The probe grid (batch, heads, queries, keys): four different sizes above 1, so that a result
# which lost, reduced or swapped a dimension has a shape that does not broadcast back, and a
# reduction to one value differs from the elements it summarises.
PROBE = (2, 3, 5, 7)
# Grid elements the mod is also called on alone (b, h, q, kv positions in the grid): every
# coordinate of each dimension appears, queries before and after keys, both corners.
POINTS = ((0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 4, 0), (1, 0, 0, 6), (0, 2, 2, 3), (1, 1, 3, 1),
          (0, 0, 1, 5), (1, 2, 3, 2))
# A probed score must equal its per-element value within this tolerance: the same elementwise
# op on one element and on a whole tensor may take scalar and vectorised code paths that differ
# in the last bits (a few float32 ulps); a cross-element result (a sum, a max, a neighbour's
# score) differs by far more, since the probe scores are distinct by at least ~0.01.
PROBE_RTOL = 1e-4
PROBE_ATOL = 1e-5
# Errors real tensors raise for Python control flow or conversions on a multi-element value.
_CONTROL_FLOW_ERRORS = ("Boolean value of Tensor with more than one value is ambiguous",
                        "only one element tensors can be converted to Python scalars",
                        "only integer tensors of a single element can be converted to an index",
                        "elements cannot be converted to Scalar")
_CHECKED_LIMIT = 1024
_CHECKED: dict[tuple, None] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Sizes:
    """The index ranges a call evaluates mods over, and the score dtype (the reference's).

    ``nominal``: the ranges are not the call's (torch.compile plans a call before its sizes
    are known): the probe then uses index 0 everywhere, in range of any captured tensor, so it
    still sees reductions and slices of the score but not of the indices; a later eager call
    probes again with real ranges."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    device: torch.device
    score_dtype: torch.dtype = torch.float32
    nominal: bool = False

    @classmethod
    def unknown(cls, device: torch.device, score_dtype: torch.dtype) -> Sizes:
        return cls(1, 1, 1, 1, device, score_dtype, nominal=True)


def check_mods(translation: _codegen.Translation, score_mod: Callable | None,
               mask_mod: Callable | None, sizes: Sizes | None) -> None:
    """Raise unless ``score_mod`` and ``mask_mod`` (either may be None) follow :data:`RULE`.

    ``translation`` is ``_codegen.translate(score_mod, mask_mod)``; ``sizes`` the ranges to
    probe untranslated mods over (None: no probe, only the checks that need no tensors).
    """
    if translation.reason is None:
        if translation.score_ir is not None:
            _check_kind(SCORE_MOD, translation.score_ir[1])
        if translation.mask_ir is not None:
            _check_kind(MASK_MOD, translation.mask_ir[1])
        for which, fn in ((SCORE_MOD, score_mod), (MASK_MOD, mask_mod)):
            if fn is not None:
                _check_bounds(which, fn, sizes)
        return
    for which, fn in ((SCORE_MOD, score_mod), (MASK_MOD, mask_mod)):
        if fn is not None:
            check_mod(which, fn, sizes)


def check_mod(which: str, fn: Callable, sizes: Sizes | None) -> None:
    """Raise unless one mod (``which`` is ``"score_mod"`` or ``"mask_mod"``) follows
    :data:`RULE`; see the module docstring for how."""
    if not callable(fn):
        raise TypeError(f"{OP}: {which} must be callable, got {type(fn).__name__}")
    _check_bounds(which, fn, sizes)  # (remembered per sizes: not in the verdict below)
    code = _codegen.code_key(fn)
    key = None
    if code is not None:
        key = (which, code, None if sizes is None else
               (sizes.device.type, sizes.score_dtype, sizes.nominal))
        if key in _CHECKED:
            return
    names = _codegen.SCORE_ARGS if which == SCORE_MOD else _codegen.MASK_ARGS
    try:
        ir = _codegen.trace(fn, names, _codegen._Trace())
    except _codegen.DataDependentError as err:
        raise ValueError(_control_flow(which, str(err))) from None
    except _codegen.TraceError:
        ir = None
    if ir is not None:
        _check_kind(which, ir[1])
    elif sizes is None:
        return  # not probed: nothing to remember
    else:
        _probe(which, fn, sizes)
    if key is not None:
        with _LOCK:
            if len(_CHECKED) >= _CHECKED_LIMIT:
                _CHECKED.pop(next(iter(_CHECKED)))
            _CHECKED[key] = None


# ---- captured tensors: indexed in range ------------------------------------------------------

_BOUNDS_CHECKED: dict[tuple, None] = {}


def _captured(fn: Any, depth: int = 0) -> list[Tensor]:
    """The tensors a mod reads from its closure or globals (through the functions it calls,
    such as ``and_masks`` of ``document``)."""
    if not callable(fn) or depth > 4:
        return []
    code = getattr(fn, "__code__", None)
    values = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
              if _filled(c)]
    if code is not None:
        values += [fn.__globals__[n] for n in code.co_names if n in fn.__globals__]
    found = []
    for value in values:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [t for v in value for t in _captured_nested(v, depth)]
        elif callable(value) and not isinstance(value, type):
            found += _captured(value, depth + 1)
    return found


def _captured_nested(value: Any, depth: int) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    return _captured(value, depth + 1) if callable(value) else []


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _check_bounds(which: str, fn: Callable, sizes: Sizes | None) -> None:
    """A mod that reads a captured tensor (document ids, prefix lengths per batch) must
    index it in range at every position of the call: called at the corners of the index
    ranges (first and last batch, head, query and key), where per-position tables are
    indexed at their ends. Short tables give an IndexError in eager code (the reference,
    create_block_mask) but read as 0 in generated kernels, so they are refused for all.
    Checked where the tensors are on the CPU (or with KPT_CHECK=1): on a GPU an index out of
    range is a device-side assert, not an exception. Remembered per mod code, sizes and the
    captured tensors' shapes."""
    from kpt.ops._common import check_content

    if sizes is None or sizes.nominal or min(sizes.batch, sizes.heads, sizes.q_len,
                                             sizes.kv_len) <= 0:
        return
    if sizes.device.type != "cpu" and not check_content():
        return  # (before walking the mod: this runs on every call)
    tensors = _captured(fn)
    if not tensors or any(t.device.type != "cpu" for t in tensors) and not check_content():
        return
    code = _codegen.code_key(fn)
    key = None if code is None else (
        which, code, tuple((tuple(t.shape), t.device) for t in tensors),
        (sizes.batch, sizes.heads, sizes.q_len, sizes.kv_len, sizes.device))
    if key is not None and key in _BOUNDS_CHECKED:
        return
    dev = sizes.device
    ends = [torch.tensor([0, n - 1], device=dev) for n in
            (sizes.batch, sizes.heads, sizes.q_len, sizes.kv_len)]
    args = tuple(t.view([2 if d == i else 1 for d in range(4)]) for i, t in enumerate(ends))
    if which == SCORE_MOD:
        args = (torch.zeros((2, 2, 2, 2), dtype=sizes.score_dtype, device=dev), *args)
    with torch.no_grad():
        _call(which, fn, args, f"at the ends of its index ranges (B={sizes.batch}, "
              f"H={sizes.heads}, Q_LEN={sizes.q_len}, KV_LEN={sizes.kv_len}): every tensor it "
              f"captures must cover every position it indexes")
    if key is not None:
        with _LOCK:
            if len(_BOUNDS_CHECKED) >= _CHECKED_LIMIT:
                _BOUNDS_CHECKED.pop(next(iter(_BOUNDS_CHECKED)))
            _BOUNDS_CHECKED[key] = None


# ---- messages ---------------------------------------------------------------------------------


def _control_flow(which: str, detail: str) -> str:
    """``detail`` starts with "data-dependent ...": what the mod did with a traced value."""
    return f"{OP}: {which}: {detail}; no backend runs that. {RULE}"


def _check_kind(which: str, kind: str) -> None:
    """The result kind of a traced mod: ``"f"`` float, ``"i"`` integer, ``"b"`` bool."""
    _check_dtype(which, {"f": torch.float32, "i": torch.int64, "b": torch.bool}[kind])


def _check_dtype(which: str, dtype: torch.dtype) -> None:
    if which == MASK_MOD:
        if dtype != torch.bool:
            raise TypeError(f"{OP}: mask_mod must return bool (True = attend), got "
                            f"{str(dtype).removeprefix('torch.')}; compare explicitly, e.g. "
                            "`ids[q_idx] == ids[kv_idx]` or `value != 0`")
        return
    if dtype == torch.bool:
        raise TypeError(f"{OP}: score_mod must return a score (a float or integer value), got "
                        "bool; a mask belongs in the block mask's mask_mod (create_block_mask)")
    if dtype.is_complex:
        raise TypeError(f"{OP}: score_mod must return a real score, got "
                        f"{str(dtype).removeprefix('torch.')}")


# ---- the probe --------------------------------------------------------------------------------


def _spread(n: int, limit: int) -> Tensor:
    """``n`` int64 indices spread over ``[0, limit)`` (repeated when ``limit < n``)."""
    return torch.linspace(0, max(limit - 1, 0), n, dtype=torch.float64).round().long()


def _as_tensor(which: str, value: Any, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, int, float)):
        return torch.tensor(value, device=device)
    raise TypeError(f"{OP}: {which} must return a tensor (or a Python number), got "
                    f"{type(value).__name__}")


def _call(which: str, fn: Callable, args: tuple[Tensor, ...], what: str) -> Tensor:
    """``fn(*args)`` as a tensor; errors become ones that name the op, the mod and the rule."""
    try:
        value = fn(*args)
    except Exception as err:  # noqa: BLE001 - re-raised with what the call was, chained
        message = str(err)
        if any(text in message for text in _CONTROL_FLOW_ERRORS):
            detail = (f"data-dependent Python control flow or conversion to a Python number "
                      f"({type(err).__name__}: {message.splitlines()[0]}); use torch.where or "
                      "& | ~ instead")
            raise ValueError(_control_flow(which, detail)) from err
        shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in
                           zip(_codegen.SCORE_ARGS[which == MASK_MOD:], args))
        raise ValueError(f"{OP}: {which} raised {type(err).__name__}: {message} when called "
                         f"{what} ({shapes}); {RULE}") from err
    return _as_tensor(which, value, args[0].device)


def _probe(which: str, fn: Callable, sizes: Sizes) -> None:
    """Call ``fn`` on the :data:`PROBE` grid and on its :data:`POINTS` alone (see the module
    docstring); raise when the results break :data:`RULE`."""
    if min(sizes.batch, sizes.heads, sizes.q_len, sizes.kv_len) <= 0:
        return  # nothing is evaluated
    dev = sizes.device
    nb, nh, nq, nkv = PROBE
    b = _spread(nb, sizes.batch).view(nb, 1, 1, 1).to(dev)
    h = _spread(nh, sizes.heads).view(1, nh, 1, 1).to(dev)
    q_idx = _spread(nq, sizes.q_len).view(1, 1, nq, 1).to(dev)
    kv_idx = _spread(nkv, sizes.kv_len).view(1, 1, 1, nkv).to(dev)
    # Distinct scores in [-4, 4): the fractional parts of multiples of the golden ratio.
    count = nb * nh * nq * nkv
    golden = (torch.arange(count, dtype=torch.float64) * 0.6180339887498949).remainder(1.0)
    score = (golden * 8 - 4).to(sizes.score_dtype).view(PROBE).to(dev)
    grid_args = (b, h, q_idx, kv_idx) if which == MASK_MOD else (score, b, h, q_idx, kv_idx)
    with torch.no_grad():
        out = _call(which, fn, grid_args, "on broadcast tensors")
        _check_dtype(which, out.dtype)
        try:
            fits = torch.broadcast_shapes(out.shape, PROBE) == PROBE
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{OP}: {which} returned shape {tuple(out.shape)} for arguments "
                             f"that broadcast to {PROBE}; {RULE}")
        grid = out.expand(PROBE)
        singles = []
        for point in POINTS:
            i, j, m, n = point
            one = (b[i], h[:, j], q_idx[:, :, m], kv_idx[..., n])
            args = tuple(t.reshape(1, 1, 1, 1) for t in one)
            if which == SCORE_MOD:
                args = (score[i, j, m, n].reshape(1, 1, 1, 1), *args)
            value = _call(which, fn, args, "on one element")
            if value.numel() != 1:
                raise ValueError(f"{OP}: {which} returned shape {tuple(value.shape)} for "
                                 f"one element; {RULE}")
            singles.append(value.reshape(()).to(grid.dtype))
        index = tuple(torch.tensor(c, device=dev) for c in zip(*POINTS))
        expected, got = grid[index], torch.stack(singles)
        if which == MASK_MOD or not grid.is_floating_point():
            same = expected == got
        else:
            same = torch.isclose(expected.double(), got.double(), rtol=PROBE_RTOL,
                                 atol=PROBE_ATOL, equal_nan=True)
        if not bool(same.all()):
            k = int((~same).nonzero()[0, 0])
            coords = dict(zip(("b", "h", "q_idx", "kv_idx"),
                              (int(t.reshape(-1)[c]) for t, c in
                               zip((b, h, q_idx, kv_idx), POINTS[k]))))
            where = ", ".join(f"{name}={value}" for name, value in coords.items())
            raise ValueError(f"{OP}: {which} is not elementwise: at ({where}) it gives "
                             f"{got[k].item()!r} when called on that element alone but "
                             f"{expected[k].item()!r} when called on the whole tensor (a "
                             f"reduction, slice or other mix of elements); {RULE}")


def forget() -> None:
    """Forget which mods passed (tests)."""
    with _LOCK:
        _CHECKED.clear()


__all__ = ["RULE", "Sizes", "check_mods", "check_mod", "forget"]
