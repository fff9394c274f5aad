"""Faults around the database: a corrupt file found by several processes at once, a writer
killed mid-write, a location that cannot be written. Every test counts rows: a write that was
reported is on disk (0 reported-but-missing), and no committed row is lost."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sqlite3
import time

import pytest
from autotune_helpers import make_row
from autotune_workers import (
    inspect,
    open_corrupt_then_write,
    race_on_corrupt_file,
    write_until_killed,
)

from kpt.autotune import db
from kpt.autotune.cli import main

GARBAGE = b"this is not a sqlite database\x00\xff" * 512
CTX = multiprocessing.get_context("spawn")


def _results(out, count: int, timeout: float = 120.0) -> list[tuple]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        try:
            got.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            break
    return sorted(got)


def _join(processes) -> None:
    for p in processes:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            p.join()


def _inspect(path) -> tuple[list, list, object]:
    """The rows, integrity check and in-memory flag of ``path``, seen by a new process."""
    out = CTX.Queue()
    p = CTX.Process(target=inspect, args=(str(path), out))
    p.start()
    (found,) = _results(out, 1) or [([], ["no answer"], None)]
    _join([p])
    return found


def _moved(path) -> list:
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*")
                  if not p.name.endswith(("-wal", "-shm")))


# ---- a writer never reports a write it did not make ---------------------------------------


def test_a_writer_that_cannot_write_gets_an_error_not_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"  # a parent that is a file: nobody, root included, can
    blocker.write_text("")  # create the database there
    monkeypatch.setenv(db.ENV_PATH, str(blocker / "autotune.db"))
    with pytest.raises(db.DatabaseUnavailable, match="cannot write the autotune database"):
        db.ResultsDB.open()
    assert db._MEMORY == {}


def test_memory_only_when_the_caller_asks(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(db.ENV_PATH, str(blocker / "autotune.db"))
    with caplog.at_level(logging.WARNING, logger="kpt"):
        database = db.ResultsDB.open(allow_memory=True)
    assert database.in_memory and database.mode == "memory"
    assert any("in-memory" in r.message and "not saved" in r.message for r in caplog.records)
    assert database.write([make_row("slow")]) == 1
    # This process reads its rows back; a strict writer still gets the error.
    assert len(db.stored_rows()) == 1
    with pytest.raises(db.DatabaseUnavailable):
        db.ResultsDB.open()
    assert blocker.read_text() == ""


def test_a_corrupt_file_that_cannot_be_moved_aside_is_an_error(autotune_db, tmp_path,
                                                               monkeypatch, capsys):
    # Before: the rename failed, the writer fell back to memory and import printed
    # "imported 1 rows" with nothing on disk.
    autotune_db.write_bytes(GARBAGE)

    def no_rename(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "replace", no_rename)
    rows = tmp_path / "rows.jsonl"
    db.dump_rows([make_row("slow")], rows)
    assert main(["import", str(rows)]) == 3
    captured = capsys.readouterr()
    assert "imported" not in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith("kpt-autotune import: error:") and str(autotune_db) in line
    assert autotune_db.read_bytes() == GARBAGE


def test_an_unwritable_database_fails_import_with_one_line(autotune_db, tmp_path, monkeypatch,
                                                           capsys):
    """SQLite refusing to write (a read-only file system, say): import says so and exits 3.
    Before: it printed "imported 5 rows into the in-memory database" and exited 0."""
    real = sqlite3.connect

    def readonly(database, *args, **kwargs):
        if str(database) != ":memory:" and "mode=ro" not in str(database):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(database, *args, **kwargs)

    rows = tmp_path / "rows.jsonl"
    db.dump_rows([make_row("slow", bucket=f"n{i}") for i in range(5)], rows)
    monkeypatch.setattr(sqlite3, "connect", readonly)
    assert main(["import", str(rows)]) == 3
    captured = capsys.readouterr()
    assert "imported" not in captured.out
    assert len(captured.err.splitlines()) == 1 and "readonly" in captured.err


# ---- a corrupt file is moved aside once ----------------------------------------------------


def test_processes_that_find_one_corrupt_file_move_it_aside_once(autotune_db):
    # Three processes open the same garbage. The first repairs it and writes 200 rows; only
    # then do the other two repair what they found. Before: each moved the file aside again,
    # taking the first one's reported rows with it.
    autotune_db.write_bytes(GARBAGE)
    barrier, written, out = CTX.Barrier(3), CTX.Event(), CTX.Queue()
    workers = [CTX.Process(target=open_corrupt_then_write,
                           args=(str(autotune_db), w, 200 if w == 0 else 20, barrier, written,
                                 out)) for w in range(3)]
    for p in workers:
        p.start()
    results = _results(out, 3)
    _join(workers)
    assert [(w, memory) for w, _, memory in results] == [(0, False), (1, False), (2, False)]
    reported = {w: n for w, n, _ in results}
    assert reported == {0: 200, 1: 20, 2: 20}

    rows, check, in_memory = _inspect(autotune_db)
    assert (check, in_memory) == (["ok"], False)
    on_disk = {w: sum(1 for b, _ in rows if b == f"w{w}") for w in range(3)}
    assert on_disk == reported  # 0 lost, 0 reported-but-missing
    assert [p.read_bytes() for p in _moved(autotune_db)] == [GARBAGE]  # moved once


def test_many_processes_racing_on_a_corrupt_file_lose_no_row(autotune_db):
    autotune_db.write_bytes(GARBAGE)
    barrier, out = CTX.Barrier(4), CTX.Queue()
    workers = [CTX.Process(target=race_on_corrupt_file,
                           args=(str(autotune_db), w, 50, barrier, out)) for w in range(4)]
    for p in workers:
        p.start()
    results = _results(out, 4)
    _join(workers)
    assert [(w, n, memory) for w, n, memory in results] == [(w, 50, False) for w in range(4)]
    rows, check, _ = _inspect(autotune_db)
    assert check == ["ok"]
    assert len(rows) == 200 and len(set(rows)) == 200
    assert [p.read_bytes() for p in _moved(autotune_db)] == [GARBAGE]


def test_repairs_are_serialized_and_look_again_under_the_lock(autotune_db, monkeypatch):
    """In one process: a repair that finds the file already replaced leaves it alone."""
    autotune_db.write_bytes(GARBAGE)
    seen = db._identity(autotune_db)
    with db.ResultsDB.open() as database:  # the first repair
        database.write([make_row("slow")])
    db.ResultsDB._recover(autotune_db, seen, "found corrupt earlier")  # a late second one
    with db.ResultsDB.open() as database:
        assert len(database.rows()) == 1
    assert len(_moved(autotune_db)) == 1


# ---- a writer killed mid-write -----------------------------------------------------------


def test_kill_9_of_a_writer_loses_no_committed_row(autotune_db):
    reported: set[tuple[str, str]] = set()
    for round_ in range(3):  # the same file, killed three times at different points
        receive, send = CTX.Pipe(duplex=False)
        tag = f"k{round_}"
        writer = CTX.Process(target=write_until_killed, args=(str(autotune_db), tag, 25, send))
        writer.start()
        send.close()
        batches = []
        deadline = time.monotonic() + 60
        while len(batches) < 10 + 7 * round_ and time.monotonic() < deadline:
            if receive.poll(0.5):
                batches.append(receive.recv())
        time.sleep(0.003 * round_)  # land somewhere inside a transaction, or between two
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        while True:  # what it reported before it died
            try:
                batches.append(receive.recv())
            except EOFError:
                break
        assert len(batches) >= 10
        reported |= {(tag, f"T{n * 25 + j}") for n in batches for j in range(25)}

        rows, check, in_memory = _inspect(autotune_db)
        assert (check, in_memory) == (["ok"], False)
        assert reported <= set(rows), f"{len(reported - set(rows))} reported rows missing"
        assert len(set(rows)) == len(rows)
        # Whole transactions only: a batch is on disk entirely or not at all.
        for tag_ in {t for t, _ in rows}:
            buckets = sorted(int(b[1:]) for t, b in rows if t == tag_)
            assert len(buckets) % 25 == 0 and buckets == list(range(len(buckets)))
    assert _moved(autotune_db) == []
