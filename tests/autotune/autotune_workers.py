"""Entry points for the multi-process tests; imports only the database (no torch), so that
spawned workers start fast."""

from __future__ import annotations

import sys
import time


def write_rows(path: str, worker: int, count: int, barrier) -> None:
    """Open the database, wait until every worker has, then write ``count`` rows, one
    transaction each, pausing briefly between them so the writers interleave. Exits 3 if the
    database fell back to memory (the rows would be lost)."""
    from kpt.autotune.db import ResultsDB

    with ResultsDB.open(path) as database:
        if database.in_memory:
            sys.exit(3)
        barrier.wait(timeout=60)
        for i in range(count):
            database.write([{
                "op": "stress", "backend": f"w{worker}", "config": f'{{"i":{i}}}',
                "dtype": "bfloat16", "bucket": f"T{i}", "fingerprint": "fp",
                "valid": 1, "median_us": float(i + 1), "spread": 0.01, "samples": 3,
            }])
            time.sleep(0.001)


def _row(worker: str, i: int) -> dict:
    return {"op": "stress", "backend": worker, "config": f'{{"i":{i}}}', "dtype": "bfloat16",
            "bucket": f"T{i}", "fingerprint": "fp", "valid": 1, "median_us": float(i + 1),
            "spread": 0.01, "samples": 3}


def open_corrupt_then_write(path: str, worker: int, count: int, barrier, written, out) -> None:
    """Open a database file that every worker finds corrupt, then write ``count`` rows and
    report how many writes returned, as ``(worker, reported, in_memory)`` on ``out``.

    Every worker first fails to open the garbage (``ResultsDB._open_file`` raises) and waits
    at ``barrier``; worker 0 then repairs the file, writes its rows, reports them and sets
    ``written``; only then do the others go on to repair what they found corrupt: a second
    repair must not move away worker 0's fresh database and its rows."""
    from kpt.autotune import db

    found = db.ResultsDB._open_file.__func__
    seen = []

    def open_file(cls, target):
        try:
            return found(cls, target)
        except db._Corrupt:
            if not seen:  # the first time: the garbage every worker opened
                seen.append(True)
                barrier.wait(timeout=60)
                if worker != 0:
                    written.wait(timeout=60)
            raise

    db.ResultsDB._open_file = classmethod(open_file)
    reported = 0
    try:
        with db.ResultsDB.open(path) as database:
            for i in range(count):
                reported += database.write([_row(f"w{worker}", i)])
            out.put((worker, reported, database.in_memory))
    except Exception as err:  # noqa: BLE001 - told to the test, which fails on it
        out.put((worker, reported, f"{type(err).__name__}: {err}"))
    finally:
        if worker == 0:
            written.set()


def race_on_corrupt_file(path: str, worker: int, count: int, barrier, out) -> None:
    """Open (at the same moment as the other workers) a file that is corrupt, write ``count``
    rows one transaction each, report ``(worker, reported, in_memory)`` on ``out``."""
    from kpt.autotune.db import ResultsDB

    reported = 0
    try:
        barrier.wait(timeout=60)
        with ResultsDB.open(path) as database:
            for i in range(count):
                reported += database.write([_row(f"w{worker}", i)])
            out.put((worker, reported, database.in_memory))
    except Exception as err:  # noqa: BLE001
        out.put((worker, reported, f"{type(err).__name__}: {err}"))


def write_until_killed(path: str, tag: str, batch: int, conn) -> None:
    """Write batches of ``batch`` rows, one transaction each, forever; after each commit send
    the batch number on ``conn`` (a pipe: sent before the next write starts)."""
    from kpt.autotune.db import ResultsDB

    with ResultsDB.open(path) as database:
        n = 0
        while True:
            database.write([_row(tag, n * batch + j) for j in range(batch)])
            conn.send(n)
            n += 1


def inspect(path: str, out) -> None:
    """From a fresh process: ``(rows as (backend, bucket) pairs, integrity check, in_memory)``
    of the database at ``path``, or the error opening it."""
    import sqlite3

    from kpt.autotune.db import ResultsDB

    try:
        with ResultsDB.open(path) as database:
            rows = [(r["backend"], r["bucket"]) for r in database.rows()]
            in_memory = database.in_memory
        conn = sqlite3.connect(path)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
        out.put((rows, [c[0] for c in check], in_memory))
    except Exception as err:  # noqa: BLE001
        out.put(([], [f"{type(err).__name__}: {err}"], None))
