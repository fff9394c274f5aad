"""The tuned rows shipped in ``kpt/autotune/tuned/`` describe today's kernels.

Lookup ignores a row whose kernel sources changed since it was measured, so a stale shipped row
is dead weight that looks like tuning. This fails instead: after changing a kernel, re-tune on
that GPU (``kpt-autotune warmup ... && kpt-autotune export --ship``) or delete its rows.
Versions (torch, Triton) are not checked here: they are the user's machine's, not the code's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpt.autotune import db, provenance
from kpt.ops._registry import all_ops

# The package's own folder: the autotune tests' fixtures point db.SHIPPED_DIR elsewhere.
TUNED = Path(db.__file__).resolve().parent / "tuned"
FILES = sorted(p for p in TUNED.iterdir() if p.suffix in (".json", ".jsonl"))


@pytest.mark.parametrize("file", FILES, ids=[p.name for p in FILES])
def test_shipped_rows_match_the_current_kernels(file):
    ops = all_ops()
    stale = []
    for row in db.load_rows(file):
        op = ops.get(row["op"])
        if op is None or row["backend"] not in {b.name for b in op.backends}:
            stale.append(f"{row['op']}/{row['backend']}: no such op or backend")
        elif row["source_hash"] != provenance.source_hash(row["op"], row["backend"]):
            stale.append(f"{row['op']}/{row['backend']} {row['bucket']} {row['config']}: "
                         f"measured on kernel sources {row['source_hash']}, now "
                         f"{provenance.source_hash(row['op'], row['backend'])}")
    assert not stale, (
        f"{file.name}: {len(stale)} shipped rows describe kernels that have changed since they "
        "were measured; re-tune on that GPU (kpt-autotune warmup ... && kpt-autotune export "
        "--ship) or delete the rows:\n  " + "\n  ".join(stale))


@pytest.mark.parametrize("file", FILES, ids=[p.name for p in FILES])
def test_a_shipped_file_holds_one_gpu_and_is_named_for_it(file):
    fingerprints = {row["fingerprint"] for row in db.load_rows(file)}
    assert len(fingerprints) == 1, f"{file.name} mixes GPUs: {sorted(fingerprints)}"
    assert file.name == db.shipped_file_name(fingerprints.pop())
