"""Autotuning: measured best backend and config per device, op, dtype and shape bucket.

Dispatch asks :func:`lookup` once per new exact problem (the registry caches its answers). The
first lookup for a device reads every row for that device's fingerprint, shipped rows overlaid
by the user's database, decides every group at once and keeps only the decisions in memory;
later lookups are dict reads with no file or database access. :func:`invalidate` drops them
after the database changed (tuning, import, clear).

The database lives in :mod:`kpt.autotune.db`, the tuner in :mod:`kpt.autotune.tuner`, the
command line (``kpt-autotune``) in :mod:`kpt.autotune.cli`.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from kpt.autotune import db as _db

if TYPE_CHECKING:
    from kpt.ops._registry import Config, Problem

log = logging.getLogger("kpt")

# (device_type, device_index) -> fingerprint, and fingerprint -> {(op, dtype, bucket): choice}.
_DEVICES: dict[tuple[str, int], str | None] = {}
_TABLES: dict[str, dict[tuple[str, str, str], tuple[str, str]]] = {}
_WARNED: set[str] = set()
_LOCK = threading.Lock()


def lookup(op: str, problem: Problem, bucket: str) -> tuple[str, Config] | None:
    """The tuned (backend, config) for ``op`` on this problem's device, dtype and bucket.

    None when nothing trustworthy is stored; never raises (a missing package or an unreadable
    database is logged once and means "not tuned").
    """
    device = (problem.device_type, problem.device_index)
    fingerprint = _DEVICES.get(device, "")
    if fingerprint == "":
        fingerprint = _load(device)
    table = _TABLES.get(fingerprint) if fingerprint else None
    if not table:
        return None
    hit = table.get((op, str(problem.dtype).removeprefix("torch."), bucket))
    if hit is None:
        return None
    return hit[0], json.loads(hit[1])


def _load(device: tuple[str, int]) -> str | None:
    """Fingerprint the device and build its decision table once; returns the fingerprint."""
    with _LOCK:
        if device in _DEVICES:
            return _DEVICES[device]
        fingerprint = None
        try:
            from kpt.autotune.provenance import device_fingerprint

            fingerprint = device_fingerprint(f"{device[0]}:{device[1]}")
            if fingerprint is not None and fingerprint not in _TABLES:
                _TABLES[fingerprint] = _decide(fingerprint, device[0])
        except Exception as err:  # noqa: BLE001 - lookup must never break a call
            _warn_once(f"autotune: tuned choices not used on {device[0]}:{device[1]}: {err}")
            if fingerprint is not None:
                _TABLES.setdefault(fingerprint, {})
        _DEVICES[device] = fingerprint
        return fingerprint


def _decide(fingerprint: str, device_type: str) -> dict[tuple[str, str, str], tuple[str, str]]:
    from kpt.autotune.winner import winners

    table = {}
    for (op, dtype, bucket, _), chosen in winners(effective_rows(fingerprint), device_type).items():
        table[(op, dtype, bucket)] = (chosen.winner["backend"], chosen.winner["config"])
    log.debug("autotune: %d tuned choices for %s", len(table), fingerprint)
    return table


def effective_rows(fingerprint: str) -> list[_db.Row]:
    """Rows that count for ``fingerprint``: shipped rows overlaid by the user's database.

    A user database that cannot be read (or sqlite-utils missing) is logged once and skipped;
    shipped rows need only the standard library.
    """
    shipped = _db.shipped_rows(fingerprint)
    try:
        with _db.ResultsDB.open() as database:
            user = database.rows(fingerprint=fingerprint)
    except Exception as err:  # noqa: BLE001 - a reason to skip the user rows, not an error
        _warn_once(f"autotune database {_db.default_path()} not used: {err}")
        user = []
    return _db.overlay(shipped, user)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def invalidate() -> None:
    """Forget loaded decisions and dispatch's cached choices; the next lookup reloads."""
    from kpt.autotune import provenance
    from kpt.ops._registry import clear_caches

    with _LOCK:
        _DEVICES.clear()
        _TABLES.clear()
        _WARNED.clear()
    provenance.clear_caches()
    clear_caches()


def __getattr__(name: str) -> Any:
    # The tuner needs torch; keep `import kpt.autotune` (and its database) light without it.
    if name in ("tune", "Result"):
        from kpt.autotune import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["lookup", "invalidate", "effective_rows", "tune", "Result"]
