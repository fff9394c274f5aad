"""What ``kpt.integrations.hf.patch`` leaves on a model that must follow it through
``copy.deepcopy`` and pickling: undo records and instance-level method overrides as plain
objects holding a module-level function and its arguments.

A closure would not do: ``copy.deepcopy`` keeps functions as they are, so a copied model's
handle would undo the original model (and pickling fails on local functions). These objects are
copied field by field, through the same memo as the model, so a copy's records point at the
copy's modules, and they pickle by the function's qualified name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class Restore:
    """An undo record: ``Restore(fn, *args)()`` runs ``fn(*args)``."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> None:
        self.fn(*self.args)


class Bound:
    """``fn`` bound to ``obj``, for an instance attribute that overrides a method
    (``module.forward = Bound(f, module)``): what ``types.MethodType`` does, except that it
    deep-copies with ``obj`` and pickles. Its signature is ``fn``'s without the first
    parameter, as a bound method's is."""

    __slots__ = ("fn", "obj")

    def __init__(self, fn: Callable[..., Any], obj: Any) -> None:
        self.fn, self.obj = fn, obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.obj, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return inspect.signature(self.fn).replace(parameters=params)

    @property
    def __func__(self) -> Callable[..., Any]:
        return self.fn

    @property
    def __self__(self) -> Any:
        return self.obj
