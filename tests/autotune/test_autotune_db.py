"""The database: concurrent writers, corruption, unwritable locations, export/import, overlay."""

from __future__ import annotations

import json
import logging
import multiprocessing

import pytest
from autotune_helpers import make_row
from autotune_workers import write_rows

from kpt.autotune import db, effective_rows


def test_concurrent_writers_lose_no_row(autotune_db):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)  # all four open the new file, then write at once, interleaved
    workers = [ctx.Process(target=write_rows, args=(str(autotune_db), w, 50, barrier))
               for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    with db.ResultsDB.open() as database:
        rows = database.rows(op="stress")
    assert len(rows) == 200
    assert {(r["backend"], r["bucket"]) for r in rows} == {
        (f"w{w}", f"T{i}") for w in range(4) for i in range(50)
    }


def test_corrupt_file_is_moved_aside_and_rebuilt(autotune_db, caplog):
    garbage = b"this is not a sqlite database\x00\xff" * 512
    autotune_db.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="kpt"):
        database = db.ResultsDB.open()
    assert any("corrupt" in r.message for r in caplog.records)
    moved = list(autotune_db.parent.glob("autotune.db.corrupt-*"))
    assert [p.read_bytes() for p in moved] == [garbage]
    assert database.write([make_row("slow")]) == 1
    assert len(database.rows()) == 1
    database.close()


def test_truncated_database_is_detected(autotune_db, caplog):
    with db.ResultsDB.open() as database:
        database.write([make_row("slow", bucket=f"n{i}") for i in range(300)])
    data = autotune_db.read_bytes()
    autotune_db.write_bytes(data[:100] + b"\x13" * (len(data) - 100))  # header kept, pages broken
    with caplog.at_level(logging.WARNING, logger="kpt"):
        database = db.ResultsDB.open()
    assert any("corrupt" in r.message for r in caplog.records)
    assert database.rows() == []
    database.close()


def test_unwritable_location_is_an_error_unless_memory_is_asked_for(tmp_path, monkeypatch,
                                                                      caplog):
    # Tests run as root, which ignores permission bits: a parent that is a regular file is a
    # location nobody can create.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(db.ENV_PATH, str(blocker / "autotune.db"))
    with pytest.raises(db.DatabaseUnavailable, match="cannot write"):
        db.ResultsDB.open()  # a writer is never handed a database whose rows reach no file
    with caplog.at_level(logging.WARNING, logger="kpt"):
        database = db.ResultsDB.open(allow_memory=True)
    assert database.in_memory
    assert any("in-memory" in r.message for r in caplog.records)
    database.write([make_row("slow")])
    database.close()
    # The same process sees its results again; nothing was written to disk.
    with db.ResultsDB.open(allow_memory=True) as again:
        assert len(again.rows()) == 1
    assert blocker.read_text() == ""


def test_export_import_round_trip(autotune_db, tmp_path, monkeypatch):
    rows = [
        make_row("fast", '{"block":1,"warps":4}', median_us=1.0 / 3.0, spread=0.125),
        make_row("fast", '{"block":4}', valid=0, error="ptxas: élan \"quoted\"\nline 2"),
        make_row("slow", is_default=1, bucket="n16", dtype="bfloat16", shape='{"n":16}'),
    ]
    with db.ResultsDB.open() as database:
        database.write(rows)
        before = database.rows()
    out = tmp_path / "rows.jsonl"
    assert db.dump_rows(before, out) == 3
    monkeypatch.setenv(db.ENV_PATH, str(tmp_path / "fresh.db"))
    with db.ResultsDB.open() as fresh:
        fresh.write(db.load_rows(out))
        assert fresh.rows() == before
    # A JSON array (a hand-edited or shipped file) reads the same.
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([json.loads(line) for line in out.read_text().splitlines()]))
    assert db.load_rows(array) == before


def test_replace_groups_keeps_one_session_per_group(autotune_db):
    with db.ResultsDB.open() as database:
        database.write([make_row("fast", '{"block":1}'), make_row("fast", '{"block":2}'),
                        make_row("slow", bucket="n16")])
        database.write([make_row("slow", median_us=3.0)], replace_groups=True)
        left = {(r["backend"], r["config"], r["bucket"]) for r in database.rows()}
    assert left == {("slow", "{}", "n8"), ("slow", "{}", "n16")}


def test_user_groups_replace_shipped_groups(autotune_db, fingerprint):
    shipped_dir = db.SHIPPED_DIR
    shipped_dir.mkdir()
    shipped = [make_row("slow", bucket="n8", median_us=1.0), make_row("fast", '{"block":1}',
               bucket="n8"), make_row("slow", bucket="n16", median_us=2.0)]
    db.dump_rows(shipped + [make_row("slow", fingerprint="Other GPU")], shipped_dir / "gpu.jsonl")
    with db.ResultsDB.open() as database:
        database.write([make_row("slow", bucket="n8", median_us=9.0)])
    rows = effective_rows(fingerprint)
    by_bucket = {(r["bucket"], r["backend"]): r["median_us"] for r in rows}
    assert by_bucket == {("n8", "slow"): 9.0, ("n16", "slow"): 2.0}
