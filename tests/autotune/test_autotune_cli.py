"""``kpt-autotune`` in-process: warmup without a GPU, show, export, import, clear, doctor."""

from __future__ import annotations

import json

import pytest
import torch
from autotune_helpers import FAKE_OP, FINGERPRINT, make_row

from kpt.autotune import db
from kpt.autotune.cli import NO_DEVICE, main

LLAMA_LIKE = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}


@pytest.fixture
def seeded(fingerprint, fake_op):
    rows = [make_row("slow", is_default=1, median_us=10.0),
            make_row("fast", '{"block":1}', median_us=4.0),
            make_row("fast", '{"block":4}', valid=0, error="ptxas error"),
            make_row("slow", is_default=1, median_us=10.0, fingerprint="Other GPU")]
    with db.ResultsDB.open() as database:
        database.write(rows)
    return rows


def test_warmup_without_gpu_exits_zero_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(LLAMA_LIKE))
    assert main(["warmup", "--model", str(tmp_path / "model"), "--tokens", "1,16"]) == 0
    assert NO_DEVICE in capsys.readouterr().out


def test_warmup_rejects_bad_input_before_looking_for_a_gpu(tmp_path, capsys):
    assert main(["warmup", "--model", str(tmp_path / "missing.json")]) == 2
    assert "cannot read model config" in capsys.readouterr().err
    assert main(["warmup", "--shapes", '[{"tokens": 1}]']) == 2  # which op?
    with pytest.raises(SystemExit):
        main(["warmup", "--model", "x", "--tokens", "0,a"])


def test_show_lists_this_gpus_winners(seeded, capsys):
    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert FINGERPRINT in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith(FAKE_OP)]
    assert line.split() == [FAKE_OP, "float32", "n8", "fast", '{"block":1}', "4.00", "10.00",
                            "2.50x"]


def test_show_all_lists_every_row_with_its_status(seeded, capsys):
    assert main(["show", "--all"]) == 0
    out = capsys.readouterr().out
    assert "Other GPU" in out and "invalid: ptxas error" in out
    assert len([ln for ln in out.splitlines() if FAKE_OP in ln]) == 4


def test_export_clear_import_round_trip(seeded, tmp_path, capsys):
    with db.ResultsDB.open() as database:
        before = database.rows()
    out = tmp_path / "rows.jsonl"
    assert main(["export", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4

    assert main(["clear", "--op", "nothing_like_this", "--yes"]) == 0
    assert main(["clear"]) == 2  # not a terminal and no --yes: refuse
    assert main(["clear", "--yes"]) == 0
    with db.ResultsDB.open() as database:
        assert database.rows() == []

    assert main(["import", str(out)]) == 0
    assert "imported 4 rows" in capsys.readouterr().out
    with db.ResultsDB.open() as database:
        assert database.rows() == before


def test_import_rejects_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "x"}\n')
    assert main(["import", str(bad)]) == 2
    assert "key column" in capsys.readouterr().err


def test_doctor_reports_every_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "torch" in out and "nvcc" in out
    lines = [ln.split(None, 2) for ln in out.splitlines() if ln.startswith("rmsnorm_qkv_rope")]
    status = {backend: rest for _, backend, rest in lines}
    assert set(status) == {"cuda", "hip", "triton", "reference", "xla", "xpu"}
    assert status["reference"] == "ok"
    if not torch.cuda.is_available():
        assert "device cpu" in status["cuda"]


def test_read_only_commands_create_no_database(autotune_db, capsys):
    for argv in (["show", "--all"], ["show", "--fingerprint", FINGERPRINT], ["export", "-"],
                 ["clear", "--yes"], ["doctor"]):
        assert main(argv) == 0, argv
    assert list(autotune_db.parent.glob(autotune_db.name + "*")) == []
    assert "deleted 0 rows" in capsys.readouterr().out


def test_show_all_lists_shipped_rows_and_whether_they_are_trusted(seeded, capsys):
    db.SHIPPED_DIR.mkdir()
    db.dump_rows([make_row("slow", is_default=1, bucket="n64", source_hash="0" * 16)],
                 db.SHIPPED_DIR / "test-gpu.jsonl")
    assert main(["show", "--all"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "n64" in ln]
    assert line.startswith("shipped") and "stale: source_hash '0000000000000000'" in line


def test_export_ship_writes_this_gpus_trusted_rows_as_its_shipped_file(seeded, tmp_path,
                                                                        capsys):
    changed = make_row("fast", '{"block":1}', median_us=3.0, bucket="n16",
                       source_hash="0" * 16)  # measured on a kernel that has changed since
    with db.ResultsDB.open() as database:
        database.write([changed])
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["export", "--ship", str(folder)]) == 0
    assert "1 rows of changed kernels" in capsys.readouterr().out
    (written,) = folder.iterdir()
    assert written.name == db.shipped_file_name(FINGERPRINT) == "test-gpu.jsonl"
    rows = db.load_rows(written)
    assert sorted(r["config"] for r in rows) == ['{"block":1}', '{"block":4}', "{}"]
    assert {(r["fingerprint"], r["bucket"]) for r in rows} == {(FINGERPRINT, "n8")}

    # By default into the folder lookup reads shipped rows from; the file is then whole.
    db.SHIPPED_DIR.mkdir()
    assert main(["export", "--ship"]) == 0
    assert sorted(map(str, db.shipped_rows(FINGERPRINT))) == sorted(map(str, rows))


def test_export_rejects_inconsistent_arguments(seeded, capsys):
    assert main(["export"]) == 2  # neither a file nor --ship
    assert main(["export", "--fingerprint", FINGERPRINT, "-"]) == 2
    assert main(["export", "--ship", "--op", FAKE_OP]) == 2  # would drop the other ops' rows
    assert main(["export", "--ship", "--fingerprint", "Unknown GPU/sm_00"]) == 2  # no rows
    assert capsys.readouterr().err.count("error:") == 4


@pytest.mark.parametrize("command", ["warmup", "show", "export", "import", "clear", "doctor"])
def test_every_command_has_a_description(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[0].startswith(f"usage: kpt-autotune {command}")
    assert not paragraphs[1].startswith(("positional arguments", "options"))
    assert len(paragraphs[2].split()) > 10  # what it does, beyond the one-line summary
