"""Backends declared as data, and the per-call choice between them.

Every op module builds one :class:`Op` holding its :class:`Backend` declarations. A call is
summarised as a :class:`Problem` (device, dtype, named sizes and features); a backend serves it
when ``Op.reasons(backend, problem)`` is empty. The choice, in order:

1. ``backend=`` argument of the call, else ``KPT_BACKEND`` (``"triton"`` for every op, or
   ``"op=backend,op2=backend"``);
2. the autotune database's winner for this device fingerprint, op, dtype and shape bucket;
3. the op's static priority list for the device type, after the backends its ``prefer`` hook
   names for this problem (a kernel that is the fastest only on some devices or shapes).

Reasons come in two kinds. *Unsupported* ones describe the problem (a head dim the kernel does
not handle) and dispatch simply moves on. *Unavailable* ones describe the environment (no
compiler, a failed build, a missing package); skipping a backend for them, or rejecting the
tuned or requested backend, is a fallback: it is logged once, and is an error under
``KPT_STRICT=1``.

Decisions are cached in memory per exact problem, so the hot path is a dict lookup: no database
or file access and nothing that would break CUDA graph capture.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kpt import autotune
from kpt.ops._common import getenv

log = logging.getLogger("kpt")

Config = dict[str, Any]

_CACHE_LIMIT = 8192


class NoBackendError(RuntimeError):
    """No backend of an op can serve a call; the message lists every backend's reasons."""


class BackendUnavailable(RuntimeError):
    """Raised by a backend's launcher when its environment fails at first use (e.g. a JIT build
    error). Dispatch records the message as an *unavailable* reason and chooses again."""


@dataclass(frozen=True)
class Problem:
    """Everything dispatch needs to know of one call; hashable and cheap to build."""

    device_type: str
    device_index: int
    dtype: torch.dtype
    dims: tuple[tuple[str, Any], ...]

    def __getitem__(self, name: str) -> Any:
        for key, value in self.dims:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    @staticmethod
    def of(device: torch.device, dtype: torch.dtype, **dims: Any) -> Problem:
        index = device.index if device.index is not None else 0
        if device.type == "cuda" and device.index is None:
            index = torch.cuda.current_device()
        return Problem(device.type, index, dtype, tuple(dims.items()))


def _no_reasons(_problem: Problem) -> list[str]:
    return []


def _one_config(_problem: Problem) -> list[Config]:
    return [{}]


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op, with what it supports stated as data.

    ``run(call, config)`` writes the op's outputs (allocated by the op) and returns nothing.
    ``configs(problem)`` lists the tunable configs; the first is the untuned default.
    ``available()`` checks the environment without building anything and returns a reason or
    None; ``supports(problem)`` returns problem-specific reasons.
    """

    name: str
    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    run: Callable[[Any, Config], None]
    min_capability: tuple[int, int] | None = None
    rocm: bool | None = None  # True: ROCm torch only; False: CUDA torch only; None: either
    available: Callable[[], str | None] = _always_available
    supports: Callable[[Problem], list[str]] = _no_reasons
    configs: Callable[[Problem], list[Config]] = _one_config
    # fast(call, config): after ``run`` succeeded on ``call``, a launcher ``f(*inputs) ->
    # outputs`` that repeats it on inputs of the same signature (shapes, strides, dtypes,
    # devices, alignment, options), skipping validation and dispatch; None where it has none.
    fast: Callable[[Any, Config], Callable[..., Any] | None] | None = None


@dataclass(frozen=True)
class Tuning:
    """What the autotuner needs of an op to make and check calls without a model.

    ``shapes(hf_config, tokens)`` lists shape dicts a model with that HF config will run;
    ``make_call(shape, dtype, device, seed)`` builds a call on fresh random inputs with
    outputs allocated; ``problem(call)`` summarises it; ``check(call, expected)`` compares the
    outputs of ``call`` with those of ``expected`` (same inputs, reference backend) and returns
    a reason when they differ beyond the op's tolerance, else None; ``poison(call)`` fills the
    outputs with NaN so that unwritten elements are caught.
    """

    shapes: Callable[[dict, list[int]], list[dict]]
    make_call: Callable[[dict, torch.dtype, torch.device, int], Any]
    problem: Callable[[Any], Problem]
    check: Callable[[Any, Any], str | None]
    poison: Callable[[Any], None]
    clone_outputs: Callable[[Any], Any]


@dataclass
class Op:
    """An op's backends, its static priority per device type, and its dispatch cache."""

    name: str
    backends: tuple[Backend, ...]
    priority: dict[str, tuple[str, ...]]
    bucket: Callable[[Problem], str]
    tuning: Tuning | None = None
    # Backends to try before the static priority for one problem (measured faster there).
    prefer: Callable[[Problem], tuple[str, ...]] | None = None
    # example(device, dtype): the problem of a small typical call, which `python -m kpt.info`
    # asks every backend about (ops with tuning hooks make theirs from those).
    example: Callable[[torch.device, torch.dtype], Problem] | None = None
    _cache: dict[tuple, tuple[Backend, Config]] = field(default_factory=dict, repr=False)
    # launch_keyed's decisions by (the caller's cheap key, requested backend): a key is a plain
    # tuple that determines the Problem, so a hit skips building and hashing one.
    _keyed: dict[tuple, tuple[Backend, Config]] = field(default_factory=dict, repr=False)
    # Launchers by full call signature (see Backend.fast and launch_keyed's ``signature``).
    fast: dict[tuple, Callable[..., Any]] = field(default_factory=dict, repr=False)
    _broken: dict[str, str] = field(default_factory=dict, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate backend names {names}")
        for device_type, order in self.priority.items():
            unknown = set(order) - set(names)
            if unknown:
                raise ValueError(f"{self.name}: priority for {device_type} names {unknown}")
        _OPS[self.name] = self

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        known = ", ".join(b.name for b in self.backends)
        raise ValueError(f"{self.name}: unknown backend {name!r} (known: {known})")

    # ---- reasons -------------------------------------------------------------------------

    def unavailable(self, backend: Backend) -> str | None:
        """The environment reason this backend cannot run here at all, or None. A check that
        itself fails (say, a backend module that does not import) is such a reason too."""
        if backend.name in self._broken:
            return self._broken[backend.name]
        try:
            return backend.available()
        except Exception as err:  # noqa: BLE001 - reported as the reason, never raised
            return f"availability check failed: {type(err).__name__}: {err}"

    def unsupported(self, backend: Backend, problem: Problem) -> list[str]:
        """Reasons that come from the problem itself (device, dtype, sizes, features)."""
        reasons = []
        if problem.device_type not in backend.device_types:
            reasons.append(f"device {problem.device_type} not in {sorted(backend.device_types)}")
        if problem.dtype not in backend.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in backend.dtypes)
            reasons.append(f"dtype {str(problem.dtype).removeprefix('torch.')} not in {names}")
        if problem.device_type == "cuda" and not reasons:
            is_rocm = torch.version.hip is not None
            if backend.rocm is True and not is_rocm:
                reasons.append("needs a ROCm build of torch")
            elif backend.rocm is False and is_rocm:
                reasons.append("needs a CUDA build of torch (this one is ROCm)")
            elif backend.min_capability is not None and not is_rocm:
                cap = torch.cuda.get_device_capability(problem.device_index)
                if cap < backend.min_capability:
                    need = "sm_{}{}".format(*backend.min_capability)
                    reasons.append(f"needs {need} or newer, device is sm_{cap[0]}{cap[1]}")
        if not reasons:
            try:
                reasons.extend(backend.supports(problem))
            except Exception as err:  # noqa: BLE001 - reported as the reason, never raised
                reasons.append(f"support check failed: {type(err).__name__}: {err}")
        return reasons

    def reasons(self, backend: Backend | str, problem: Problem) -> list[str]:
        if isinstance(backend, str):
            backend = self.backend(backend)
        reasons = self.unsupported(backend, problem)
        missing = self.unavailable(backend)
        if missing:
            reasons.append(missing)
        return reasons

    # ---- choice --------------------------------------------------------------------------

    def choose(self, problem: Problem, backend: str | None = None) -> tuple[Backend, Config]:
        """The backend and config for this call; cached per (problem, requested backend)."""
        requested = backend or _env_backend(self.name)
        key = (problem, requested)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with self._lock:
            choice = self._choose_uncached(problem, requested, explicit=backend is not None)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = choice
        return choice

    def _choose_uncached(
        self, problem: Problem, requested: str | None, explicit: bool
    ) -> tuple[Backend, Config]:
        if requested is not None:
            chosen = self.backend(requested)
            reasons = self.reasons(chosen, problem)
            if not reasons:
                return chosen, chosen.configs(problem)[0]
            message = f"{self.name}: backend {requested!r} cannot run this call: " + "; ".join(
                reasons
            )
            if explicit:
                raise ValueError(message)
            self._fallback(f"KPT_BACKEND: {message}")

        tuned = _tuned_choice(self, problem)
        if tuned is not None:
            name, config = tuned
            try:
                chosen = self.backend(name)
            except ValueError:
                chosen = None
            if chosen is not None:
                reasons = self.reasons(chosen, problem)
                if not reasons:
                    return chosen, config
                self._fallback(
                    f"{self.name}: tuned backend {name!r} cannot run here: " + "; ".join(reasons)
                )

        return self.static_choice(problem)

    def static_choice(self, problem: Problem) -> tuple[Backend, Config]:
        """The first backend of the device type's priority list (after the preferred ones) that
        can run ``problem``, with its default config: what dispatch picks when nothing is
        requested or tuned."""
        order = self.priority.get(problem.device_type, ())
        if self.prefer is not None:
            first = self.prefer(problem)
            unknown = set(first) - {b.name for b in self.backends}
            if unknown:
                raise ValueError(f"{self.name}: prefer names unknown backends {unknown}")
            order = (*first, *(name for name in order if name not in first))
        report = []
        for name in order:
            candidate = self.backend(name)
            unsupported = self.unsupported(candidate, problem)
            if unsupported:
                report.append((name, unsupported))
                continue
            missing = self.unavailable(candidate)
            if missing:
                report.append((name, [missing]))
                self._fallback(f"{self.name}: skipping backend {name!r}: {missing}")
                continue
            return candidate, candidate.configs(problem)[0]
        for b in self.backends:
            if b.name not in order:
                report.append((b.name, self.reasons(b, problem) or ["not in the priority list"]))
        raise NoBackendError(_format_report(self.name, problem, report))

    def _fallback(self, message: str) -> None:
        if os.environ.get("KPT_STRICT", "0") not in ("", "0"):
            raise NoBackendError(message + " (KPT_STRICT=1 forbids falling back)")
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s; falling back", message)

    # ---- launch --------------------------------------------------------------------------

    def launch(self, problem: Problem, call: Any, backend: str | None = None) -> str:
        """Choose a backend and run it on ``call``; returns the backend's name.

        A backend that fails at first use with :class:`BackendUnavailable` is recorded as
        unavailable (the choice is made again without it) unless it was asked for by name.
        """
        while True:
            chosen, config = self.choose(problem, backend)
            try:
                chosen.run(call, config)
                return chosen.name
            except BackendUnavailable as err:
                self.mark_unavailable(chosen.name, str(err))
                if backend is not None:
                    raise
                self._fallback(f"{self.name}: backend {chosen.name!r} failed: {err}")

    def launch_keyed(self, key: tuple, make_problem: Callable[[], Problem], call: Any,
                     backend: str | None = None, signature: tuple | None = None) -> str:
        """:meth:`launch` for an op's hot path: ``key`` is a tuple of plain values that
        determines the problem (``make_problem()`` builds it on a miss), so a repeated call
        costs one dict lookup on it, with nothing that grows with the number of backends.

        ``signature``: everything the op's validation and this dispatch read of a validated,
        plain eager call (tensor types, shapes, strides, dtypes, devices, alignment, options,
        the requested backend). After a successful run, the chosen backend's ``fast`` launcher
        is stored under it in :attr:`fast`, where the op's entry looks a repeat call up first."""
        requested = backend or _env_backend(self.name)
        hit = self._keyed.get((key, requested))
        if hit is None:
            hit = self.choose(make_problem(), backend)
            with self._lock:
                if len(self._keyed) >= _CACHE_LIMIT:
                    self._keyed.clear()
                self._keyed[(key, requested)] = hit
        chosen, config = hit
        try:
            chosen.run(call, config)
            if signature is not None and chosen.fast is not None:
                launcher = chosen.fast(call, config)
                if launcher is not None:
                    with self._lock:
                        if len(self.fast) >= _CACHE_LIMIT:
                            self.fast.clear()
                        self.fast[signature] = launcher
            return chosen.name
        except BackendUnavailable as err:  # as in launch(): recorded, then chosen again
            self.mark_unavailable(chosen.name, str(err))
            if backend is not None:
                raise
            self._fallback(f"{self.name}: backend {chosen.name!r} failed: {err}")
            return self.launch(make_problem(), call, backend)

    def mark_unavailable(self, name: str, reason: str) -> None:
        with self._lock:
            self._broken[name] = reason
            self._cache.clear()
            self.fast.clear()
            self._keyed.clear()

    def clear_cache(self) -> None:
        """Forget cached decisions (after the autotune database or environment changed)."""
        with self._lock:
            self._cache.clear()
            self._keyed.clear()
            self.fast.clear()
            self._broken.clear()
            self._warned.clear()


def _format_report(op: str, problem: Problem, report: Iterable[tuple[str, list[str]]]) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in problem.dims)
    lines = [
        f"{op}: no backend can run this call "
        f"(device={problem.device_type}, dtype={str(problem.dtype).removeprefix('torch.')}, {dims})"
    ]
    for name, reasons in report:
        lines.append(f"  {name}: " + "; ".join(reasons))
    return "\n".join(lines)


def _env_backend(op: str) -> str | None:
    value = getenv("KPT_BACKEND").strip()
    if not value:
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        name, _, backend = item.partition("=")
        if name.strip() == op and backend.strip():
            return backend.strip()
    return None


def _tuned_choice(op: Op, problem: Problem) -> tuple[str, Config] | None:
    if problem.device_type == "cpu" or os.environ.get("KPT_AUTOTUNE", "1") == "0":
        return None
    return autotune.lookup(op.name, problem, op.bucket(problem))


_OPS: dict[str, Op] = {}


def all_ops() -> dict[str, Op]:
    """Every registered op by name (importing :mod:`kpt.ops` registers them all)."""
    import kpt.ops  # noqa: F401

    return dict(_OPS)


def clear_caches() -> None:
    for op in _OPS.values():
        op.clear_cache()


# The autotune lookup reads op priorities from here and clears these caches on invalidate(),
# without importing this module (which imports it).
autotune.connect(all_ops, clear_caches)
