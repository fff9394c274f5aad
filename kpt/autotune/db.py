"""The autotune database: one SQLite table of measured (op, backend, config) rows.

Several processes may tune at once (one per GPU), so the file runs in WAL mode, every write is a
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock
upgrading read locks) and a busy database is waited for with backoff. A write that returns has
been committed to the file: a writer that cannot use the file gets :class:`DatabaseUnavailable`,
never a database in memory whose rows reach no file, unless its caller asked for one
(``ResultsDB.open(allow_memory=True)``).

A file that is not a database, or is damaged, is moved aside and rebuilt: it only ever held
measurements. Writers do that, once per damaged file however many processes find it: under an
OS file lock (``<name>.lock``, through ``filelock``) the file is looked at again and left alone
when another process has already replaced it. Readers (lookup, ``show``, ``export``) change
nothing: they open the file read-only, and in a location they cannot write (where SQLite cannot
create the WAL's ``-shm`` file) as an immutable file.

Rows are plain dicts with the columns of :data:`COLUMNS`; ``config`` is canonical JSON. Every row
is checked on its way in and out (:func:`normalize`): times are finite and positive, integers fit
SQLite's 64 bits, a config is a JSON object of bounded depth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
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
MAX_CONFIG_DEPTH = 8  # configs are flat dicts of launch parameters; this leaves room
_INT64 = (-(2**63), 2**63 - 1)  # what an SQLite INTEGER holds
_CORRUPT = ("file is not a database", "malformed", "file is encrypted")
_CANNOT_OPEN = ("unable to open database", "readonly database", "read-only", "readonly")
_LOCKED = ("database is locked", "database is busy", "database table is locked")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used here: sqlite-utils is not installed, a writer cannot write
    the file, or a reader cannot read it. The message names the file and the reason."""


class RowError(ValueError):
    """Not a valid autotune row; ``field`` names the column at fault ("" for the whole row)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field}: {message}" if field else message)
        self.field = field


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


# ---- row checks ------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """``value`` for an error message: short, and safe for integers too long to print."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (dict, list)):
        return "a JSON " + ("object" if isinstance(value, dict) else "array")
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():  # 20.0 from a tool that writes floats
        value = int(value)
    if not isinstance(value, int):
        raise RowError(name, f"must be an integer, got {_shown(value)}")
    if not low <= value <= high:
        raise RowError(name, f"must be an integer from {low} to {high}, got {_shown(value)}")
    return value


def _float(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(name, f"must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise RowError(name, f"must be a finite number, got {_shown(value)}") from None
    if not math.isfinite(number) or (number <= 0 if positive else number < 0):
        wanted = "a finite positive" if positive else "a finite non-negative"
        raise RowError(name, f"must be {wanted} number, got {number!r}")
    return number


def _config(value: Any) -> str:
    """The canonical JSON of a config given as a dict or as JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise RowError("config", "JSON nested too deeply") from None
        except ValueError as err:
            raise RowError("config", f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise RowError("config", f"must be a JSON object, got {_shown(value)}")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # not recursive: a deep config must give this error, not a RecursionError
        item, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise RowError("config", f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(item, dict) and not all(isinstance(k, str) for k in item):
            raise RowError("config", "object keys must be strings")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                raise RowError("config", f"numbers must be finite, got {child!r}")
            elif isinstance(child, int) and not isinstance(child, bool):
                _int("config", child, *_INT64)
            elif child is not None and not isinstance(child, (str, bool, float)):
                raise RowError("config", f"holds {_shown(child)}, not a JSON value")
    return config_json(value)


def _unicode(name: str, value: str) -> None:
    """RowError unless ``value`` is text SQLite can store: JSON's ``\\ud800`` escapes decode to
    lone surrogates, which no UTF-8 encoder takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(name, f"holds a lone surrogate {value[err.start]!r} (an unpaired "
                             f"\\u escape): not Unicode text") from None


def normalize(row: Mapping[str, Any]) -> Row:
    """A complete, checked row with every column, in column order.

    Raises :class:`RowError` (a ValueError naming the column) on a bad row: a key column that
    is not a non-empty string, a config that is not a JSON object, a value of the wrong type,
    an integer beyond 64 bits, a time that is not a finite positive number (a valid row needs
    one), a negative spread or sample count, a flag other than 0/1.
    """
    if not isinstance(row, Mapping):
        raise RowError("", f"a row must be a JSON object, got {_shown(row)}")
    missing = [k for k in KEY if k != "config" and not (isinstance(row.get(k), str) and row[k])]
    if "config" not in row or row["config"] is None:
        missing.insert(2, "config")
    if missing:
        raise RowError(missing[0], f"key column(s) {missing} missing or not non-empty strings")
    for name in KEY:
        if name != "config":
            _unicode(name, row[name])
    out: Row = {}
    for name, kind in COLUMNS.items():
        value = row.get(name)
        if name == "config":
            value = _config(value)
        elif value is None:
            pass
        elif kind is str:
            if not isinstance(value, str):
                raise RowError(name, f"must be a string, got {_shown(value)}")
            _unicode(name, value)
        elif name in ("valid", "is_default"):
            value = _int(name, value, 0, 1)
        elif kind is int:
            value = _int(name, value, 0, _INT64[1])
        else:
            value = _float(name, value, positive=name == "median_us")
        out[name] = value
    out["valid"] = out["valid"] or 0
    out["is_default"] = out["is_default"] or 0
    if out["valid"] and out["median_us"] is None:
        raise RowError("median_us", "a valid row needs its time (a finite positive number)")
    return out


# ---- the database ----------------------------------------------------------------------------


def _message(err: BaseException) -> str:
    return str(err).lower()


def _cannot_open(err: sqlite3.Error) -> bool:
    """Whether SQLite failed for lack of write access (to the file, or to create its side
    files), rather than because the file is damaged or busy."""
    name = getattr(err, "sqlite_errorname", "") or ""
    return (name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM"))
            or any(s in _message(err) for s in _CANNOT_OPEN))


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


def _check_schema(db: Any, path: Path | None) -> None:
    """DatabaseUnavailable when the file's results table is not kpt's (another program's
    table of that name, or an incompatible kpt): its rows could be neither read nor written."""
    if TABLE not in db.table_names():
        return
    found = db[TABLE].columns_dict
    missing = [name for name in COLUMNS if name not in found]
    if missing or set(db[TABLE].pks) != set(KEY):
        raise DatabaseUnavailable(
            f"{path or 'the database'}: its {TABLE!r} table is not kpt's autotune table "
            f"(columns {sorted(found)}; missing {missing or 'none'}, primary key "
            f"{db[TABLE].pks}); set {ENV_PATH} to another file")


def _check(conn: Any) -> None:
    """Raise :class:`_Corrupt` unless SQLite's quick check finds the file sound."""
    try:
        found = _retrying(lambda: conn.execute("PRAGMA quick_check").fetchall())
    except sqlite3.DatabaseError as err:
        if any(s in _message(err) for s in _CORRUPT):
            raise _Corrupt(str(err)) from err
        raise
    check = [r[0] for r in found]
    if check != ["ok"]:
        raise _Corrupt("integrity check failed: " + "; ".join(map(str, check[:3])))


class ResultsDB:
    """A connection to the results table. Use :meth:`open`; close it (or use ``with``).

    ``mode`` says how it was opened: ``"read-write"``, ``"read-only"``, ``"immutable"`` (a
    read-only location: SQLite reads the file as one that nothing changes) or ``"memory"``.
    """

    def __init__(self, database: Any, path: Path | None, mode: str = "read-write") -> None:
        self._db = database
        self._lock = threading.RLock()
        self.path = path  # None for an in-memory database
        self.mode = mode

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path | None = None, *, readonly: bool = False,
             allow_memory: bool = False) -> ResultsDB:
        """Open the database at ``path`` or :func:`default_path`.

        For writing (the default) the file is created if needed, and a corrupt one is moved
        aside and rebuilt (once, however many processes find it). A file that cannot be written
        raises :class:`DatabaseUnavailable`; only with ``allow_memory`` does this process get
        an in-memory database instead (seeded from the file when it is readable), with a
        warning: its writes reach no file.

        ``readonly`` opens an existing file and changes nothing (no table, no moving aside); in
        a location this process cannot write it reads the file as immutable. It raises
        :class:`DatabaseUnavailable` when the file is missing, corrupt or unreadable. Either
        mode raises it when sqlite-utils is not installed.
        """
        try:
            import sqlite_utils  # noqa: F401
        except ImportError as err:
            raise DatabaseUnavailable(f"sqlite-utils is not installed ({err})") from None
        path = Path(path) if path is not None else default_path()
        memory = _MEMORY.get(str(path))
        if memory is not None and (readonly or allow_memory):
            return memory
        if readonly:
            return cls._open_reader(path)
        try:
            return cls._open_writer(path)
        except DatabaseUnavailable as err:
            if not allow_memory:
                raise
            return cls._memory_fallback(path, err)

    @classmethod
    def _open_writer(cls, path: Path) -> ResultsDB:
        try:
            try:
                return cls._open_file(path)
            except _Corrupt as err:
                cls._recover(path, _identity(path), str(err))
                return cls._open_file(path)
        except _Corrupt as err:
            raise DatabaseUnavailable(
                f"autotune database {path} is corrupt and could not be rebuilt: {err}") from None
        except (OSError, sqlite3.Error) as err:
            raise DatabaseUnavailable(
                f"cannot write the autotune database {path}: {err} (set {ENV_PATH} to a "
                "writable path)") from None

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
        db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: a commit survives a killed process
        _check(db)
        _check_schema(db, self.path)

        def create() -> None:
            if TABLE not in db.table_names():  # checked again under the write lock: a race
                db[TABLE].create(COLUMNS, pk=KEY, not_null=set(KEY))
                db[TABLE].create_index(["fingerprint", "op", "dtype", "bucket"])
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

        if TABLE not in db.table_names():  # only a new file takes the write lock here
            self._write(create)

    @classmethod
    def _recover(cls, path: Path, seen: tuple[int, int] | None, reason: str) -> None:
        """Move the corrupt file at ``path`` aside and create a fresh database there, once.

        Two processes that find the same damaged file must not both move it: the second would
        move away the fresh database the first one rebuilt, with every row written to it since.
        So this holds an OS lock on ``<path>.lock`` and looks again first: a file that is not
        the one found corrupt (``seen``: its device and inode), or is no longer corrupt, is left
        alone. The fresh database is created before the lock is released.
        """
        with _file_lock(path):
            if _identity(path) != seen or seen is None:
                return  # moved (and maybe rebuilt) by another process since
            still = _corruption(path)
            if still is None:
                return
            _move_aside(path, still)
            cls._open_file(path).close()

    @classmethod
    def _open_reader(cls, path: Path) -> ResultsDB:
        try:
            if not path.is_file():
                raise DatabaseUnavailable(f"no autotune database at {path}")
            uri = path.resolve().as_uri()
            try:
                return cls._connect_checked(f"{uri}?mode=ro", path, "read-only")
            except sqlite3.OperationalError as err:
                if not _cannot_open(err):
                    raise
                reason = str(err)
            # SQLite reads a WAL database only where it can create or open the -shm file;
            # elsewhere the file can be read as immutable, which ignores the -wal file: fine
            # when there is none (a clean close leaves none), not when it holds rows.
            wal = Path(f"{path}-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                raise DatabaseUnavailable(
                    f"cannot read the autotune database {path} here ({reason}): its write-ahead "
                    f"log {wal.name} holds committed rows that SQLite reads only with write "
                    f"access to {path.parent}; open it once where it can be written")
            log.info("autotune database %s: %s; reading it as an immutable file", path, reason)
            return cls._connect_checked(f"{uri}?mode=ro&immutable=1", path, "immutable")
        except _Corrupt as err:
            raise DatabaseUnavailable(
                f"autotune database {path} is corrupt ({err}); the next write (warmup, import, "
                "clear) moves it aside") from None
        except (OSError, sqlite3.Error) as err:
            raise DatabaseUnavailable(f"cannot read the autotune database {path}: {err}") from None

    @classmethod
    def _connect_checked(cls, uri: str, path: Path, mode: str) -> ResultsDB:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            self = cls(_wrap(conn), path, mode)
            _check(self._db)
            _check_schema(self._db, path)
            return self
        except BaseException:
            conn.close()
            raise

    @classmethod
    def _memory_fallback(cls, path: Path, err: BaseException) -> ResultsDB:
        """An in-memory database for this process, seeded from ``path`` when it is readable."""
        log.warning(
            "%s; using an in-memory database for this process: its results are not saved "
            "(set %s to a writable path to keep them)", err, ENV_PATH,
        )
        self = cls(_wrap(sqlite3.connect(":memory:", check_same_thread=False)), None, "memory")
        self._prepare()
        try:
            with cls._open_reader(path) as readable:
                self.write(readable.rows())
        except DatabaseUnavailable:
            pass  # nothing readable there: start empty
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

    def describe(self) -> str:
        """Where rows come from or go, for messages."""
        if self.path is None:
            return "the in-memory database (not saved)"
        if self.mode == "immutable":
            return f"{self.path} (read as immutable: the location is read-only)"
        return str(self.path)

    # ---- transactions ----------------------------------------------------------------------

    def _write(self, body: Callable[[], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked."""
        if self.mode in ("read-only", "immutable"):
            raise DatabaseUnavailable(f"autotune database {self.path} was opened read-only")

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

    def write(self, rows: Iterable[Mapping[str, Any]], *, replace_groups: bool = False) -> int:
        """Insert rows in one transaction, replacing stored rows of the same key; returns the
        number of rows stored (rows given twice with one key count once: the last one wins).

        Every row is checked first (:func:`normalize`): one bad row raises :class:`RowError`
        and nothing is written. When this returns, the rows are committed.

        With ``replace_groups`` every existing row of the rows' (op, dtype, bucket, fingerprint)
        groups is deleted first, so a group always holds one tuning session's measurements
        (times from different sessions are not comparable).
        """
        unique = {tuple(r[k] for k in KEY): r for r in map(normalize, rows)}
        checked = list(unique.values())
        if not checked:
            return 0
        groups = sorted({tuple(r[k] for k in GROUP) for r in checked})
        where = " AND ".join(f"[{k}] = ?" for k in GROUP)

        def body() -> None:
            if replace_groups:
                for group in groups:
                    self._db.execute(f"DELETE FROM [{TABLE}] WHERE {where}", group)
            self._db[TABLE].insert_all(checked, pk=KEY, replace=True)

        self._write(body)
        return len(checked)

    def rows(self, *, fingerprint: str | None = None, op: str | None = None) -> list[Row]:
        """Rows in key order, optionally only of one fingerprint and/or op. A stored row that
        is not a valid row (written by hand, or by an older kpt) is left out with a warning."""
        found, bad = self.read_rows(fingerprint=fingerprint, op=op)
        if bad:
            log.warning("autotune database %s: %d stored row(s) left out, e.g. %s",
                        self.describe(), len(bad), bad[0])
        return found

    def read_rows(self, *, fingerprint: str | None = None,
                  op: str | None = None) -> tuple[list[Row], list[str]]:
        """Like :meth:`rows`, and why each stored row that is not a valid row was left out."""
        where, params = _where(fingerprint=fingerprint, op=op)
        with self._lock:
            if TABLE not in self._db.table_names():
                return [], []  # an empty file (a reader does not create the table)
            stored = list(self._db[TABLE].rows_where(where, params, order_by=", ".join(KEY)))
        found, bad = [], []
        for row in stored:
            try:
                found.append(normalize(row))
            except RowError as err:
                bad.append(f"{row.get('op')}/{row.get('backend')} {row.get('bucket')} "
                           f"{row.get('config')}: {err}")
        return found, bad

    def delete(self, *, fingerprint: str | None = None, op: str | None = None) -> int:
        """Delete rows (all, or of one fingerprint and/or op); returns how many."""
        where, params = _where(fingerprint=fingerprint, op=op)
        sql = f"DELETE FROM [{TABLE}]" + (f" WHERE {where}" if where else "")
        return self._write(lambda: self._db.execute(sql, params).rowcount)

    def count(self) -> int:
        with self._lock:
            return self._db[TABLE].count if TABLE in self._db.table_names() else 0


@dataclass(frozen=True)
class Stored:
    """Rows read from the database: ``source`` says where from (or that there is no database),
    ``left_out`` why each stored row that is not a valid row was not returned."""

    rows: list[Row]
    source: str
    exists: bool
    left_out: list[str]


def read_stored(*, fingerprint: str | None = None, op: str | None = None,
                path: str | Path | None = None) -> Stored:
    """The rows of the database at ``path`` (default :func:`default_path`), read without
    creating or changing it, with where they came from. Raises :class:`DatabaseUnavailable`
    when a database is there but cannot be read: no rows is said only when there are none."""
    path = Path(path) if path is not None else default_path()
    if str(path) not in _MEMORY and not path.exists():
        return Stored([], f"no database at {path}", False, [])
    with ResultsDB.open(path, readonly=True) as database:
        found, bad = database.read_rows(fingerprint=fingerprint, op=op)
        return Stored(found, database.describe(), True, bad)


def stored_rows(*, fingerprint: str | None = None, op: str | None = None,
                path: str | Path | None = None) -> list[Row]:
    """Rows of the database at ``path`` (default :func:`default_path`), read without creating
    or changing it: none when there is no database yet. Lookup and the read-only commands use
    this; only writes (tuning, import, clear) create the file."""
    path = Path(path) if path is not None else default_path()
    if str(path) not in _MEMORY and not path.exists():
        return []
    with ResultsDB.open(path, readonly=True) as database:
        return database.rows(fingerprint=fingerprint, op=op)


def _where(**equal: str | None) -> tuple[str | None, list[str]]:
    names = [k for k, v in equal.items() if v is not None]
    return (" AND ".join(f"[{k}] = ?" for k in names) or None, [equal[k] for k in names])


def _wrap(conn: sqlite3.Connection) -> Any:
    import sqlite_utils

    return sqlite_utils.Database(conn, execute_plugins=False)


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, or None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold the OS lock of ``<path>.lock`` (released by the OS if this process dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise DatabaseUnavailable(
            f"waited {LOCK_WAIT_S:.0f} s for another process repairing {path}") from None
    try:
        yield
    finally:
        lock.release()


def _corruption(path: Path) -> str | None:
    """Why the file at ``path`` is damaged; None when it reads as a sound database, or cannot
    be opened at all (not damage: moving it aside would not help)."""
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return None
    try:
        _check(conn)
        return None
    except _Corrupt as err:
        return str(err)
    except sqlite3.DatabaseError as err:
        return str(err) if any(s in _message(err) for s in _CORRUPT) else None
    finally:
        conn.close()


def _move_aside(path: Path, reason: str) -> Path:
    """Rename a corrupt database (and its WAL side files) to ``<name>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 0
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1  # never replace an earlier copy
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    # The side files first: a database created at ``path`` must not find the damaged one's log.
    for suffix in ("-wal", "-shm", ""):
        try:
            os.replace(f"{path}{suffix}", f"{target}{suffix}")
        except FileNotFoundError:
            continue
    log.warning(
        "autotune database %s is corrupt (%s); moved it to %s and starting a fresh one",
        path, reason, target.name,
    )
    return target


# In-memory databases by requested path (``open(allow_memory=True)``): results written in this
# process stay readable by it.
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


def _parse(text: str, where: str) -> Any:
    """One JSON value; ValueError naming ``where`` (and the line and column) if it is bad."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {err.lineno}, " if where == "the JSON array" else ""
        raise ValueError(f"{where}: not JSON ({err.msg} at {at}column {err.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ValueError(f"{where}: an integer of more than {sys.get_int_max_str_digits()} "
                         f"digits ({str(err).split(':')[0]})") from None


def load_rows(file: str | Path) -> list[Row]:
    """Read rows from JSON Lines or a JSON array (``-`` is stdin), every field checked.

    Raises ValueError naming the file, the line (the item, for a JSON array) and the field of
    the first bad row, with the number of other bad rows: a file is read whole or not at all.
    """
    if str(file) == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = False
    items: list[tuple[str, Any]]
    if text.lstrip().startswith("["):
        try:
            parsed = _parse(text, "the JSON array")
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
        if not isinstance(parsed, list):
            raise ValueError(f"{file}: not JSON Lines or a JSON array")
        items = [(f"item {i} of the JSON array", item) for i, item in enumerate(parsed, 1)]
    else:
        # "\n" ends a line, as in JSON Lines (str.splitlines would split inside JSON strings)
        items = [(f"line {n}", line) for n, line in enumerate(text.split("\n"), 1)
                 if line.strip()]
        lines = True
    rows, errors = [], []
    for where, item in items:
        try:
            rows.append(normalize(_parse(item, where) if lines else item))
        except RowError as err:
            errors.append(f"{where}: {err}")
        except ValueError as err:
            errors.append(str(err))
    if errors:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ValueError(f"{file}: {errors[0]}{more}")
    return rows


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
