"""FlexAttention without torch.compile: Python ``score_mod`` / ``mask_mod`` turned into Triton.

Equivalent PyTorch (``torch.nn.attention.flex_attention.flex_attention``; see ``reference.py``)::

    s = (q @ k.transpose(-1, -2)) * scale                     # float32
    s = score_mod(s, b, h, q_idx, kv_idx)                     # elementwise, optional
    s = s.masked_fill(~mask_mod(b, h, q_idx, kv_idx), -inf)   # block_mask.mask_mod, optional
    out = softmax(s, -1) @ v ;  lse = logsumexp(s, -1)        # natural log, like torch

The ``triton`` backend traces the mods into an expression (``_codegen.py``), generates a Triton
kernel module for them (``_triton.py``), caches it by the mods' code, and skips the blocks the
block mask leaves out. A mod it cannot translate is a *reason*: dispatch then runs the
``reference`` backend, which calls the Python mods themselves.

The ``cuda`` / ``hip`` backends run the hand-written flash-attention kernels when the traced
mods are the named ones of :mod:`.mods` (causal, sliding window, ALiBi, soft-cap, prefix-LM,
document masking, or an equivalent lambda; ``_lower.py``), else they give a reason. The
``flash`` backend (``_flash.py``, first on cuda devices) takes the named mods that lower to a
band and a soft-cap only (causal, sliding window, soft-cap, none) and runs them as a
``kpt.ops.flash_attention`` call, through that op's own dispatch and autotuning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import triton_entry, xpu_backend
from kpt.ops._common import (
    check_scale,
    check_tensor,
    lazy,
    module,
    native_backends,
    plain_eager,
    triton_interpreting,
    triton_unavailable,
)
from kpt.ops._registry import Backend, Op, Problem

from . import _checks, _codegen, mods
from . import block_mask as _bm
from . import reference as _reference
from .block_mask import BlockMask, Tables, create_block_mask

OP = "flex_attention"
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
_HALF = frozenset({torch.float16, torch.bfloat16})
_MAX_HEAD_DIM = 256


@dataclass
class Call:
    """A validated forward call: (B, H, S, D) inputs, translated mods, tables and outputs."""

    q: Tensor
    k: Tensor
    v: Tensor
    mods: _codegen.Translation
    tables: Tables
    scale: float
    out: Tensor
    lse: Tensor


@dataclass
class BackwardCall(Call):
    dout: Tensor = None
    dlse: Tensor | None = None
    dq: Tensor = None
    dk: Tensor = None
    dv: Tensor = None

    @functools.cached_property
    def delta(self) -> Tensor:
        """(B, H, Sq) float32, computed on first read: a full pass over dout and out that only
        the backends reading it pay for (``flash`` and ``cuda`` compute their own).

        delta_i = sum_j p_ij dp_ij = dout_i . out_i; an lse gradient adds p_ij * dlse_i to
        ds_ij, which is the same as subtracting it from delta."""
        delta = (self.dout.float() * self.out.float()).sum(-1)
        if self.dlse is not None:
            delta = delta - self.dlse.float()
        return delta.contiguous()


# ---- backends ---------------------------------------------------------------------------------


def _triton_supports(p: Problem) -> list[str]:
    reasons = []
    mods = _codegen.REGISTRY.get(p["mods"])
    if mods is None or mods.reason:
        reasons.append(mods.reason if mods is not None else "mods were not translated")
    elif p["grad"] and mods.grad_reason:
        reasons.append(mods.grad_reason)
    for name in ("block_q", "block_kv"):
        size = p[name]
        if size < 16 or size & (size - 1):
            reasons.append(f"BLOCK_SIZE {size} must be a power of two >= 16 (Triton tiles)")
    if max(p["head_dim"], p["head_dim_v"]) > _MAX_HEAD_DIM:
        reasons.append(f"head dims {p['head_dim']}/{p['head_dim_v']} above {_MAX_HEAD_DIM}")
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


def _mod_fns(mods: _codegen.Translation, buffers: list[Tensor]) -> tuple:
    """Broadcasting score/mask functions for the reference: the traced IR evaluated with this
    call's buffers when the mods were translated (so the kernel and the reference read the same
    tensors), else the Python callables themselves."""
    if mods.reason is not None:
        return mods.score_mod, mods.mask_mod
    score_fn = mask_fn = None
    if mods.score_ir is not None:
        def score_fn(s, b, h, q_idx, kv_idx):
            env = dict(score=s, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx)
            return _codegen.evaluate(mods.score_ir, env, buffers,
                                     float_dtype=torch.promote_types(s.dtype, torch.float32))
    if mods.mask_ir is not None:
        def mask_fn(b, h, q_idx, kv_idx):
            env = dict(b=b, h=h, q_idx=q_idx, kv_idx=kv_idx)
            return _codegen.evaluate(mods.mask_ir, env, buffers)
    return score_fn, mask_fn


def _reference_kwargs(call: Call) -> dict:
    score_fn, mask_fn = _mod_fns(call.mods, call.mods.buffers)
    t = call.tables
    return dict(score_fn=score_fn, mask_fn=mask_fn if t.has_partial else None, scale=call.scale,
                blocks=t.dense(), block_size=(t.block_q, t.block_kv))


def _reference_run(call: Call, _config: dict) -> None:
    out, lse = _reference.attention(call.q, call.k, call.v, **_reference_kwargs(call))
    call.out.copy_(out)
    call.lse.copy_(lse)


BACKENDS = (
    Backend(
        name="flash",
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=_HALF,
        run=lazy(f"{__name__}._flash", "run"),
        available=lazy(f"{__name__}._flash", "unavailable"),
        supports=lazy(f"{__name__}._flash", "supports"),
    ),
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run_cuda",
                     run_hip="run_hip"),
    Backend(
        name="triton",
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=_FLOATS,
        run=lazy(f"{__name__}._triton", "run"),
        available=triton_unavailable,
        supports=_triton_supports,
        configs=lazy(f"{__name__}._triton", "configs"),
    ),
    Backend(
        name="reference",
        device_types=frozenset({"cuda", "cpu", "xla", "xpu", "mps"}),
        dtypes=_FLOATS | {torch.float64},
        run=_reference_run,
    ),
    xla_backend("flex_attention", dtypes=_FLOATS),
    xpu_backend(f"{__name__}._triton", dtypes=_FLOATS, supports=_triton_supports,
                configs="configs"),
)
_BACKWARD = {"flash": lazy(f"{__name__}._flash", "backward"),
             "triton": lazy(f"{__name__}._triton", "backward"),
             "cuda": lazy(f"{__name__}._cuda", "backward"),
             "hip": lazy(f"{__name__}._cuda", "backward"),
             "xla": lazy("kpt.backends.xla.flex_attention", "backward"),
             "xpu": triton_entry(f"{__name__}._triton", "backward")}


def example_problem(device: torch.device, dtype: torch.dtype) -> Problem:
    """The problem of a small causal call (B1 H4 S128 D64), built the way a call builds it:
    what ``python -m kpt.info`` asks every backend about."""
    q = torch.empty(1, 4, 128, 64, device=device, dtype=dtype)
    tables = _bm.normalize(create_block_mask(mods.causal(), 1, None, 128, 128, device=device),
                           1, 4, 128, 128, device)
    translated = _codegen.translate(None, tables.mask_mod if tables.has_partial else None)
    return problem_of(q, q, q, translated, tables, grad=False)


def _bucket(p: Problem) -> str:
    def pow2(n: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(n, 1))))

    return (f"B{p['batch']}-H{p['heads']}/{p['kv_heads']}-q{pow2(p['q_len'])}"
            f"-kv{pow2(p['kv_len'])}-d{p['head_dim']}-bs{p['block_q']}x{p['block_kv']}"
            f"-{p['mods']}{'-grad' if p['grad'] else ''}")


SPEC = Op(
    name=OP,
    backends=BACKENDS,
    priority={
        # flash first: on the H200 flash_attention's tuned forward and its Triton backward
        # (~400 TFLOP/s) beat the generated kernels and the cuda backward (~75 TFLOP/s) on the
        # band / soft-cap mods it takes (bench/RESULTS.md). The generated Triton kernels
        # before the hand-written cuda ones, whose backward is slow. On cpu, flash (explicit
        # backend="flash") runs flash's reference.
        "cuda": ("flash", "triton", "cuda", "hip", "reference"),
        "cpu": ("reference",),
        "xla": ("xla", "reference"),
        "xpu": ("xpu", "reference"),
        "mps": ("reference",),
    },
    bucket=_bucket,
    example=example_problem,
)


@functools.cache
def _lowered_backends() -> tuple[Backend, Backend]:
    """The backends that run lowered mods and need the BlockMask check (``cuda_blocks``)."""
    return SPEC.backend("flash"), SPEC.backend("hip" if torch.version.hip else "cuda")


def problem_of(q: Tensor, k: Tensor, v: Tensor, mods: _codegen.Translation, tables: Tables,
               grad: bool) -> Problem:
    # cuda_blocks: whether the block mask masks more than the lowered named mask, which the
    # flash and cuda/hip kernels cannot express; it reads the tables, so it is decided here,
    # per call (cached per table and captured tensor), and only where those backends can run.
    # Under torch.compile the check would read data (a graph break): None rules the lowered-
    # mods backends out while tracing; the launch inside the custom op decides with real
    # tensors. doc_varlen: whether document ids form contiguous runs (the flash backend runs
    # them as varlen sequences); read from the ids the same way, where flash can run.
    blocks: str | None = ""
    docs: str | None = ""
    if torch.compiler.is_compiling():
        blocks = docs = None
    else:
        runnable = [q.device.type in b.device_types and q.dtype in b.dtypes
                    and SPEC.unavailable(b) is None for b in _lowered_backends()]
        if any(runnable):
            blocks = module(f"{__name__}._cuda").blocks_reason(q, k, mods, tables)
        if runnable[0]:
            docs = module(f"{__name__}._flash").doc_reason(q, k, mods)
    return Problem.of(q.device, q.dtype, batch=q.shape[0], heads=q.shape[1],
                      kv_heads=k.shape[1], q_len=q.shape[2], kv_len=k.shape[2],
                      head_dim=q.shape[3], head_dim_v=v.shape[3], mods=mods.key,
                      block_q=tables.block_q, block_kv=tables.block_kv, grad=grad,
                      kv_batch=k.shape[0], cuda_blocks=blocks, doc_varlen=docs)


# ---- custom ops and autograd ------------------------------------------------------------------


def _tables_of(tables: list[Tensor], block_q: int, block_kv: int, has_partial: bool,
               mask_mod: Callable | None) -> Tables:
    return Tables(*tables, block_q=block_q, block_kv=block_kv, mask_mod=mask_mod,
                  has_partial=has_partial)


def _mods_of(key: str, buffers: list[Tensor]) -> _codegen.Translation:
    t = _codegen.REGISTRY[key]
    if t.reason is not None:
        return t
    return _codegen.Translation(**{**t.__dict__, "buffers": list(buffers)})


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, m: _codegen.Translation, t: Tables,
                  scale: float, backend: str, problem: Problem) -> tuple[Tensor, Tensor]:
    B, H, sq, _ = q.shape
    out = q.new_empty(B, H, sq, v.shape[-1])
    lse = q.new_empty(B, H, sq, dtype=torch.float32)
    SPEC.launch(problem, Call(q, k, v, m, t, scale, out, lse), backend)
    return out, lse


@torch.library.custom_op("kpt::flex_attention", mutates_args=())
def _flex_op(q: Tensor, k: Tensor, v: Tensor, buffers: list[Tensor], tables: list[Tensor],
             block_q: int, block_kv: int, has_partial: bool, scale: float, mods: str,
             backend: str, grad: bool) -> tuple[Tensor, Tensor]:
    t = _tables_of(tables, block_q, block_kv, has_partial, None)
    m = _mods_of(mods, buffers)
    return _forward_impl(q, k, v, m, t, scale, backend, problem_of(q, k, v, m, t, grad))


@_flex_op.register_fake
def _(q, k, v, buffers, tables, block_q, block_kv, has_partial, scale, mods, backend, grad):
    B, H, sq, _ = q.shape
    return q.new_empty(B, H, sq, v.shape[-1]), q.new_empty(B, H, sq, dtype=torch.float32)


def _backward_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                   dlse: Tensor | None, buffers: list[Tensor], tables: list[Tensor],
                   block_q: int, block_kv: int, has_partial: bool, scale: float, mods: str,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    t = _tables_of(tables, block_q, block_kv, has_partial, None)
    m = _mods_of(mods, buffers)
    call = BackwardCall(q, k, v, m, t, scale, out, lse.contiguous(), dout=dout, dlse=dlse,
                        dq=torch.empty_like(q), dk=torch.empty_like(k),
                        dv=torch.empty_like(v))
    config = SPEC.choose(problem_of(q, k, v, m, t, True), backend)[1]
    _BACKWARD[backend](call, config)
    return call.dq, call.dk, call.dv


@torch.library.custom_op("kpt::flex_attention_backward", mutates_args=())
def _flex_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                      dlse: Tensor | None, buffers: list[Tensor], tables: list[Tensor],
                      block_q: int, block_kv: int, has_partial: bool, scale: float, mods: str,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(q, k, v, out, lse, dout, dlse, buffers, tables, block_q, block_kv,
                          has_partial, scale, mods, backend)


@_flex_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, buffers, tables, block_q, block_kv, has_partial, scale,
      mods, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, buffers, tables, block_q, block_kv, has_partial, scale, mods, backend, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables, *buffers)
    ctx.n_tables = len(tables)
    ctx.args = (block_q, block_kv, has_partial, scale, mods, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    tables, buffers = rest[: ctx.n_tables], rest[ctx.n_tables:]
    block_q, block_kv, has_partial, scale, mods, backend = ctx.args
    if backend == "reference":
        # Autograd through the reference: a custom op's body runs below the autograd dispatch
        # key, where it could not record a graph, so this path stays outside the op.
        t = _tables_of(list(tables), block_q, block_kv, has_partial, None)
        call = Call(q, k, v, _mods_of(mods, list(buffers)), t, scale, out, lse)
        dq, dk, dv = _reference.backward(q, k, v, dout, dlse, **_reference_kwargs(call))
    else:
        args = (q, k, v, out, lse, dout.contiguous(), dlse, list(buffers), list(tables),
                *ctx.args)
        # The eager fast path (see flex_attention) also skips the backward op's layers, except
        # under create_graph=True, where the op's missing autograd must stay what is seen.
        if not torch.is_grad_enabled() and plain_eager(*args[:7], *args[7], *args[8]):
            dq, dk, dv = _backward_impl(*args)
        else:
            dq, dk, dv = torch.ops.kpt.flex_attention_backward(*args)
    # The structure must mirror the inputs: lists of tensors get lists of (no) gradients.
    return (dq, dk, dv, [None] * len(buffers), [None] * len(tables), None, None, None, None,
            None, None, None)


_flex_op.register_autograd(_backward, setup_context=_setup_context)


class _FlexFunction(torch.autograd.Function):
    """The custom op's autograd for the eager fast path: the op's arguments (the tables and
    the mods' tensors inside lists), plus the forward's problem and Python objects that the op
    would rebuild; same context and backward as the op."""

    @staticmethod
    def forward(ctx, q, k, v, buffers, tables, block_q, block_kv, has_partial, scale, mods,
                backend, grad, fast):
        # forward(ctx, ...), not setup_context: see flash_attention's _FlashAttentionFunction.
        m, t, problem = fast
        output = _forward_impl(q, k, v, m, t, scale, backend, problem)
        _setup_context(ctx, (q, k, v, buffers, tables, block_q, block_kv, has_partial, scale,
                             mods, backend, grad), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(ctx, dout, dlse)[:3]
        return (dq, dk, dv) + (None,) * 10


# ---- public function --------------------------------------------------------------------------


def _validate(query, key, value, score_mod, scale, enable_gqa) -> None:
    dtypes = tuple(_FLOATS | {torch.float64})
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, t, ndim=4, dtypes=dtypes, device=query.device
                     if isinstance(query, Tensor) else None)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"{OP}: query, key and value must share a dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    B, H, _, d = query.shape
    bk, hk, skv, dk = key.shape
    if dk != d:
        raise ValueError(f"{OP}: query and key head dims differ ({d} vs {dk})")
    if tuple(value.shape[:3]) != (bk, hk, skv):
        raise ValueError(f"{OP}: value shape {tuple(value.shape)} must match key's (B, H, S) "
                         f"{(bk, hk, skv)}")
    if bk not in (1, B):
        raise ValueError(f"{OP}: key/value batch {bk} must be 1 or the query's {B}")
    if hk != H and not enable_gqa:
        raise ValueError(f"{OP}: query has {H} heads and key/value {hk}; pass enable_gqa=True "
                         "for grouped-query attention")
    if H == 0 or hk == 0 or H % hk:
        raise ValueError(f"{OP}: query heads ({H}) must be a positive multiple of key/value "
                         f"heads ({hk})")
    if min(query.shape[2], skv, d, value.shape[-1]) == 0:
        raise ValueError(f"{OP}: empty sequence or head dim: q {tuple(query.shape)}, "
                         f"k {tuple(key.shape)}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"{OP}: score_mod must be callable, got {type(score_mod).__name__}")
    if scale is not None:
        check_scale(OP, scale)


# ---- torch.compile ----------------------------------------------------------------------------

_assume_constant_result = getattr(torch.compiler, "assume_constant_result", None) or \
    torch._dynamo.assume_constant_result
# Generated readers of the mods' captured tensors and scalars (see ``_codegen.reader``), looked
# up by the constant key ``_plan`` returns; dynamo inlines them.
_READERS: dict[str, tuple] = {}


@_assume_constant_result
def _plan(score_mod, mask_mod, device_type: str, device_index, dtype: torch.dtype,
          head_dims: tuple[int, int], block_q: int, block_kv: int, grad: bool,
          backend: str | None) -> tuple:
    """The Python half of a compiled call, run once per trace (dynamo calls it eagerly and
    bakes its result into the graph as constants): translate the mods and choose the backend.

    Returns ``(mods key, backend, reader key, scalars)``, or ``(None, None, None, ())`` when
    the mods cannot run in the custom op (not translated, or a captured tensor is not a
    closure cell / module global of a plain function): the caller then traces the reference
    with the Python mods, so dynamo sees everything they read."""
    if backend is not None:
        SPEC.backend(backend)  # an unknown name raises at trace time
    if score_mod is not None and _codegen.is_torch_noop(score_mod):
        score_mod = None
    if mask_mod is not None and _codegen.is_torch_noop(mask_mod):
        mask_mod = None
    mods = _codegen.translate(score_mod, mask_mod)
    # The mods' rules, as in an eager call; dynamo runs this function eagerly, so untranslated
    # mods can be probed, over nominal index ranges (the call's sizes are not arguments here).
    wp = torch.float64 if dtype == torch.float64 else torch.float32
    _checks.check_mods(mods, score_mod, mask_mod,
                       _checks.Sizes.unknown(torch.device(device_type, device_index), wp))
    locs = None if mods.reason is not None else _codegen.locate_buffers(mods, score_mod, mask_mod)
    if locs is None:
        if backend not in (None, "reference"):
            reason = mods.reason or "a captured tensor is neither a closure cell nor a global"
            raise ValueError(f"{OP}: backend {backend!r} cannot run this call under "
                             f"torch.compile: {reason}")
        return None, None, None, ()
    readers, scalars = [], []
    for which, fn in (("score", score_mod), ("mask", mask_mod)):
        mine = [loc for loc in locs if loc[0] == which]
        if fn is None:
            readers.append(None)
            continue
        read, values = _codegen.reader(fn, [loc[1:] for loc in mine])
        readers.append(read)
        scalars += values
    if [loc[0] for loc in locs] != sorted((loc[0] for loc in locs), key=("score", "mask").index):
        raise AssertionError(f"{OP}: buffers of score_mod must precede mask_mod's")
    device = torch.device(device_type, device_index)
    # cuda_blocks / doc_varlen None: the lowered-mods backends are not planned here.
    problem = Problem.of(device, dtype, batch=1, heads=1, kv_heads=1, q_len=1, kv_len=1,
                         head_dim=head_dims[0], head_dim_v=head_dims[1], mods=mods.key,
                         block_q=block_q, block_kv=block_kv, grad=grad, kv_batch=1,
                         cuda_blocks=None, doc_varlen=None)
    chosen = SPEC.choose(problem, backend)[0].name
    reader_key = f"{mods.key}/{id(score_mod):x}/{id(mask_mod):x}"
    _READERS[reader_key] = tuple(readers)
    return mods.key, chosen, reader_key, tuple(scalars)


def _compiled_call(query, key, value, score_mod, tables, scale, backend):
    """``flex_attention`` as dynamo traces it: tables built in the graph, mods resolved by the
    constant-folded :func:`_plan`, captured tensors read by inlined readers (graph inputs)."""
    mask_mod = tables.mask_mod if tables.has_partial else None
    grad_on = torch.is_grad_enabled()
    grad = grad_on and (query.requires_grad or key.requires_grad or value.requires_grad)
    mods_key, chosen, reader_key, scalars = _plan(
        score_mod, mask_mod, query.device.type, query.device.index, query.dtype,
        (query.shape[-1], value.shape[-1]), tables.block_q, tables.block_kv, grad, backend)
    buffers = []
    if mods_key is not None:
        parts = [((), ()) if read is None else read() for read in _READERS[reader_key]]
        read_scalars = parts[0][1] + parts[1][1]
        # Element by element: dynamo in torch 2.11 cannot trace `tuple != tuple`.
        if len(read_scalars) != len(scalars) or any(
                a != b for a, b in zip(read_scalars, scalars)):
            # Unreachable: the readers' scalar guards re-trace the call when one changes.
            raise RuntimeError(f"{OP}: a scalar captured by the mods changed during tracing")
        buffers = list(parts[0][0]) + list(parts[1][0])
        for buf in buffers:
            if buf.device != query.device:
                raise ValueError(f"{OP}: a tensor captured by score_mod/mask_mod is on "
                                 f"{buf.device}, q/k/v on {query.device}")
    if mods_key is None or grad_on and any(b.requires_grad for b in buffers):
        return _reference.attention(query, key, value, score_mod, mask_mod, scale,
                                    tables.dense(), (tables.block_q, tables.block_kv))
    return torch.ops.kpt.flex_attention(
        query, key, value, buffers, tables.as_list(), tables.block_q, tables.block_kv,
        tables.has_partial, scale, mods_key, chosen, grad)


def _default_block(sq: int, skv: int) -> int:
    return min(128, max(16, 1 << max(0, (max(sq, skv) - 1).bit_length())))


def flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_mod: Callable | None = None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    *,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention with a user ``score_mod`` and a block-sparse ``mask_mod``, like torch's.

    Args:
        query: (B, Hq, Sq, D); key: (B or 1, Hkv, Skv, D); value: (B or 1, Hkv, Skv, Dv);
            fp16/bf16/fp32 (fp64 on the reference).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on float32 scores; may
            index captured 0/1/2-D tensors with the index arguments (``slopes[h]``). Like the
            block mask's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` it must be elementwise: one
            value per element from that element's arguments only, no reduction or slicing,
            no Python ``if``/``and``/``int()`` on the arguments. A mod that breaks this, or
            returns a bool score or a non-bool mask, is rejected before any backend runs
            (ValueError / TypeError, the same for every backend; ``_checks.py``).
        block_mask: torch's ``BlockMask`` (``create_block_mask``) or kpt's
            (:func:`create_block_mask`, no torch.compile needed); its ``mask_mod`` masks
            elements of partial blocks; unlisted blocks are skipped.
        scale: score scale, default ``1/sqrt(D)``.
        enable_gqa: allow Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
        return_lse: also return the log-sum-exp (B, Hq, Sq), float32, natural log (torch's
            convention), -inf for fully masked rows (whose output is 0).
        backend: ``"flash"`` (named band / soft-cap mods on ``kpt.ops.flash_attention``;
            fp16/bf16, cuda or cpu), ``"cuda"``, ``"hip"`` (named mods, :mod:`.mods`;
            fp16/bf16), ``"triton"`` or ``"reference"``; default: the best that supports the
            call.

    Forward and backward (q, k, v gradients; also through the lse). Captured tensors that
    require grad are differentiated by running the reference with autograd.

    Works inside ``torch.compile(fullgraph=True)``: the mods are translated once per trace
    (a constant-folded call), their captured tensors become graph inputs of the custom op; see
    NOTES.md, "torch.compile".
    """
    for name, flag in (("return_lse", return_lse), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"flex_attention: {name} must be a bool, got {flag!r}")
    _validate(query, key, value, score_mod, scale, enable_gqa)
    compiling = torch.compiler.is_compiling()
    if backend is not None and not compiling:
        SPEC.backend(backend)
    B, H, sq, d = query.shape
    skv = key.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if block_mask is None or _bm.is_noop_mask(block_mask):
        tables = _bm.all_full(sq, skv, _default_block(sq, skv), query.device)
    else:
        tables = _bm.normalize(block_mask, B, H, sq, skv, query.device)
    if compiling:
        out, lse = _compiled_call(query, key, value, score_mod, tables, scale, backend)
        return (out, lse) if return_lse else out
    mask_mod = tables.mask_mod
    if mask_mod is not None and _codegen.is_torch_noop(mask_mod):
        mask_mod = None
    if score_mod is not None and _codegen.is_torch_noop(score_mod):
        score_mod = None
    if not tables.has_partial:
        mask_mod = None  # no partial block: the mask is never evaluated
    mods = _codegen.translate(score_mod, mask_mod)
    # Shared by every backend, before dispatch: the mods must be elementwise (_checks.RULE).
    wp = torch.float64 if query.dtype == torch.float64 else torch.float32
    _checks.check_mods(mods, score_mod, mask_mod,
                       _checks.Sizes(B, H, sq, skv, query.device, wp))
    for buf in mods.buffers:
        if buf.device != query.device:
            raise ValueError(f"{OP}: a tensor captured by score_mod/mask_mod is on "
                             f"{buf.device}, q/k/v on {query.device}")
    grad_on = torch.is_grad_enabled()
    if grad_on and any(b.requires_grad for b in mods.buffers):
        # Kernels do not produce gradients for captured tensors: autograd through the
        # reference does, with the Python mods themselves.
        out, lse = _reference.attention(query, key, value, score_mod, mask_mod, scale,
                                        tables.dense(), (tables.block_q, tables.block_kv))
        return (out, lse) if return_lse else out
    grad = grad_on and any(t.requires_grad for t in (query, key, value))
    problem = problem_of(query, key, value, mods, tables, grad)
    chosen = SPEC.choose(problem, backend)[0].name
    table_list = tables.as_list()
    args = (query, key, value, list(mods.buffers), table_list, tables.block_q,
            tables.block_kv, tables.has_partial, scale, mods.key, chosen, grad)
    if not plain_eager(query, key, value, *mods.buffers, *table_list):
        out, lse = torch.ops.kpt.flex_attention(*args)
    elif grad:
        out, lse = _FlexFunction.apply(*args, (mods, tables, problem))
    else:
        # What the op's body would do, without its layers or rebuilding the problem.
        out, lse = _forward_impl(query, key, value, mods, tables, scale, chosen, problem)
    return (out, lse) if return_lse else out


__all__ = ["flex_attention", "create_block_mask", "BlockMask", "SPEC", "BACKENDS", "Call", "mods"]
