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
                "valid": 1, "median_us": float(i), "spread": 0.01, "samples": 3,
            }])
            time.sleep(0.001)
