"""The autotune database: one SQLite table of measured (op, backend, config) rows.

Several processes may tune at once (one per GPU), so the file runs in WAL mode, every write is a
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock
upgrading read locks) and a busy database is waited for with backoff. A file that is not a
database, or is damaged, is moved aside and rebuilt: it only ever held measurements. A location
that cannot be written falls back to an in-memory database for the rest of the process.

Rows are plain dicts with the columns of :data:`COLUMNS`; ``config`` is canonical JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("kpt")

Row = dict[str, Any]
T = TypeVar("T")

ENV_PATH = "KPT_AUTOTUNE_DB"
TABLE = "results"
SCHEMA_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"

KEY = ("op", "backend", "config", "dtype", "bucket", "fingerprint")
GROUP = ("op", "dtype", "bucket", "fingerprint")
COLUMNS: dict[str, type] = {
    "op": str,
    "backend": str,
    "config": str,
    "dtype": str,
    "bucket": str,
    "fingerprint": str,
    "valid": int,
    "is_default": int,  # the untuned choice of static dispatch for this problem
    "median_us": float,
    "spread": float,  # (p80 - p20) / median of the samples
    "samples": int,
    "error": str,
    "shape": str,  # JSON of the exact shape that was measured
    "source_hash": str,
    "kpt_version": str,
    "torch_version": str,
    "triton_version": str,
    "runtime_version": str,
    "driver_version": str,
    "created": str,  # UTC, ISO 8601
}

BUSY_TIMEOUT_S = 10.0
LOCK_WAIT_S = 120.0
_CORRUPT = ("file is not a database", "malformed", "file is encrypted")
_UNWRITABLE = ("unable to open database", "readonly database", "disk i/o error")
_LOCKED = ("database is locked", "database is busy", "database table is locked")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used at all here (e.g. sqlite-utils is not installed)."""


class _Corrupt(Exception):
    pass


def default_path() -> Path:
    """``$KPT_AUTOTUNE_DB``, else ``autotune.db`` in kpt's cache directory (``$KPT_CACHE_DIR``
    or ``~/.cache/kpt``, shared with the JIT builds)."""
    env = os.environ.get(ENV_PATH, "").strip()
    if env:
        return Path(env).expanduser()
    from kpt.jit import cache_dir

    return cache_dir() / "autotune.db"


def config_json(config: dict[str, Any]) -> str:
    """The canonical JSON of a config: sorted keys, no spaces, so equal configs compare equal."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def normalize(row: dict[str, Any]) -> Row:
    """A complete row with every column, in column order; raises ValueError on a bad row."""
    if isinstance(row.get("config"), dict):
        row = {**row, "config": config_json(row["config"])}
    missing = [k for k in KEY if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"autotune row lacks key column(s) {missing}: {row!r}")
    out: Row = {}
    for name, kind in COLUMNS.items():
        value = row.get(name)
        if value is not None and kind is float:
            value = float(value)
        elif value is not None and kind is int:
            value = int(value)
        out[name] = value
    out["config"] = config_json(json.loads(out["config"]))
    out["valid"] = out["valid"] or 0
    out["is_default"] = out["is_default"] or 0
    return out


def _message(err: BaseException) -> str:
    return str(err).lower()


def _retrying(fn: Callable[[], T]) -> T:
    """Run ``fn``, retrying with jittered exponential backoff while the database is locked."""
    delay, deadline = 0.005, time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            if not any(s in _message(err) for s in _LOCKED) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)


class ResultsDB:
    """A connection to the results table. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self, database: Any, path: Path | None) -> None:
        self._db = database
        self._lock = threading.RLock()
        self.path = path  # None for the in-memory fallback

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path | None = None) -> ResultsDB:
        """Open (creating if needed) the database at ``path`` or :func:`default_path`.

        Raises :class:`DatabaseUnavailable` when sqlite-utils is missing; a corrupt file is moved
        aside and an unwritable location gives an in-memory database, both with a warning.
        """
        try:
            import sqlite_utils  # noqa: F401
        except ImportError as err:
            raise DatabaseUnavailable(f"sqlite-utils is not installed ({err})") from None
        path = Path(path) if path is not None else default_path()
        memory = _MEMORY.get(str(path))
        if memory is not None:
            return memory
        try:
            try:
                return cls._open_file(path)
            except _Corrupt as err:
                _move_aside(path, str(err))
                return cls._open_file(path)
        except (OSError, sqlite3.Error, _Corrupt) as err:
            return cls._memory_fallback(path, err)

    @classmethod
    def _open_file(cls, path: Path) -> ResultsDB:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            self = cls(_wrap(conn), path)
            self._prepare()
            return self
        except sqlite3.DatabaseError as err:
            conn.close()
            if any(s in _message(err) for s in _CORRUPT):
                raise _Corrupt(str(err)) from err
            raise
        except BaseException:
            conn.close()
            raise

    def _prepare(self) -> None:
        db = self._db
        _retrying(lambda: db.execute("PRAGMA journal_mode=WAL").fetchall())
        db.execute("PRAGMA synchronous=NORMAL")
        check = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise _Corrupt("integrity check failed: " + "; ".join(map(str, check[:3])))

        def create() -> None:
            if TABLE not in db.table_names():  # checked again under the write lock: a race
                db[TABLE].create(COLUMNS, pk=KEY, not_null=set(KEY))
                db[TABLE].create_index(["fingerprint", "op", "dtype", "bucket"])
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

        if TABLE not in db.table_names():  # readers never take the write lock
            self._write(create)

    @classmethod
    def _memory_fallback(cls, path: Path, err: BaseException) -> ResultsDB:
        """An in-memory database for this process, seeded from ``path`` when it is readable."""
        log.warning(
            "autotune database %s cannot be opened for writing (%s); using an in-memory "
            "database for this process (set %s to a writable path to keep results)",
            path, err, ENV_PATH,
        )
        import sqlite_utils

        self = cls(_wrap(sqlite3.connect(":memory:", check_same_thread=False)), None)
        self._prepare()
        try:
            readonly = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                self.write(list(sqlite_utils.Database(readonly, execute_plugins=False)[TABLE].rows))
            finally:
                readonly.close()
        except Exception:  # noqa: BLE001 - seeding is best effort: no readable rows is fine
            pass
        _MEMORY[str(path)] = self
        return self

    def close(self) -> None:
        if self.path is not None:
            self._db.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_memory(self) -> bool:
        return self.path is None

    # ---- transactions ----------------------------------------------------------------------

    def _write(self, body: Callable[[], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked."""

        def attempt() -> T:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.rollback()
                raise
            return result

        with self._lock:
            return _retrying(attempt)

    # ---- rows ------------------------------------------------------------------------------

    def write(self, rows: Iterable[dict[str, Any]], *, replace_groups: bool = False) -> int:
        """Insert rows, replacing rows of the same key; returns the number written.

        With ``replace_groups`` every existing row of the rows' (op, dtype, bucket, fingerprint)
        groups is deleted first, so a group always holds one tuning session's measurements
        (times from different sessions are not comparable).
        """
        rows = [normalize(r) for r in rows]
        if not rows:
            return 0
        groups = sorted({tuple(r[k] for k in GROUP) for r in rows})
        where = " AND ".join(f"[{k}] = ?" for k in GROUP)

        def body() -> None:
            if replace_groups:
                for group in groups:
                    self._db.execute(f"DELETE FROM [{TABLE}] WHERE {where}", group)
            self._db[TABLE].insert_all(rows, pk=KEY, replace=True)

        self._write(body)
        return len(rows)

    def rows(self, *, fingerprint: str | None = None, op: str | None = None) -> list[Row]:
        """Rows in key order, optionally only of one fingerprint and/or op."""
        where, params = _where(fingerprint=fingerprint, op=op)
        with self._lock:
            found = self._db[TABLE].rows_where(where, params, order_by=", ".join(KEY))
            return [normalize(r) for r in found]

    def delete(self, *, fingerprint: str | None = None, op: str | None = None) -> int:
        """Delete rows (all, or of one fingerprint and/or op); returns how many."""
        where, params = _where(fingerprint=fingerprint, op=op)
        sql = f"DELETE FROM [{TABLE}]" + (f" WHERE {where}" if where else "")
        return self._write(lambda: self._db.execute(sql, params).rowcount)

    def count(self) -> int:
        with self._lock:
            return self._db[TABLE].count


def stored_rows(*, fingerprint: str | None = None, op: str | None = None,
                path: str | Path | None = None) -> list[Row]:
    """Rows of the database at ``path`` (default :func:`default_path`), read without creating
    it: none when there is no database yet. Lookup and the read-only commands use this; only
    writes (tuning, import) create the file."""
    path = Path(path) if path is not None else default_path()
    if str(path) not in _MEMORY and not path.exists():
        return []
    with ResultsDB.open(path) as database:
        return database.rows(fingerprint=fingerprint, op=op)


def _where(**equal: str | None) -> tuple[str | None, list[str]]:
    names = [k for k, v in equal.items() if v is not None]
    return (" AND ".join(f"[{k}] = ?" for k in names) or None, [equal[k] for k in names])


def _wrap(conn: sqlite3.Connection) -> Any:
    import sqlite_utils

    return sqlite_utils.Database(conn, execute_plugins=False)


def _move_aside(path: Path, reason: str) -> None:
    """Rename a corrupt database (and its WAL side files) to ``<name>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    log.warning(
        "autotune database %s is corrupt (%s); moved it to %s and starting a fresh one",
        path, reason, target.name,
    )
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(f"{path}{suffix}", f"{target}{suffix}")
        except FileNotFoundError:
            continue  # no side file, or another process moved it first


# In-memory fallbacks by requested path: results written in this process stay readable by it.
_MEMORY: dict[str, ResultsDB] = {}


# ---- files: export, import, shipped rows -----------------------------------------------------


def dump_rows(rows: Iterable[Row], file: str | Path) -> int:
    """Write rows as JSON Lines (one row per line, sorted keys; ``-`` is stdout)."""
    lines = [json.dumps(normalize(r), sort_keys=True) + "\n" for r in rows]
    if str(file) == "-":
        sys.stdout.writelines(lines)
    else:
        Path(file).write_text("".join(lines), encoding="utf-8")
    return len(lines)


def load_rows(file: str | Path) -> list[Row]:
    """Read rows from JSON Lines or a JSON array (``-`` is stdin); raises ValueError if bad."""
    text = sys.stdin.read() if str(file) == "-" else Path(file).read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not JSON or JSON Lines ({err})") from None
    if not all(isinstance(item, dict) for item in items):
        raise ValueError(f"{file}: every row must be a JSON object")
    return [normalize(item) for item in items]


def shipped_rows(fingerprint: str | None = None) -> list[Row]:
    """Rows shipped with kpt (``kpt/autotune/tuned/*.json[l]``), for the GPUs kpt measures on."""
    rows: list[Row] = []
    if SHIPPED_DIR.is_dir():
        for file in sorted(SHIPPED_DIR.iterdir()):
            if file.suffix in (".json", ".jsonl"):
                rows.extend(r for r in load_rows(file)
                            if fingerprint is None or r["fingerprint"] == fingerprint)
    return rows


def shipped_file_name(fingerprint: str) -> str:
    """The file of :data:`SHIPPED_DIR` that holds a GPU's rows: its name from the fingerprint,
    lower case, e.g. ``nvidia-h200.jsonl`` (any file name reads the same; this one is kpt's
    convention, so that re-exporting a GPU's rows replaces its file)."""
    name = fingerprint.split("/", 1)[0]
    return (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu") + ".jsonl"


def overlay(shipped: Iterable[Row], user: Iterable[Row]) -> list[Row]:
    """Shipped rows with the user's on top, by whole (op, dtype, bucket, fingerprint) group.

    A group the user has tuned replaces the shipped group entirely rather than row by row, so
    that a winner is never chosen by comparing times from two different machines or sessions.
    """
    user = list(user)
    tuned = {tuple(r[k] for k in GROUP) for r in user}
    return [r for r in shipped if tuple(r[k] for k in GROUP) not in tuned] + user
