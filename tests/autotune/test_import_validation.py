"""``kpt-autotune import`` checks every field of every row and names the line and field of a
bad one; every CLI error is one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from autotune_helpers import FAKE_OP, make_row

from kpt.autotune import db, lookup
from kpt.autotune.cli import main
from kpt.ops._registry import Problem

ROOT = Path(__file__).resolve().parents[2]


def _good(bucket: str = "n8", **extra) -> dict:
    return {**make_row("slow", bucket=bucket), **extra}


def _file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _stored() -> int:
    if not db.default_path().exists():
        return 0
    with db.ResultsDB.open(readonly=True) as database:
        return database.count()


BAD_LINES = {
    # name: (third line of the file, field the error must name)
    "nan": (json.dumps(_good("n3", median_us=float("nan"))), "median_us"),
    "negative": (json.dumps(_good("n3", median_us=-5)), "median_us"),
    "zero": (json.dumps(_good("n3", median_us=0)), "median_us"),
    "overflow": (json.dumps(_good("n3")).replace('"median_us": 10.0', '"median_us": 1e400'),
                 "median_us"),
    "infinity": (json.dumps(_good("n3", median_us=float("inf"))), "median_us"),
    "string_time": (json.dumps(_good("n3", median_us="5")), "median_us"),
    "valid_without_time": (json.dumps(_good("n3", median_us=None)), "median_us"),
    "negative_spread": (json.dumps(_good("n3", spread=-0.5)), "spread"),
    "long_int": (json.dumps(_good("n3", samples=10**30)), "samples"),
    "longer_int": (json.dumps(_good("n3")).replace('"samples": 20', '"samples": ' + "9" * 5000),
                   "line 3"),
    "bool_time": (json.dumps(_good("n3", median_us=True)), "median_us"),
    "valid_flag": (json.dumps(_good("n3", valid=7)), "valid"),
    "valid_text": (json.dumps(_good("n3", valid="yes")), "valid"),
    "op_not_text": (json.dumps(_good("n3", op=5)), "op"),
    "empty_backend": (json.dumps(_good("n3", backend="")), "backend"),
    "error_not_text": (json.dumps(_good("n3", error=["x"])), "error"),
    "config_list": (json.dumps(_good("n3", config=[1, 2])), "config"),
    "config_text": (json.dumps(_good("n3", config="not json")), "config"),
    "config_deep": (json.dumps(_good("n3", config={"a": json.loads("[" * 50 + "]" * 50)})),
                    "config"),
    "config_nan": (json.dumps(_good("n3", config={"split": float("nan")})), "config"),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, "line 3"),
    "deep_object": ('{"op": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001, "line 3"),
    "not_json": ('{"op": "x",', "line 3"),
    # JSON's "\ud800" escape decodes to a lone surrogate, which no UTF-8 encoder takes
    "lone_surrogate_key": (json.dumps(_good("n3", op="\ud800")), "op"),
    "lone_surrogate_text": (json.dumps(_good("n3", error="x\udfff")), "error"),
    "not_object": ('"a row"', "line 3"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_bad_row_is_one_error_naming_its_line_and_field(name, tmp_path, capsys):
    bad, field = BAD_LINES[name]
    path = _file(tmp_path, [json.dumps(_good("n1")), json.dumps(_good("n2")), bad,
                            json.dumps(_good("n4"))])
    assert main(["import", str(path)]) == 2
    captured = capsys.readouterr()
    assert "imported" not in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith(f"kpt-autotune import: error: {path}: line 3")
    assert field in line and "Traceback" not in captured.err
    assert _stored() == 0  # all or nothing


def test_a_negative_time_no_longer_wins(fingerprint, fake_op, tmp_path, capsys):
    # Before: the -5 row was imported and chosen over the measured default.
    rows = [make_row("slow", is_default=1, median_us=10.0),
            {**make_row("fast", '{"block":1}'), "median_us": -5.0}]
    path = _file(tmp_path, [json.dumps(r) for r in rows])
    assert main(["import", str(path)]) == 2
    assert "line 2: field median_us" in capsys.readouterr().err
    assert lookup(FAKE_OP, Problem("cuda", 0, torch.float32, (("n", 8),)), "n8") is None
    with pytest.raises(db.RowError, match="median_us"):
        with db.ResultsDB.open() as database:
            database.write(rows)
    assert _stored() == 0


def test_a_json_array_names_the_item(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_good("n1"), _good("n2", median_us=-1)], indent=1))
    assert main(["import", str(path)]) == 2
    assert "item 2 of the JSON array: field median_us" in capsys.readouterr().err
    path.write_text('[\n{"op": 1},\n')
    assert main(["import", str(path)]) == 2
    assert "line 3" in capsys.readouterr().err


def test_every_bad_row_is_counted(tmp_path, capsys):
    path = _file(tmp_path, [json.dumps(_good("n1", median_us=-1)), json.dumps(_good("n2")),
                            "{", json.dumps(_good("n4", samples=-3))])
    assert main(["import", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "line 1: field median_us" in line and line.endswith("(and 2 more bad rows)")


def test_a_key_given_twice_is_counted_once(tmp_path, capsys):
    path = _file(tmp_path, [json.dumps(_good("n1", median_us=1.0)), json.dumps(_good("n2")),
                            json.dumps(_good("n1", median_us=2.0))])
    assert main(["import", str(path)]) == 0
    assert "imported 2 rows" in capsys.readouterr().out
    assert _stored() == 2
    assert {r["bucket"]: r["median_us"] for r in db.stored_rows()} == {"n1": 2.0, "n2": 10.0}


def test_good_rows_still_round_trip(tmp_path, capsys):
    rows = [make_row("slow", bucket=f"n{i}") for i in range(5)]
    rows.append(make_row("fast", '{"block":4}', valid=0, error="ptxas error"))
    rows.append({**make_row("slow", bucket="n9"), "samples": 20.0, "valid": True})
    path = _file(tmp_path, [json.dumps(r) for r in rows])
    assert main(["import", str(path)]) == 0
    assert "imported 7 rows" in capsys.readouterr().out
    assert _stored() == 7


# ---- CLI errors: one line, non-zero, no traceback -------------------------------------------


def test_file_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["export", str(tmp_path / "missing" / "rows.jsonl")], 3, "cannot write"),
        (["export", str(tmp_path)], 3, "Is a directory"),
        (["import", str(tmp_path / "missing.jsonl")], 2, "cannot read"),
        (["import", str(tmp_path)], 2, "cannot read"),
    ]
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases.append((["import", str(binary)], 2, "not UTF-8"))
    empty_key = tmp_path / "empty.jsonl"
    empty_key.write_text('{"op": "x"}\n')
    cases.append((["import", str(empty_key)], 2, "key column"))
    for argv, status, text in cases:
        assert main(argv) == status, argv
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"kpt-autotune {argv[0]}: error:") and text in line, (argv, line)


@pytest.mark.parametrize("command", ["import", "export", "show"])
def test_a_results_table_of_another_schema_is_named_not_touched(command, tmp_path, capsys):
    """A 'results' table of another program (or an incompatible kpt) at the database path: a
    one-line error naming the file, and the table left as it was (import used to exit 4 with
    InvalidColumns, export 3 with 'no such column: config')."""
    import sqlite3

    path = db.default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("create table results (op text, backend text)")
        conn.execute("insert into results values ('theirs', 'x')")
    rows = _file(tmp_path, [json.dumps(_good("n1"))])
    argv = {"import": ["import", str(rows)], "export": ["export", str(tmp_path / "out.jsonl")],
            "show": ["show", "--all"]}[command]
    assert main(argv) in (2, 3)
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"kpt-autotune {command}: error:") and str(path) in line
    assert "not kpt's" in line and "Traceback" not in captured.err
    with sqlite3.connect(path) as conn:
        assert conn.execute("select * from results").fetchall() == [("theirs", "x")]
        columns = [c[1] for c in conn.execute("pragma table_info(results)")]
    assert columns == ["op", "backend"]


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    from kpt.autotune import cli

    def broken(args):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(cli, "_show", broken)
    assert main(["show", "--all"]) == 4
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("kpt-autotune show: error: unexpected RuntimeError: something unforeseen "
                    "(-v shows the traceback)")


@pytest.mark.parametrize("case", ["export_to_missing_folder", "deep_nesting", "huge_number"])
def test_the_command_line_prints_no_traceback(case, tmp_path):
    env = {**os.environ, db.ENV_PATH: str(tmp_path / "autotune.db"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if case == "export_to_missing_folder":
        db.ResultsDB.open(tmp_path / "autotune.db").write([_good("n1")])
        argv = ["export", str(tmp_path / "missing" / "out.jsonl")]
    else:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("[" * 200_000 + "]" * 200_000 if case == "deep_nesting"
                       else json.dumps(_good("n1")).replace("10.0", "1e400"))
        argv = ["import", str(bad)]
    done = subprocess.run([sys.executable, "-m", "kpt.autotune.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (2, 3), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert "exported" not in done.stdout and "imported" not in done.stdout
