"""Repeat launches of a Triton kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **kwargs)`` binds every argument, computes its specialisation key (dtypes,
16-byte alignment of pointers, integers equal to 1 or divisible by 16), looks the compiled
kernel up and launches it: tens of microseconds of host time, paid again on every call. An op's
fast path (``Backend.fast``) already knows that a repeat call has the same shapes, strides,
dtypes and scalar arguments as the call that was validated and launched before; for such
repeats :func:`bind` settles everything once and returns a :class:`Bound` launcher that takes
only the tensors that change between calls (inputs, outputs, workspaces) and calls the
compiled kernel's launcher directly, as ``JITFunction.run`` itself ends by doing.

The one part of the specialisation a repeat can still change is a pointer's alignment (a
tensor view can start anywhere); a launcher compiled for a 16-byte-aligned pointer is used only
with aligned pointers, and any other call takes ``kernel[grid]`` as before. Launch hooks
(profilers) are honoured. Under the CPU interpreter, or where Triton's internals differ from
what this module expects, :func:`bind` returns None and the caller keeps the plain launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kpt.ops._common import triton_interpreting


def _knobs() -> Any:
    try:
        from triton import knobs
    except ImportError:  # Triton before the knobs module
        return None
    return knobs.runtime


class Bound:
    """A Triton kernel's launch with everything but some tensors fixed (see :func:`bind`)."""

    __slots__ = ("fn", "kernel", "grid", "kwargs", "leading", "values", "slots", "aligned",
                 "index", "stream", "current", "hooks")

    def __init__(self, fn, kernel, grid, kwargs, leading, values, slots, aligned, index,
                 hooks) -> None:
        self.fn, self.kernel, self.grid, self.kwargs = fn, kernel, grid, kwargs
        self.leading, self.values, self.slots = leading, values, slots
        self.aligned, self.index = aligned, index
        self.stream = torch._C._cuda_getCurrentRawStream
        self.current = torch.cuda.current_device
        self.hooks = hooks

    def __call__(self, *tensors: torch.Tensor) -> None:
        """Launch with ``tensors`` in the places of the ones given to :func:`bind`, in the
        same order, on the bound device's current stream."""
        if len(tensors) != len(self.slots):
            raise TypeError(f"{self.fn}: bound for {len(self.slots)} tensors, got {len(tensors)}")
        values = self.values.copy()
        misaligned = False
        for t, slots, aligned in zip(tensors, self.slots, self.aligned):
            for i in slots:
                values[i] = t
            misaligned = misaligned or (aligned and t.data_ptr() & 15)
        if misaligned or self.current() != self.index:
            # Compiled for an aligned pointer (Triton picks or builds the variant), or loaded
            # on the bound device while another one is current: the plain launch, there.
            with torch.cuda.device(self.index):
                self.fn[self.grid](*values[:self.leading], **self.kwargs)
            return
        kernel, grid = self.kernel, self.grid
        stream = self.stream(self.index)
        hooks = self.hooks
        enter, leave = (hooks.launch_enter_hook, hooks.launch_exit_hook) if hooks else (None, None)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *values) if enter or leave else None,
                   enter, leave, *values)


def bind(fn: Any, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any],
         tensors: Sequence[torch.Tensor]) -> Bound | None:
    """A launcher for repeats of ``fn[grid](*args, **kwargs)`` in which only ``tensors`` (each
    passed in ``args``, found there by identity) change; None where this cannot be set up.

    ``args`` are the kernel's leading parameters, in order; ``kwargs`` its remaining
    parameters (constexprs) and launch options (``num_warps``, ``num_stages``, ...). Compiles
    the kernel if it is not yet (``fn.warmup``), launches nothing. The caller guarantees that
    every other argument is the same on each call, and that the new tensors have the dtypes of
    the bound ones. Every tensor argument must be among ``tensors``: the launcher holds no
    tensor (a KV cache bound into it would never be freed)."""
    if triton_interpreting() or not torch.cuda.is_available():
        return None
    get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    warmup = getattr(fn, "warmup", None)
    params = getattr(fn, "params", None)
    if get_stream is None or warmup is None or params is None or len(args) > len(params):
        return None
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return None
    try:
        kernel = warmup(*args, grid=tuple(grid), **kwargs)
        if hasattr(kernel, "result"):  # a compile still under way
            kernel = kernel.result()
        kernel._init_handles()
        if not callable(getattr(kernel, "run", None)) or kernel.function is None:
            return None
        values = list(args)
        for param in params[len(args):]:
            if param.name in kwargs:
                values.append(kwargs[param.name])
            elif param.has_default:
                values.append(param.default)
            else:
                return None
        if len({id(t) for t in tensors}) != len(tensors):
            return None  # one object in two places: which slots a later call's fill is unknown
        slots, aligned = [], []
        for t in tensors:
            where = tuple(i for i, a in enumerate(args) if a is t)
            if not where:
                return None
            slots.append(where)
            aligned.append(t.data_ptr() % 16 == 0)
            for i in where:  # the launcher keeps no reference to the bound call's tensors
                values[i] = None
        if any(isinstance(v, torch.Tensor) for v in values):
            return None  # a tensor that would be frozen into every launch
    except Exception:  # noqa: BLE001 - Triton internals of another version: keep the plain path
        return None
    grid3 = (*tuple(grid), 1, 1)[:3]
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Bound(fn, kernel, grid3, dict(kwargs), len(args), values, tuple(slots),
                 tuple(aligned), index, _knobs())


class Launchers:
    """Bound launchers of one kernel, keyed, for a Triton call site without an op signature
    (an internal kernel that ``Backend.fast`` does not reach, e.g. a merge step).

    ``launch(key, tensors, grid, arguments)`` launches ``fn`` on ``tensors``: the caller's
    ``key`` must hold everything but the tensors that fixes the launch (shapes, strides,
    dtypes, device, scalar arguments). The first call of a key runs ``arguments()`` (``(args,
    kwargs)``: the kernel's leading arguments, each of ``tensors`` among them, and its
    constexprs and launch options), launches ``fn[grid](*args, **kwargs)`` and binds a
    launcher (:func:`bind`); later calls of that key launch through it with the new tensors and
    never build the arguments. A key :func:`bind` declines (the interpreter, the CPU, other
    Triton internals) keeps the plain launch. At most ``limit`` keys are kept; past that the
    table starts over.
    """

    __slots__ = ("fn", "limit", "bound")

    def __init__(self, fn: Any, limit: int = 256) -> None:
        self.fn, self.limit = fn, limit
        self.bound: dict[Any, Bound | bool] = {}

    def launch(self, key: Any, tensors: Sequence[torch.Tensor], grid: Sequence[int],
               arguments: Callable[[], tuple[Sequence[Any], dict[str, Any]]]) -> None:
        bound = self.bound.get(key)
        if bound:
            bound(*tensors)
            return
        args, kwargs = arguments()
        self.fn[tuple(grid)](*args, **kwargs)
        if bound is None:
            if len(self.bound) >= self.limit:
                self.bound.clear()
            self.bound[key] = bind(self.fn, grid, args, kwargs, tensors) or False
