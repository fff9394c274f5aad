"""Measuring every backend and config of an op on given shapes, and storing the results.

For each shape the tuner builds one call on fresh random inputs, computes the expected outputs
with the ``reference`` backend, then for every backend that can serve the problem and every
config it lists: poisons the outputs, runs once, checks against the reference, and only then
times it. A config that fails to build, raises, or computes wrong values is stored as invalid
with the error text; it never aborts the tune. The reference itself is measured too, as the
baseline of last resort.

One limit of tuning in-process: a CUDA error that poisons the context (an illegal address) makes
every later candidate fail as well; those are recorded invalid, and the tune should be re-run
once the faulty kernel is fixed.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kpt.autotune import db as _db
from kpt.autotune import provenance
from kpt.autotune.timing import ClockTimer, CudaTimer, Timer
from kpt.autotune.winner import pick
from kpt.ops._registry import Backend, Config, Op, Problem

log = logging.getLogger("kpt")


@dataclass(frozen=True)
class Result:
    """The outcome of tuning one shape."""

    op: str
    shape: dict
    dtype: str
    bucket: str
    backend: str | None  # None when no candidate was valid
    config: Config
    time_us: float | None
    default_backend: str | None  # static dispatch's choice (None if nothing qualified)
    default_config: Config
    default_us: float | None  # None when the default was not valid
    invalid: tuple[tuple[str, str, str], ...] = ()  # (backend, config JSON, error)
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, reasons) not measured at all
    rows: tuple[dict, ...] = field(default=(), repr=False)

    @property
    def speedup(self) -> float | None:
        """Default time over chosen time (1.0 when the default was kept)."""
        if self.time_us is None or self.default_us is None:
            return None
        return self.default_us / self.time_us


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def static_default(op: Op, problem: Problem) -> tuple[str, Config] | None:
    """What dispatch picks with no tuned rows (``Op.static_choice``), or None if nothing can."""
    try:
        backend, config = op.static_choice(problem)
    except Exception:  # noqa: BLE001 - no default then; every candidate is still measured
        return None
    return backend.name, config


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_timer(device: torch.device) -> Timer:
    if device.type == "cuda":
        return CudaTimer(device)
    return ClockTimer()


def _progress(items: list[dict], label: str, enabled: bool) -> Iterator[dict]:
    """Iterate with a tqdm bar (when installed) or a one-line stderr counter."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        for i, item in enumerate(items, 1):
            print(f"\r{label}: shape {i}/{len(items)}", end="", file=sys.stderr, flush=True)
            yield item
        print(file=sys.stderr)
        return
    yield from tqdm(items, desc=label, unit="shape", leave=True)


def tune(
    op: Op,
    shapes: Iterable[dict],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    progress: bool = True,
    timer: Timer | None = None,
    seed: int = 0,
    database: _db.ResultsDB | None = None,
) -> list[Result]:
    """Measure every candidate of ``op`` on each shape, store the rows, return one result each.

    ``timer`` defaults to CUDA events on GPUs and the host clock elsewhere; ``database``
    defaults to :meth:`ResultsDB.open`, which raises :class:`~kpt.autotune.db.DatabaseUnavailable`
    before anything is measured when the database cannot be written (pass
    ``ResultsDB.open(allow_memory=True)`` to tune into memory for this process only). Raises
    ValueError when the op has no tuning hooks or no reference backend, or when the device has
    no fingerprint (nothing to key rows by).
    """
    from kpt.autotune import invalidate

    device = torch.device(device)
    if op.tuning is None:
        raise ValueError(f"{op.name}: op has no tuning hooks")
    reference = op.backend("reference")
    fingerprint = provenance.device_fingerprint(device)
    if fingerprint is None:
        raise ValueError(f"cannot tune on {device}: only CUDA/ROCm devices are tuned")
    timer = timer or _default_timer(device)
    owned = database is None
    database = database or _db.ResultsDB.open()
    results = []
    try:
        for shape in _progress(list(shapes), op.name, progress):
            result = _tune_shape(op, reference, dict(shape), dtype, device, fingerprint, timer,
                                 warmup_ms, rep_ms, seed)
            database.write(result.rows, replace_groups=True)
            results.append(result)
    finally:
        if owned:
            database.close()
        invalidate()
    return results


def _tune_shape(
    op: Op,
    reference: Backend,
    shape: dict,
    dtype: torch.dtype,
    device: torch.device,
    fingerprint: str,
    timer: Timer,
    warmup_ms: float,
    rep_ms: float,
    seed: int,
) -> Result:
    tuning = op.tuning
    assert tuning is not None
    call = tuning.make_call(shape, dtype, device, seed)
    problem = tuning.problem(call)
    bucket = op.bucket(problem)
    expected = tuning.clone_outputs(call)
    reference.run(expected, reference.configs(problem)[0])
    default = static_default(op, problem)
    base = {
        "op": op.name,
        "dtype": str(dtype).removeprefix("torch."),
        "bucket": bucket,
        "fingerprint": fingerprint,
        "shape": json.dumps(shape, sort_keys=True, default=str),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows: list[dict[str, Any]] = []
    skipped = []
    for backend in op.backends:
        reasons = op.reasons(backend, problem)
        if not reasons:
            try:
                configs = backend.configs(problem)
            except Exception as err:  # noqa: BLE001
                reasons = [f"configs() failed: {_describe(err)}"]
        if reasons:
            skipped.append((backend.name, "; ".join(reasons)))
            continue
        for config in configs:
            row = {**base, **provenance.provenance(op.name, backend.name),
                   "backend": backend.name, "config": _db.config_json(config),
                   "is_default": int(default == (backend.name, config))}
            row.update(_measure(op, backend, config, call, expected, device, timer,
                                warmup_ms, rep_ms))
            rows.append(_db.normalize(row))

    chosen = pick(rows, op.priority.get(problem.device_type, ()))
    winner = chosen.winner if chosen else None
    invalid = tuple((r["backend"], r["config"], r["error"]) for r in rows if not r["valid"])
    for name, config, error in invalid:
        log.info("autotune: %s %s %s invalid: %s", op.name, name, config, error)
    return Result(
        op=op.name,
        shape=shape,
        dtype=base["dtype"],
        bucket=bucket,
        backend=winner["backend"] if winner else None,
        config=json.loads(winner["config"]) if winner else {},
        time_us=winner["median_us"] if winner else None,
        default_backend=default[0] if default else None,
        default_config=default[1] if default else {},
        default_us=chosen.default_us if chosen else None,
        invalid=invalid,
        skipped=tuple(skipped),
        rows=tuple(rows),
    )


def _measure(
    op: Op,
    backend: Backend,
    config: Config,
    call: Any,
    expected: Any,
    device: torch.device,
    timer: Timer,
    warmup_ms: float,
    rep_ms: float,
) -> dict[str, Any]:
    """Check one candidate against the reference, then time it; the row's result columns."""
    tuning = op.tuning
    assert tuning is not None
    try:
        tuning.poison(call)
        backend.run(call, config)
        _synchronize(device)
        error = tuning.check(call, expected)
        if error is None:
            timing = timer(lambda: backend.run(call, config), warmup_ms, rep_ms)
            if math.isfinite(timing.median_us) and timing.median_us > 0:
                return {"valid": 1, "median_us": timing.median_us, "spread": timing.spread,
                        "samples": timing.samples, "error": None}
            error = f"timing gave a median of {timing.median_us!r} us, not a usable time"
    except Exception as err:  # noqa: BLE001 - compile errors, CUDA errors, BackendUnavailable
        error = _describe(err)
    return {"valid": 0, "median_us": None, "spread": None, "samples": 0, "error": error}
