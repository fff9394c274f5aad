"""Autotuning: measured best backend and config per device, op, dtype and shape bucket.

Dispatch asks :func:`lookup` once per new exact problem (the registry caches its answers). The
first lookup for a device reads every row for that device's fingerprint, shipped rows overlaid
by the user's database, decides every group at once and keeps only the decisions in memory;
later lookups are dict reads with no file or database access. :func:`invalidate` drops them
after the database changed (tuning, import, clear).

The database lives in :mod:`kpt.autotune.db`, the tuner in :mod:`kpt.autotune.tuner`, the
command line (``kpt-autotune``) in :mod:`kpt.autotune.cli`.

Imports go one way: dispatch (:mod:`kpt.ops._registry`) imports this module and, when it loads,
lends it what lookup needs of dispatch through :func:`connect` (the registered ops, whose
priorities break ties between rows, and its decision caches, which :func:`invalidate` clears).
This module, the database, provenance and winner modules import nothing of ``kpt.ops``; the
tuner and the command line, which run ops, import dispatch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
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


def _nothing() -> None:
    return None


# Set by dispatch through connect(): the registered ops by name, and its cache-clearing function.
_OPS: Callable[[], Mapping[str, Any]] = dict
_CLEAR: Callable[[], None] = _nothing


def connect(ops: Callable[[], Mapping[str, Any]], clear: Callable[[], None]) -> None:
    """Called by dispatch when it loads: ``ops()`` returns the registered ops by name (each
    with a ``priority`` per device type), ``clear()`` drops dispatch's cached decisions."""
    global _OPS, _CLEAR
    _OPS, _CLEAR = ops, clear


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

    priorities = {name: op.priority.get(device_type, ()) for name, op in _OPS().items()}
    table = {}
    for (op, dtype, bucket, _), chosen in winners(effective_rows(fingerprint), priorities).items():
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
        user = _db.stored_rows(fingerprint=fingerprint)
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

    with _LOCK:
        _DEVICES.clear()
        _TABLES.clear()
        _WARNED.clear()
    provenance.clear_caches()
    _CLEAR()


__all__ = ["lookup", "invalidate", "effective_rows", "connect"]
