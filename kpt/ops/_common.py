"""Small helpers shared by op modules: environment reasons, lazy backend modules, checks."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

MIN_TRITON = (3, 3)


@functools.cache
def triton_unavailable() -> str | None:
    """Why Triton cannot be used here, or None."""
    try:
        import triton
    except ImportError as err:
        return f"triton is not installed ({err})"
    try:
        version = Version(triton.__version__)
    except InvalidVersion:
        return f"triton's version {triton.__version__!r} cannot be read"
    if version.release < MIN_TRITON:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}"
    return None


_ENVIRON = os.environ


@functools.cache
def _env_key(name: str) -> Any:
    return _ENVIRON.encodekey(name)


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)`` for the per-call paths: CPython's ``os.environ``
    encodes the key and decodes the value on every lookup (~1.5 us on the CPU machine); this
    reads its underlying mapping directly (~0.1 us), which every change made through
    ``os.environ`` (``monkeypatch.setenv`` included) updates."""
    if os.environ is _ENVIRON and isinstance(_ENVIRON, os._Environ):
        raw = _ENVIRON._data.get(_env_key(name))
        return default if raw is None else _ENVIRON.decodevalue(raw)
    return os.environ.get(name, default)


def triton_interpreting() -> bool:
    return getenv("TRITON_INTERPRET", "0") not in ("", "0")


def check_content() -> bool:
    """``KPT_CHECK=1``: index tensors on a GPU (``cu_seqlens``, ...) are read back and checked
    in content on every call (a host sync each); on the CPU they always are."""
    return getenv("KPT_CHECK", "0") not in ("", "0")


def read_content(t: torch.Tensor) -> bool:
    """Whether an index tensor's content is checked on the host in this call: on the CPU, or
    anywhere under ``KPT_CHECK=1``; never while torch.compile traces (the data is not there)."""
    return (t.device.type == "cpu" or check_content()) and not torch.compiler.is_compiling()


def module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)``, from ``sys.modules`` when already imported (the
    import machinery's own lookup costs microseconds on every call of a hot path)."""
    return sys.modules.get(name) or importlib.import_module(name)


def lazy(name: str, attr: str) -> Callable[..., Any]:
    """A function that imports module ``name`` (absolute) when called, then forwards.

    Backend modules that need an optional package (triton, a JIT build) are imported only
    when that backend is actually considered, so importing kpt never fails for their sake.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        # The attribute is looked up on every call, so that a patched one is seen.
        return getattr(module(name), attr)(*args, **kwargs)

    call.__name__ = f"{name}.{attr}"
    return call


_MODE_CHECKS = tuple(getattr(torch._C, name) for name in (
    "_len_torch_dispatch_stack", "_is_torch_function_mode_enabled",
    "_are_functorch_transforms_active") if hasattr(torch._C, name))


def _mode_active() -> bool:
    for check in _MODE_CHECKS:
        if check():
            return True
    return False


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may bypass its custom op: plain tensors, eager execution, no mode.

    An op's custom-op layers (dispatcher, autograd wrapper, alias checks) cost host time on
    every call. Where nothing but plain eager execution can see the call, an op may run its
    implementation directly (with autograd through an equivalent autograd.Function).
    Compilation and tracing (torch.compile, export, jit tracing), functorch transforms,
    dispatch and torch-function modes, and tensor subclasses (FakeTensor, FunctionalTensor,
    ...) keep the custom op, which is what they must see."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _mode_active():
        return False
    plain = torch.Tensor
    for t in tensors:  # a loop, not all(<generator>): this runs on every call
        if t is not None and type(t) is not plain:
            return False
    return True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(
    op: str,
    name: str,
    t: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise TypeError/ValueError naming ``op`` and ``name`` when ``t`` does not fit."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{op}: {name} must have {' or '.join(map(str, allowed))} dims, "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of ({names}), got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} like the input")


# The kernels fold the softmax scale into the exp2 domain in float32 (scale * log2(e)): the
# largest scale whose factor is still finite there. Past it (1e39 is finite in Python, inf in
# float32) the backends overflowed differently (lse +inf, -inf or NaN).
_FLT_MAX = float(torch.finfo(torch.float32).max)
MAX_SCALE = _FLT_MAX / math.log2(math.e)


def check_scale(op: str, scale: Any) -> float:
    """``scale`` as a float after checking it: a finite number whose magnitude stays within
    ``MAX_SCALE`` (the kernels' float32 exp2-domain factor)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    if abs(scale) > MAX_SCALE:
        raise ValueError(f"{op}: |scale| must be at most {MAX_SCALE:.4g} (the kernels multiply "
                         f"it by log2(e) in float32), got {scale!r}")
    return float(scale)


def attention_options(op: str, causal: bool, window: Any, scale: Any, softcap: Any,
                      head_dim: int) -> tuple[float, int, int, float]:
    """The checked mask and logit arguments every attention op takes: (scale, window_left,
    window_right, softcap). ``window`` is (left, right) ints in -1 .. 2^31 - 1 (-1 unbounded)
    or None; ``causal`` fixes right to 0; ``scale`` defaults to head_dim^-0.5."""
    if window is None:
        window = (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and -1 <= w < 2**31
                       for w in window)):
        raise ValueError(f"{op}: window must be (left, right) ints in -1 .. 2^31 - 1, got "
                         f"{window!r}")
    left, right = int(window[0]), int(window[1])
    if causal:
        if right > 0:
            raise ValueError(f"{op}: causal=True already fixes the right window to 0, got "
                             f"window={tuple(window)}")
        right = 0
    scale = check_scale(op, head_dim**-0.5 if scale is None else scale)
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"{op}: softcap must be a finite number >= 0, got {softcap!r}")
    # The kernels' float32 factors of a soft-capped logit, softcap * log2(e) and scale /
    # softcap, must be finite, as scale * log2(e) is without one (check_scale).
    if softcap > MAX_SCALE or (softcap > 0 and abs(scale) / softcap > _FLT_MAX):
        raise ValueError(f"{op}: softcap={softcap!r} with scale={scale!r}: softcap must be at "
                         f"most {MAX_SCALE:.4g} and |scale| / softcap at most {_FLT_MAX:.4g} "
                         "(the kernels' float32 factors)")
    return float(scale), left, right, float(softcap)


def visible_matmul(p: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p @ v`` summed over the visible keys only: p (..., rows, keys) is 0 where ``visible``
    (broadcast to p) is False, v (..., keys, D).

    A plain product gives 0 * NaN = NaN, so a NaN or inf value of a key that a row cannot see
    (a causal or window mask, a mask_mod) would reach that row. Here the non-finite entries of
    v are left out of the product and come back only where visible, by IEEE's rules: NaN from
    a NaN, from +inf and -inf together, or from an inf times a probability that underflowed to
    0; else +-inf. The attention references share it; the Triton kernels do the same per tile
    (``_triton_compat.nonfinite_pv``). Shapes are data-independent and nothing is read back on
    a GPU or an XLA device (graph capture and XLA tracing see one fixed sequence of ops); on the
    CPU, in plain eager code, a v without a non-finite entry takes the plain product."""
    bad = ~torch.isfinite(v)
    if v.device.type == "cpu" and plain_eager(p, v) and not bool(bad.any()):
        return p @ v
    out = p @ v.masked_fill(bad, 0.0)
    seen = visible.expand(p.shape)
    pos, neg, nan = ((v == math.inf).to(p.dtype), (v == -math.inf).to(p.dtype),
                     torch.isnan(v).to(p.dtype))
    p_pos, p_neg = p @ pos, p @ neg
    # 0 * inf wherever a visible key's probability underflowed to 0, whatever else the row has
    underflow = (seen & (p == 0)).to(p.dtype) @ (pos + neg)
    is_nan = ((seen.to(p.dtype) @ nan > 0) | (underflow > 0) | ((p_pos > 0) & (p_neg > 0)))
    return torch.where(is_nan, math.nan, torch.where(
        p_pos > 0, math.inf, torch.where(p_neg > 0, -math.inf, out)))


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> str | None:
    """None when ``out`` matches ``ref``, else a one-line reason.

    Checks, in float64: ``out`` is finite wherever ``ref`` is; the norm-wise relative error
    ``|out - ref| / |ref|`` is within ``rel_tol``; and no single element is off by more than
    ``4 * rel_tol * max|ref|``, so a small region of garbage cannot hide inside a large norm.
    """
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = torch.isfinite(r) & ~torch.isfinite(o)
    if bad.any():
        return f"{name}: {int(bad.sum())} non-finite elements where the reference is finite"
    o, r = torch.nan_to_num(o), torch.nan_to_num(r)
    scale = r.norm().item()
    err = (o - r).norm().item()
    if err > rel_tol * max(scale, 1e-30):
        return f"{name}: relative error {err / max(scale, 1e-30):.3e} > {rel_tol:.1e}"
    worst = (o - r).abs().max().item() if o.numel() else 0.0
    peak = r.abs().max().item() if r.numel() else 0.0
    if worst > 4 * rel_tol * max(peak, 1e-30):
        return f"{name}: max abs error {worst:.3e} > 4*{rel_tol:.1e}*max|ref| ({peak:.3e})"
    return None


# CUDA and HIP launch grids hold at most 65535 blocks in y and z, where kpt's attention kernels
# put heads and batch (or varlen sequences).
MAX_GRID_YZ = 65535


def grid_yz_reasons(**dims: int) -> list[str]:
    """Reasons for launch-grid dims past :data:`MAX_GRID_YZ`, named as given."""
    return [f"{n} {v} exceeds the launch grid's {MAX_GRID_YZ} (a y/z grid dim)"
            for n, v in dims.items() if isinstance(v, int) and v > MAX_GRID_YZ]


def is_rocm() -> bool:
    """Whether this torch is a ROCm build (HIP kernels instead of CUDA ones)."""
    return torch.version.hip is not None


def jit_unavailable(spec: Callable[[], Any]) -> Callable[[], str | None]:
    """A cached ``unavailable()`` for a native backend: ``spec()`` returns the module's JitSpec
    (a callable, so the module may define it below), whose ``unavailable_reason`` says why it
    could not be built here without building it."""
    return functools.cache(lambda: spec().unavailable_reason())


def native_backends(module: str, *, dtypes: frozenset, run_cuda: str, run_hip: str,
                    supports: Callable[..., list[str]] | str = "supports",
                    configs: str = "configs",
                    fast: str | tuple[str, str] | None = None) -> tuple[Any, Any]:
    """The ``cuda`` (sm_80+) and ``hip`` backends of one kernel source built by nvcc and by
    hipcc. ``module`` (absolute name, imported only when the backend is considered) provides
    the launchers ``run_cuda`` / ``run_hip``, ``cuda_unavailable`` / ``hip_unavailable`` and
    the ``configs`` function; ``supports`` is a callable or the name of one in ``module``;
    ``fast`` names the module's ``Backend.fast`` function, if it has one (a pair: the cuda
    and the hip one)."""
    from kpt.ops._registry import Backend

    check = lazy(module, supports) if isinstance(supports, str) else supports
    shared = dict(device_types=frozenset({"cuda"}), dtypes=dtypes, supports=check,
                  configs=lazy(module, configs))
    fast_cuda, fast_hip = (fast, fast) if fast is None or isinstance(fast, str) else fast
    return (Backend(name="cuda", run=lazy(module, run_cuda), min_capability=(8, 0), rocm=False,
                    available=lazy(module, "cuda_unavailable"),
                    fast=fast_cuda and lazy(module, fast_cuda), **shared),
            Backend(name="hip", run=lazy(module, run_hip), rocm=True,
                    available=lazy(module, "hip_unavailable"),
                    fast=fast_hip and lazy(module, fast_hip), **shared))


# Where the PyTorch reference implementations run (any device torch computes on).
REFERENCE_DEVICES = frozenset({"cuda", "cpu", "xla", "xpu", "mps"})


def triton_backend(module: str, *, dtypes: frozenset, supports: Callable[..., list[str]],
                   configs: str | None = None, fast: str | None = None) -> Any:
    """The ``triton`` backend of an op: ``module`` (absolute name, imported when the backend
    is first considered) provides ``run`` and, when named, the ``configs`` and ``fast``
    (``Backend.fast``) functions; it runs on CUDA devices, and on the CPU under the
    interpreter (``supports`` says when not)."""
    from kpt.ops._registry import Backend

    return Backend(name="triton", device_types=frozenset({"cuda", "cpu"}), dtypes=dtypes,
                   run=lazy(module, "run"), available=triton_unavailable, supports=supports,
                   **({} if configs is None else {"configs": lazy(module, configs)}),
                   **({} if fast is None else {"fast": lazy(module, fast)}))


def reference_backend(run: Callable[..., None], dtypes: frozenset,
                      devices: frozenset = REFERENCE_DEVICES) -> Any:
    """The ``reference`` backend of an op: its PyTorch specification, ``run(call, config)``."""
    from kpt.ops._registry import Backend

    return Backend(name="reference", device_types=devices, dtypes=dtypes, run=run)


def raw_stream(device: torch.device) -> int:
    """The handle of ``device``'s current CUDA/HIP stream, for a binding's launch.

    ``torch.cuda.current_stream(device).cuda_stream`` builds a Stream object and resolves the
    device on every call (~15 us of host time per launch on the H200 machine's host); torch's
    raw accessor (what its compiled code uses) returns the handle directly."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get_raw is not None:
        return get_raw(index)
    return torch.cuda.current_stream(index).cuda_stream


@contextlib.contextmanager
def kernel_output(out: torch.Tensor, in_place: bool) -> Iterator[torch.Tensor]:
    """The tensor a binding writes: ``out`` itself where its stores can reach it (``in_place``:
    the layout and alignment the kernel needs), else a contiguous temporary of ``out``'s shape
    that is copied into ``out`` when the block ends."""
    target = out if in_place else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    yield target
    if target is not out:
        out.copy_(target)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` only where ``device`` is not already current: bindings
    launch on the current device, and entering the context costs several microseconds per
    call even when it changes nothing."""
    if device.index is None or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)
