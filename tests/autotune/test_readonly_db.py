"""A database in a location this process cannot write: readers still read it, in place, and
``export`` says where its rows came from; it never reports "exported 0 rows" with exit 0 when
rows are there but could not be read."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from autotune_helpers import FAKE_OP, make_row

from kpt.autotune import db
from kpt.autotune.cli import main

ROWS = 7


def _seed(path: Path, count: int = ROWS) -> list[dict]:
    with db.ResultsDB.open(path) as database:
        database.write([make_row("slow", bucket=f"n{i}") for i in range(count)])
        rows = database.rows()
    assert not Path(f"{path}-wal").exists()  # a clean close leaves no log behind
    return rows


@contextlib.contextmanager
def _immutable_dir(folder: Path) -> Iterator[None]:
    """The folder made unwritable for root too (``chattr +i``), or the test skipped."""
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root, and no chattr to make a folder read-only for root")
    done = subprocess.run([chattr, "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root, and chattr +i failed here: {done.stderr.strip()}")
    try:
        probe = folder / "probe"
        with pytest.raises(OSError):
            probe.write_text("")
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


@contextlib.contextmanager
def _read_only_dir(folder: Path) -> Iterator[None]:
    if os.geteuid() == 0:
        with _immutable_dir(folder):
            yield
        return
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


def _check_reads_in_place(path: Path, expected: list[dict], tmp_path: Path, capsys) -> None:
    assert db.stored_rows(path=path) == expected
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "exported.jsonl"
    assert main(["export", str(out)]) == 0
    message = capsys.readouterr().out
    assert f"exported {ROWS} rows from {path}" in message and "immutable" in message
    assert db.load_rows(out) == expected
    assert main(["show", "--all"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if FAKE_OP in ln]) == ROWS
    with db.ResultsDB.open(path, readonly=True) as database:
        assert database.mode == "immutable" and database.count() == ROWS
    # A writer is told, in one line, and nothing claims success.
    assert main(["import", str(out)]) == 3
    captured = capsys.readouterr()
    assert "imported" not in captured.out and len(captured.err.splitlines()) == 1
    # Nothing created beside the file: no -shm, -wal or lock file.
    assert sorted(p.name for p in path.parent.glob(path.name + "*")) == [path.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; "
                    "test_read_only_folder_for_root makes the folder immutable instead")
def test_read_only_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "autotune.db"
    expected = _seed(path)
    monkeypatch.setenv(db.ENV_PATH, str(path))
    with _read_only_dir(folder):
        _check_reads_in_place(path, expected, tmp_path, capsys)


@pytest.mark.skipif(os.geteuid() != 0, reason="test_read_only_folder covers other users")
def test_read_only_folder_for_root(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "autotune.db"
    expected = _seed(path)
    monkeypatch.setenv(db.ENV_PATH, str(path))
    with _immutable_dir(folder):
        _check_reads_in_place(path, expected, tmp_path, capsys)


def _refuse_unless_immutable(monkeypatch) -> None:
    """SQLite as in a read-only folder: nothing opens but an immutable read."""
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        if "immutable=1" not in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_read_only_location_simulated(autotune_db, tmp_path, monkeypatch, capsys):
    # Runs everywhere (root or not): connect() fails the way SQLite does where it cannot
    # create the -shm file. Before: export fell back to an empty in-memory database and
    # printed "exported 0 rows" with exit 0.
    expected = _seed(autotune_db)
    _refuse_unless_immutable(monkeypatch)
    _check_reads_in_place(autotune_db, expected, tmp_path, capsys)


def test_rows_only_in_the_log_are_an_error_not_zero_rows(tmp_path, monkeypatch, capsys):
    """Committed rows still in the -wal file cannot be read without write access: export fails
    naming the log instead of exporting the rows it can see."""
    source = tmp_path / "live" / "autotune.db"
    _seed(source, 3)
    with db.ResultsDB.open(source) as database:
        database._db.execute("PRAGMA wal_autocheckpoint=0")
        database.write([make_row("fast", '{"block":1}', bucket=f"n{i}") for i in range(4)])
        copy = tmp_path / "copy"  # the file and its log as a crashed writer leaves them
        copy.mkdir()
        shutil.copy(source, copy / "autotune.db")
        shutil.copy(f"{source}-wal", copy / "autotune.db-wal")
    monkeypatch.setenv(db.ENV_PATH, str(copy / "autotune.db"))
    _refuse_unless_immutable(monkeypatch)
    out = tmp_path / "out.jsonl"
    assert main(["export", str(out)]) == 3
    captured = capsys.readouterr()
    assert "exported" not in captured.out and not out.exists()
    (line,) = captured.err.splitlines()
    assert line.startswith("kpt-autotune export: error:") and "autotune.db-wal" in line


def test_export_of_a_corrupt_database_is_an_error(autotune_db, tmp_path, capsys):
    # Before: export moved the file aside, rebuilt it and printed "exported 0 rows", exit 0.
    _seed(autotune_db)
    data = autotune_db.read_bytes()
    autotune_db.write_bytes(data[:100] + b"\x13" * (len(data) - 100))
    out = tmp_path / "out.jsonl"
    assert main(["export", str(out)]) == 3
    captured = capsys.readouterr()
    assert "exported" not in captured.out
    (line,) = captured.err.splitlines()
    assert "corrupt" in line and str(autotune_db) in line
    assert list(tmp_path.glob("autotune.db.corrupt-*")) == []  # a reader moves nothing


def test_export_says_where_rows_come_from(autotune_db, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["export", str(out)]) == 0
    assert f"exported 0 rows to {out} (no database at {autotune_db})" in capsys.readouterr().out
    _seed(autotune_db)
    assert main(["export", str(out)]) == 0
    assert f"exported {ROWS} rows from {autotune_db} to {out}" in capsys.readouterr().out


def test_export_reports_stored_rows_it_cannot_export(autotune_db, tmp_path, capsys):
    _seed(autotune_db)
    conn = sqlite3.connect(autotune_db)  # a bad row written behind kpt's back
    with conn:
        conn.execute("UPDATE results SET median_us = -5 WHERE bucket = 'n0'")
    conn.close()
    out = tmp_path / "out.jsonl"
    assert main(["export", str(out)]) == 3
    captured = capsys.readouterr()
    assert f"exported {ROWS - 1} rows" in captured.out
    (line,) = captured.err.splitlines()
    assert "1 stored rows" in line and "median_us" in line
