"""Python ``score_mod`` / ``mask_mod`` -> expression IR -> Triton source.

A mod is traced by calling it once with :class:`Sym` proxies for ``score, b, h, q_idx, kv_idx``.
Every operation on a proxy (Python operators, ``torch.where``/``tanh``/... through
``__torch_function__``, indexing of captured tensors) records a node instead of computing, so
the result is an expression DAG. Nodes are plain tuples ``(op, kind, *operands)`` with ``kind``
one of ``"f"`` (float32), ``"i"`` (integer), ``"b"`` (bool); equal sub-expressions are equal
tuples, which gives common-subexpression elimination for free when emitting code.

Captured tensors (ALiBi slopes, document ids, per-batch lengths) become numbered *buffers*: the
kernel takes them as pointer arguments, so a new tensor with other values reuses the kernel.
Anything the tracer cannot express (a Python ``if`` on a traced value, an unknown torch function,
a captured tensor of rank > 2) raises :class:`TraceError`, whose message becomes the ``triton``
backend's reason; dispatch then runs the reference, which calls the Python mod itself.

The backward needs d score_mod / d score; :func:`derivative` differentiates the IR symbolically.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Node = tuple
SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
MAX_BUFFER_RANK = 2


class TraceError(Exception):
    """A mod uses something the Triton code generator does not translate."""


class DataDependentError(TraceError):
    """A mod branches on, or converts to a Python number, a traced value: data-dependent Python
    control flow, which no backend runs (mods are elementwise tensor functions). Unlike other
    trace errors it is the mod's fault, not the code generator's: ``flex_attention`` rejects
    it before dispatch (``_checks``) instead of falling back to the reference."""


# ---- nodes -----------------------------------------------------------------------------------


def _const(value: Any) -> Node:
    if isinstance(value, bool):
        return ("const", "b", value)
    if isinstance(value, int):
        return ("const", "i", value)
    if isinstance(value, float):
        return ("const", "f", value)
    raise TraceError(f"constant of type {type(value).__name__} is not supported")


def _is_const(n: Node, value: Any = None) -> bool:
    return n[0] == "const" and (value is None or n[2] == value)


_ARITH = {"add", "sub", "mul", "truediv", "floordiv", "mod"}
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
_BITS = {"and", "or", "xor"}
_UNARY_FLOAT = {"tanh", "exp", "log", "sqrt", "sigmoid"}


def _kind(op: str, args: tuple[Node, ...]) -> str:
    kinds = [a[1] for a in args]
    if op in _COMPARE:
        return "b"
    if op in _BITS:
        return "b" if all(k == "b" for k in kinds) else "i"
    if op == "not":
        return "b"
    if op == "invert":
        return kinds[0]
    if op == "truediv" or op in _UNARY_FLOAT:
        return "f"
    if op == "where":
        kinds = kinds[1:]
    if "f" in kinds:
        return "f"
    if op in ("neg", "abs", "minimum", "maximum", "where") and all(k == "b" for k in kinds):
        return "b" if op != "neg" else "i"
    return "i"


def node(op: str, *args: Node) -> Node:
    """An operation node; constant operands are folded with torch so rounding matches eager."""
    if op == "invert" and args[0][1] == "b":
        op = "not"
    if all(_is_const(a) for a in args):
        env_free = evaluate((op, _kind(op, args), *args), {}, [])
        return _const(env_free.item())
    return (op, _kind(op, args), *args)


# ---- tracing ---------------------------------------------------------------------------------

_TRACER = threading.local()


@dataclass
class _Trace:
    buffers: list[torch.Tensor] = field(default_factory=list)

    def buffer(self, t: torch.Tensor) -> int:
        for i, b in enumerate(self.buffers):
            if b is t:
                return i
        if t.dim() > MAX_BUFFER_RANK:
            raise TraceError(f"captured tensor of shape {tuple(t.shape)}: only rank <= "
                             f"{MAX_BUFFER_RANK} can be indexed in the kernel")
        if t.is_complex() or t.dtype == torch.float64:
            raise TraceError(f"captured tensor of dtype {t.dtype} is not supported")
        self.buffers.append(t)
        return len(self.buffers) - 1


def _current() -> _Trace:
    trace = getattr(_TRACER, "trace", None)
    if trace is None:
        raise TraceError("a traced value escaped its trace")
    return trace


def _operand(x: Any) -> Node:
    if isinstance(x, Sym):
        return x.node
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise TraceError(f"captured tensor of shape {tuple(x.shape)} used without indexing")
        return _load(x, ())
    if isinstance(x, (bool, int, float)):
        return _const(x)
    raise TraceError(f"operand of type {type(x).__name__} is not supported")


def _load(t: torch.Tensor, index: tuple[Any, ...]) -> Node:
    if t.dim() != len(index):
        raise TraceError(f"captured tensor of shape {tuple(t.shape)} indexed with "
                         f"{len(index)} indices: index every dimension with one integer each")
    idx = []
    for i in index:
        n = _operand(i)
        if n[1] == "f":
            raise TraceError("captured tensor indexed with a float value")
        idx.append(n)
    i = _current().buffer(t)
    kind = "b" if t.dtype == torch.bool else ("f" if t.is_floating_point() else "i")
    return ("load", kind, i, *idx)


# torch functions (and Tensor methods reached through a captured tensor) -> IR op. Reversed
# Python operators swap their operands.
_TORCH_OPS = {
    "add": "add", "__add__": "add", "__radd__": "add", "sub": "sub", "__sub__": "sub",
    "__rsub__": "rsub", "rsub": "rsub", "mul": "mul", "__mul__": "mul", "__rmul__": "mul",
    "div": "truediv", "true_divide": "truediv", "__truediv__": "truediv",
    "__rtruediv__": "rtruediv", "floor_divide": "floordiv", "__floordiv__": "floordiv",
    "__rfloordiv__": "rfloordiv", "remainder": "mod", "__mod__": "mod", "__rmod__": "rmod",
    "eq": "eq", "__eq__": "eq", "ne": "ne", "__ne__": "ne", "lt": "lt", "__lt__": "lt",
    "le": "le", "__le__": "le", "gt": "gt", "__gt__": "gt", "ge": "ge", "__ge__": "ge",
    "__and__": "and", "bitwise_and": "and", "logical_and": "and", "__rand__": "and",
    "__or__": "or", "bitwise_or": "or", "logical_or": "or", "__ror__": "or",
    "__xor__": "xor", "bitwise_xor": "xor", "__rxor__": "xor", "logical_xor": "xor",
    "__invert__": "invert", "bitwise_not": "invert", "logical_not": "not",
    "neg": "neg", "__neg__": "neg", "negative": "neg", "abs": "abs", "__abs__": "abs",
    "where": "where", "tanh": "tanh", "exp": "exp", "log": "log", "sqrt": "sqrt",
    "sigmoid": "sigmoid", "minimum": "minimum", "maximum": "maximum", "clamp": "clamp",
    "clip": "clamp",
}


class Sym:
    """A traced value: arithmetic on it records IR nodes (see the module docstring)."""

    __slots__ = ("node",)

    def __init__(self, n: Node) -> None:
        self.node = n

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return Sym(_load(args[0], index))
        op = _TORCH_OPS.get(name)
        if op is None:
            raise TraceError(f"unsupported operation torch.{name}")
        if kwargs:
            args = (*args, *(kwargs.pop(k) for k in ("min", "max") if k in kwargs))
            if kwargs:
                raise TraceError(f"torch.{name}: keyword arguments {sorted(kwargs)} unsupported")
        return _apply(op, *args)

    def _bin(self, op: str, other: Any, rev: bool = False) -> Sym:
        return _apply(op, other, self) if rev else _apply(op, self, other)

    def __add__(self, o): return self._bin("add", o)  # noqa: E704
    def __radd__(self, o): return self._bin("add", o, True)  # noqa: E704
    def __sub__(self, o): return self._bin("sub", o)  # noqa: E704
    def __rsub__(self, o): return self._bin("sub", o, True)  # noqa: E704
    def __mul__(self, o): return self._bin("mul", o)  # noqa: E704
    def __rmul__(self, o): return self._bin("mul", o, True)  # noqa: E704
    def __truediv__(self, o): return self._bin("truediv", o)  # noqa: E704
    def __rtruediv__(self, o): return self._bin("truediv", o, True)  # noqa: E704
    def __floordiv__(self, o): return self._bin("floordiv", o)  # noqa: E704
    def __rfloordiv__(self, o): return self._bin("floordiv", o, True)  # noqa: E704
    def __mod__(self, o): return self._bin("mod", o)  # noqa: E704
    def __rmod__(self, o): return self._bin("mod", o, True)  # noqa: E704
    def __and__(self, o): return self._bin("and", o)  # noqa: E704
    def __rand__(self, o): return self._bin("and", o, True)  # noqa: E704
    def __or__(self, o): return self._bin("or", o)  # noqa: E704
    def __ror__(self, o): return self._bin("or", o, True)  # noqa: E704
    def __xor__(self, o): return self._bin("xor", o)  # noqa: E704
    def __rxor__(self, o): return self._bin("xor", o, True)  # noqa: E704
    def __eq__(self, o): return self._bin("eq", o)  # noqa: E704
    def __ne__(self, o): return self._bin("ne", o)  # noqa: E704
    def __lt__(self, o): return self._bin("lt", o)  # noqa: E704
    def __le__(self, o): return self._bin("le", o)  # noqa: E704
    def __gt__(self, o): return self._bin("gt", o)  # noqa: E704
    def __ge__(self, o): return self._bin("ge", o)  # noqa: E704
    def __neg__(self): return _apply("neg", self)  # noqa: E704
    def __abs__(self): return _apply("abs", self)  # noqa: E704
    def __invert__(self): return _apply("invert", self)  # noqa: E704
    def __pos__(self): return self  # noqa: E704
    def tanh(self): return _apply("tanh", self)  # noqa: E704
    def exp(self): return _apply("exp", self)  # noqa: E704
    def log(self): return _apply("log", self)  # noqa: E704
    def sqrt(self): return _apply("sqrt", self)  # noqa: E704
    def sigmoid(self): return _apply("sigmoid", self)  # noqa: E704
    def abs(self): return _apply("abs", self)  # noqa: E704
    def clamp(self, min=None, max=None): return _apply("clamp", self, min, max)  # noqa: E704, A002

    __hash__ = object.__hash__

    def __bool__(self):
        raise DataDependentError("data-dependent Python control flow (`if`/`and`/`or`/`not` on "
                                 "a traced value); use torch.where or & | ~ instead")

    def __index__(self):
        raise DataDependentError("a traced value used as a Python int (data-dependent indexing "
                                 "or range); index captured tensors directly with b, h, q_idx, "
                                 "kv_idx")

    __int__ = __float__ = __index__

    def __getitem__(self, _):
        raise TraceError("indexing a traced value (the mods see scalars, not tensors)")

    def __getattr__(self, name: str):
        raise TraceError(f"unsupported method .{name}() on a traced value")


def _apply(op: str, *args: Any) -> Sym:
    if op == "clamp":
        x, lo, hi = (list(args) + [None, None])[:3]
        out = _operand(x)
        if lo is not None:
            out = node("maximum", out, _operand(lo))
        if hi is not None:
            out = node("minimum", out, _operand(hi))
        return Sym(out)
    if op.startswith("r") and op[1:] in _ARITH:
        op, args = op[1:], (args[1], args[0])
    nodes = tuple(_operand(a) for a in args)
    return Sym(node(op, *nodes))


def trace(fn: Callable, arg_names: tuple[str, ...], trace_ctx: _Trace) -> Node:
    """The IR of ``fn`` called on proxies named ``arg_names`` (raises :class:`TraceError`)."""
    syms = [Sym(("var", "f" if a == "score" else "i", a)) for a in arg_names]
    _TRACER.trace = trace_ctx
    try:
        out = fn(*syms)
        return _operand(out)
    except TraceError:
        raise
    except Exception as err:  # the mod did something only real tensors support
        raise TraceError(f"{type(err).__name__}: {err}") from None
    finally:
        _TRACER.trace = None


# ---- derivative w.r.t. score -------------------------------------------------------------------


def _add(a: Node, b: Node) -> Node:
    if _is_const(a, 0) or _is_const(a, 0.0):
        return b
    if _is_const(b, 0) or _is_const(b, 0.0):
        return a
    return node("add", a, b)


def _mul(a: Node, b: Node) -> Node:
    for x, y in ((a, b), (b, a)):
        if _is_const(x, 0) or _is_const(x, 0.0):
            return _const(0.0)
        if _is_const(x, 1) or _is_const(x, 1.0):
            return y
    return node("mul", a, b)


ZERO, ONE = ("const", "f", 0.0), ("const", "f", 1.0)


def derivative(n: Node) -> Node:
    """d n / d score as IR (raises TraceError where the rule is missing)."""
    return _diff(n, {})


def _diff(n: Node, memo: dict) -> Node:
    if n in memo:
        return memo[n]
    op, kind, *a = n
    if kind != "f" or op in ("const", "load", "floordiv"):
        d = ZERO
    elif op == "var":
        d = ONE if a[0] == "score" else ZERO
    else:
        da = [_diff(x, memo) if isinstance(x, tuple) else ZERO for x in a]
        if op == "add":
            d = _add(da[0], da[1])
        elif op == "sub":
            d = _add(da[0], _mul(("const", "f", -1.0), da[1]))
        elif op == "neg":
            d = _mul(("const", "f", -1.0), da[0])
        elif op == "mul":
            d = _add(_mul(da[0], a[1]), _mul(a[0], da[1]))
        elif op == "truediv":
            d = _add(node("truediv", da[0], a[1]) if da[0] != ZERO else ZERO,
                     _mul(da[1], node("neg", node("truediv", n, a[1]))))
        elif op == "mod":
            if da[1] != ZERO:
                raise TraceError("no derivative for a % b with score in b")
            d = da[0]
        elif op == "where":
            d = ZERO if da[1] == da[2] == ZERO else node("where", a[0], _f(da[1]), _f(da[2]))
        elif op in ("minimum", "maximum"):
            pick = node("lt" if op == "minimum" else "gt", a[0], a[1])
            d = ZERO if da[0] == da[1] == ZERO else node("where", pick, _f(da[0]), _f(da[1]))
        elif op == "abs":
            sign = node("where", node("lt", a[0], ZERO), ("const", "f", -1.0), ONE)
            d = _mul(sign, da[0])
        elif op == "tanh":
            d = _mul(node("sub", ONE, node("mul", n, n)), da[0])
        elif op == "exp":
            d = _mul(n, da[0])
        elif op == "log":
            d = _mul(node("truediv", ONE, a[0]), da[0])
        elif op == "sqrt":
            d = _mul(node("truediv", ("const", "f", 0.5), n), da[0])
        elif op == "sigmoid":
            d = _mul(node("mul", n, node("sub", ONE, n)), da[0])
        else:
            raise TraceError(f"no derivative rule for {op}")
    memo[n] = d
    return d


def _f(n: Node) -> Node:
    return n if n[1] == "f" else ("const", "f", float(n[2])) if n[0] == "const" else n


# ---- evaluation with torch (the reference runs translated mods this way) ----------------------

_TORCH_IMPL: dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"), "mod": torch.remainder,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor,
    "invert": torch.bitwise_not, "not": torch.logical_not, "neg": torch.neg, "abs": torch.abs,
    "where": torch.where, "tanh": torch.tanh, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "sigmoid": torch.sigmoid, "minimum": torch.minimum,
    "maximum": torch.maximum,
}


def evaluate(n: Node, env: dict[str, torch.Tensor], buffers: list[torch.Tensor],
             memo: dict | None = None, float_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` computed with torch ops on broadcastable index tensors (``env``) and buffers, its
    float constants and float buffer reads in ``float_dtype`` (the scores' dtype: float32 as
    in the kernel, float64 for the reference on float64 inputs).

    Out-of-range buffer indices read 0 and negative ones wrap once, exactly like the kernel."""
    memo = {} if memo is None else memo
    if n in memo:
        return memo[n]
    op, kind, *a = n
    if op == "const":
        dtype = {"f": float_dtype, "i": torch.int64, "b": torch.bool}[kind]
        out = torch.tensor(a[0], dtype=dtype)
    elif op == "var":
        out = env[a[0]]
    elif op == "load":
        buf = buffers[a[0]]
        idx = [evaluate(x, env, buffers, memo, float_dtype).long() for x in a[1:]]
        ok = torch.ones((), dtype=torch.bool, device=buf.device)
        clean = []
        for dim, i in enumerate(idx):
            i = torch.where(i < 0, i + buf.shape[dim], i)
            ok = ok & (i >= 0) & (i < buf.shape[dim])
            clean.append(torch.where(ok, i, 0) if buf.numel() else i)
        clean = torch.broadcast_tensors(*clean) if clean else ()
        val = buf[tuple(clean)] if clean else buf
        out = torch.where(ok, val, torch.zeros((), dtype=buf.dtype, device=buf.device))
        if kind == "f":
            out = out.to(float_dtype)
    else:
        args = [evaluate(x, env, buffers, memo, float_dtype) for x in a]
        out = _TORCH_IMPL[op](*args)
    memo[n] = out
    return out


# ---- Triton source --------------------------------------------------------------------------


def _literal(kind: str, value: Any) -> str:
    if kind == "f":
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '(-float("inf"))'
        return repr(float(value))
    return repr(bool(value)) if kind == "b" else repr(int(value))


_INFIX = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
          "gt": ">", "ge": ">=", "and": "&", "or": "|", "xor": "^"}
_CALL = {"tanh": "_kpt_tanh", "exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt",
         "sigmoid": "_kpt_sigmoid", "minimum": "tl.minimum", "maximum": "tl.maximum",
         "abs": "tl.abs", "where": "tl.where", "floordiv": "_kpt_floordiv", "mod": "_kpt_mod"}


class _Emitter:
    def __init__(self, specs: list[tuple[int, str]]) -> None:
        self.lines: list[str] = []
        self.names: dict[Node, str] = {}
        self.specs = specs

    def expr(self, n: Node) -> str:
        if n in self.names:
            return self.names[n]
        op, kind, *a = n
        if op == "const":
            return _literal(kind, a[0])
        if op == "var":
            return a[0]
        if op == "load":
            text = self._load(a[0], [self.expr(x) for x in a[1:]], kind)
        else:
            args = [self.expr(x) for x in a]
            if op == "truediv":
                text = f"({args[0]} * 1.0) / {args[1]}" if all(x[1] != "f" for x in a) \
                    else f"{args[0]} / {args[1]}"
            elif op in ("floordiv", "mod"):
                text = f"{_CALL[op]}({args[0]}, {args[1]}, {kind == 'f'})"
            elif op in _INFIX:
                text = f"{args[0]} {_INFIX[op]} {args[1]}"
            elif op == "neg":
                text = f"-{args[0]}"
            elif op == "not":
                text = f"{args[0]} == 0"
            elif op == "invert":
                text = f"~{args[0]}"
            else:
                text = f"{_CALL[op]}({', '.join(args)})"
        name = f"t{len(self.names)}"
        self.lines.append(f"    {name} = {text}")
        self.names[n] = name
        return name

    def _load(self, i: int, idx: list[str], kind: str) -> str:
        ndim, _ = self.specs[i]
        offset, ok, ws = [], [], []
        for d, x in enumerate(idx):
            w = f"w{len(self.names)}_{d}"
            self.lines.append(f"    {w} = tl.where({x} < 0, {x} + buf{i}_n{d}, {x})")
            ws.append(w)
        if len(ws) > 1:
            # Broadcast every index to the others' shape: an index from b or h is a scalar, and
            # the interpreter rejects a load mask mixing scalar and tensor comparisons.
            for w in ws:
                zero = " + ".join(f"{o} * 0" for o in ws if o != w)
                self.lines.append(f"    {w} = {w} + {zero}")
        for d, w in enumerate(ws):
            offset.append(f"{w} * buf{i}_s{d}")
            ok.append(f"({w} >= 0) & ({w} < buf{i}_n{d})")
        ptr = f"buf{i} + " + " + ".join(offset) if offset else f"buf{i}"
        load = f"tl.load({ptr}, mask={' & '.join(ok)}, other=0)" if ok else f"tl.load({ptr})"
        if kind == "f":
            return f"{load}.to(tl.float32)"
        return f"{load} != 0" if kind == "b" else load


def buffer_params(specs: list[tuple[int, str]]) -> str:
    """``, buf0, buf0_n0, buf0_s0, ...``: how buffers appear in kernel/helper signatures."""
    out = []
    for i, (ndim, _) in enumerate(specs):
        out.append(f"buf{i}")
        for d in range(ndim):
            out += [f"buf{i}_n{d}", f"buf{i}_s{d}"]
    return "".join(f", {p}" for p in out)


def emit_function(name: str, args: tuple[str, ...], n: Node, specs: list, result: str) -> str:
    """A ``@triton.jit`` helper computing ``n``; ``result`` is "f" (float tile) or "b" (mask)."""
    em = _Emitter(specs)
    out = em.expr(n)
    if n[0] == "const" or n[1] == "b" and result == "f":
        out = f"score * 0.0 + ({out})" if result == "f" else \
            f"(q_idx * 0 + kv_idx * 0) {'==' if n[2] else '!='} 0"
    elif result == "f" and n[1] == "i":
        out = f"({out}).to(tl.float32)"
    elif result == "b" and n[1] != "b":
        out = f"({out}) != 0"
    body = "\n".join(em.lines) or "    pass"
    params = ", ".join(args) + buffer_params(specs)
    return f"@triton.jit\ndef {name}({params}):\n{body}\n    return {out}\n"


# ---- translation with a code-keyed cache -------------------------------------------------------


@dataclass
class Translation:
    """A pair of mods either translated (``reason`` None) or not (``reason`` says why).

    ``key`` names the generated kernel module (a hash of its mod source) or, untranslated, the
    Python callables kept in the registry for the reference. ``buffers`` are this call's
    captured tensors, in kernel-argument order."""

    key: str
    buffers: list[torch.Tensor]
    reason: str | None = None
    grad_reason: str | None = None
    score_ir: Node | None = None
    mask_ir: Node | None = None
    grad_ir: Node | None = None
    specs: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""
    score_mod: Callable | None = None
    mask_mod: Callable | None = None


@dataclass
class _Cached:
    template: Translation
    locators: list[tuple[str, str, Any]]


_CODE_CACHE: dict[tuple, _Cached] = {}
REGISTRY: dict[str, Translation] = {}
_UNTRANSLATED_LIMIT = 256
_lock = threading.Lock()


def _value_key(v: Any, depth: int) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v).__name__, v)
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, v.dim())
    if isinstance(v, types.ModuleType):
        return ("module", v.__name__)
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return ("builtin", getattr(v, "__module__", None), v.__qualname__)
    if isinstance(v, types.FunctionType) and depth < 3:
        return ("function", code_key(v, depth + 1))
    if isinstance(v, tuple) and len(v) < 16:
        return tuple(_value_key(x, depth) for x in v)
    raise LookupError


def _consts_key(consts: tuple) -> tuple:
    return tuple(("code", c.co_code, _consts_key(c.co_consts), c.co_names)
                 if isinstance(c, types.CodeType) else (type(c).__name__, repr(c)) for c in consts)


def code_key(fn: Callable | None, depth: int = 0) -> tuple | None:
    """What decides a mod's translation: bytecode, constants, defaults, and the closure/global
    values it reads (Python scalars by value, tensors by dtype and rank only). None when the
    callable is not a plain function or reads something else (then it is traced every call)."""
    if fn is None:
        return ("none",)
    if not isinstance(fn, types.FunctionType):
        return None
    code = fn.__code__
    try:
        cells = tuple(_value_key(c.cell_contents, depth) for c in fn.__closure__ or ())
        names = tuple((n, _value_key(fn.__globals__[n], depth)) for n in code.co_names
                      if n in fn.__globals__)
        defaults = _value_key(fn.__defaults__, depth)
    except (LookupError, ValueError):
        return None
    # The signature too: `lambda b, h: True` has the bytecode of `lambda b, h, q, kv: True`
    # and must not share its verdict (a check passed) or its translation.
    signature = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                 code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS))
    return (code.co_code, _consts_key(code.co_consts), code.co_names, cells, names, defaults,
            signature)


def _locate(fn: Callable | None, t: torch.Tensor, depth: int = 0) -> tuple[str, Any] | None:
    """Where ``fn`` holds ``t``: ``("cell", i)`` / ``("global", name)``; or, from ``depth``
    < 2 down (composed mods: ``and_masks(causal(), document(ids))`` keeps ``ids`` in a closure
    of a closure), ``("path", steps)`` through closure cells / globals holding plain functions
    or tuples of them (``("item", k)``)."""
    if not isinstance(fn, types.FunctionType):
        return None
    cells = fn.__closure__ or ()
    for i, cell in enumerate(cells):
        if _contents(cell) is t:
            return ("cell", i)
    for n in fn.__code__.co_names:
        if fn.__globals__.get(n) is t:
            return ("global", n)
    if depth >= 2:
        return None
    inner = [(("cell", i), _contents(c)) for i, c in enumerate(cells)]
    inner += [(("global", n), fn.__globals__.get(n)) for n in fn.__code__.co_names]
    # Tuples of functions too (the masks of and_masks / or_masks beyond the first).
    inner = [(steps, g) for step, v in inner
             for steps, g in ([((step, ("item", k)), x) for k, x in enumerate(v)]
                              if isinstance(v, tuple) and len(v) < 16 else [((step,), v)])]
    for steps, g in inner:
        if isinstance(g, types.FunctionType) and g is not fn:
            found = _locate(g, t, depth + 1)
            if found is not None:
                rest = found[1] if found[0] == "path" else (found,)
                return ("path", (*steps, *rest))
    return None


def _contents(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _fetch(fn: types.FunctionType, where: str, what: Any) -> torch.Tensor:
    if where == "path":
        for step in what:
            fn = _fetch(fn, *step)
        return fn
    if where == "item":
        return fn[what]
    return fn.__closure__[what].cell_contents if where == "cell" else fn.__globals__[what]


def translate(score_mod: Callable | None, mask_mod: Callable | None) -> Translation:
    """Translate a (score_mod, mask_mod) pair, from the code-keyed cache when possible."""
    key = None
    s_key, m_key = code_key(score_mod), code_key(mask_mod)
    if s_key is not None and m_key is not None:
        key = (s_key, m_key)
        hit = _CODE_CACHE.get(key)
        if hit is not None:
            fns = {"score": score_mod, "mask": mask_mod}
            buffers = [_fetch(fns[which], where, what) for which, where, what in hit.locators]
            return _with(hit.template, buffers, score_mod, mask_mod)
    t = _translate(score_mod, mask_mod)
    if t.reason is None and key is not None:
        locators = locate_buffers(t, score_mod, mask_mod, nested=True)
        if locators is not None:
            with _lock:
                _CODE_CACHE[key] = _Cached(t, locators)
    return t


def locate_buffers(t: Translation, score_mod, mask_mod,
                   nested: bool = False) -> list[tuple[str, str, Any]] | None:
    """Where each captured tensor of ``t`` lives: ``(which mod, "cell" | "global", index |
    name)``, or with ``nested`` also ``(which mod, "path", steps)`` inside the closures of
    composed mods, in buffer order; None when one is reached some other way (attribute,
    list...)."""
    locators = []
    for b in t.buffers:
        for which, fn in (("score", score_mod), ("mask", mask_mod)):
            loc = _locate(fn, b, 0 if nested else 2)
            if loc is not None:
                locators.append((which, *loc))
                break
        else:
            return None
    return locators


def _scalar_locators(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """The closure cells and globals of ``fn`` holding Python scalars (they shape its code)."""
    out: list[tuple[str, Any]] = []
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            if isinstance(cell.cell_contents, (bool, int, float, str)):
                out.append(("cell", i))
        except ValueError:  # an empty cell
            pass
    for n in fn.__code__.co_names:
        if isinstance(fn.__globals__.get(n, None), (bool, int, float, str)):
            out.append(("global", n))
    return out


def reader(fn: types.FunctionType, tensors: list[tuple[str, Any]]) -> tuple[Callable, tuple]:
    """A generated function ``() -> ((tensors...), (scalars...))`` that reads ``fn``'s captured
    tensors (at ``tensors``' locations) and its scalar cells/globals through ``fn``'s own
    closure cells and globals dict, plus the scalar values now.

    Under ``torch.compile`` dynamo inlines it like any user function: the tensors become graph
    inputs and the scalars get value guards (a changed scalar means a different kernel, so the
    graph must be re-traced). It only needs LOAD_GLOBAL / LOAD_DEREF, which every dynamo
    version supports, rather than ``fn.__closure__`` / ``fn.__globals__`` attribute access."""
    free = fn.__code__.co_freevars
    scalars = _scalar_locators(fn)

    def name(loc: tuple[str, Any]) -> str:
        return free[loc[1]] if loc[0] == "cell" else loc[1]

    cells = sorted({name(loc) for loc in tensors + scalars if loc[0] == "cell"})
    lines = ["def _kpt_outer():"]
    if cells:
        lines.append("    " + " = ".join(cells) + " = None")
    lines += ["    def _kpt_read():",
              "        return ({}), ({})".format(*("".join(f"{name(loc)}, " for loc in locs)
                                                  for locs in (tensors, scalars))),
              "    return _kpt_read"]
    outer = compile("\n".join(lines), f"<kpt flex_attention reader of {fn.__qualname__}>", "exec")
    code = next(c for c in next(c for c in outer.co_consts if isinstance(c, types.CodeType))
                .co_consts if isinstance(c, types.CodeType))
    closure = tuple(fn.__closure__[free.index(n)] for n in code.co_freevars) or None
    read = types.FunctionType(code, fn.__globals__, "_kpt_read", None, closure)
    return read, read()[1]


def _with(t: Translation, buffers: list, score_mod, mask_mod) -> Translation:
    out = Translation(**{**t.__dict__, "buffers": buffers})
    out.score_mod, out.mask_mod = score_mod, mask_mod
    return out


def _translate(score_mod: Callable | None, mask_mod: Callable | None) -> Translation:
    ctx = _Trace()
    irs = {}
    for which, fn, names in (("score_mod", score_mod, SCORE_ARGS), ("mask_mod", mask_mod,
                                                                    MASK_ARGS)):
        try:
            irs[which] = trace(fn, names, ctx) if fn is not None else None
        except TraceError as err:
            return _untranslated(f"{which} cannot be translated to Triton: {err}",
                                 score_mod, mask_mod)
    score_ir, mask_ir = irs["score_mod"], irs["mask_mod"]
    specs = [(b.dim(), str(b.dtype)) for b in ctx.buffers]
    grad_ir, grad_reason = ONE, None
    if score_ir is not None:
        try:
            grad_ir = derivative(score_ir)
        except TraceError as err:
            grad_reason = f"score_mod derivative: {err}"
    parts = [
        emit_function("_score_mod", SCORE_ARGS, score_ir or ("var", "f", "score"), specs, "f"),
        emit_function("_score_grad", SCORE_ARGS, _f(grad_ir) if grad_ir[0] != "const" else
                      grad_ir, specs, "f") if grad_reason is None else
        emit_function("_score_grad", SCORE_ARGS, ONE, specs, "f"),
        emit_function("_mask_mod", SCORE_ARGS[1:], mask_ir or ("const", "b", True), specs, "b"),
    ]
    source = "\n\n".join(parts)
    digest = hashlib.sha256(repr((source, specs)).encode()).hexdigest()[:20]
    t = Translation(key=f"flex_{digest}", buffers=list(ctx.buffers), grad_reason=grad_reason,
                    score_ir=score_ir, mask_ir=mask_ir, grad_ir=grad_ir, specs=specs,
                    source=source, score_mod=score_mod, mask_mod=mask_mod)
    with _lock:
        REGISTRY.setdefault(t.key, _with(t, [], None, None))
    return t


def _untranslated(reason: str, score_mod, mask_mod) -> Translation:
    key = f"py_{id(score_mod):x}_{id(mask_mod):x}"
    t = Translation(key=key, buffers=[], reason=reason, score_mod=score_mod, mask_mod=mask_mod)
    with _lock:
        # The registry keeps the callables alive, so their ids cannot be reused while listed.
        python_keys = [k for k in REGISTRY if k.startswith("py_")]
        for old in python_keys[: max(0, len(python_keys) - _UNTRANSLATED_LIMIT + 1)]:
            del REGISTRY[old]  # oldest first; translated entries are never evicted
        REGISTRY[key] = t
    return t


@functools.cache
def is_torch_noop(fn: Callable) -> bool:
    """torch's own identity score_mod / all-True mask_mod (they use methods we do not trace)."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return False
    return fn is getattr(fa, "noop_mask", None) or fn is getattr(fa, "_identity", None)
