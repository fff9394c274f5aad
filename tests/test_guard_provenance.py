"""Guard: the source hash stored with every tuned row (``kpt.autotune.provenance.source_hash``)
follows the *contents* of the kernels it describes.

A tuned row is trusted only while its ``source_hash`` equals the current one
(``provenance.stale_reason``). If the hash followed file sizes, names or anything but the bytes
of the kernels, an edited kernel of the same length would keep its old rows: timings (and a
winning config) measured on other code. These tests edit a CUDA source (through
``KPT_CSRC_DIR``) and a Triton kernel (through a copy of ``kpt/ops`` that the provenance module
is pointed at) without changing their lengths, and check that the hash and the staleness verdict
change, and that identical contents hash identically wherever they live. ``kpt/autotune`` is
only read, never modified.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from kpt.autotune import provenance
from kpt.jit import csrc_dir

OP = "flash_attention"
REPO_OPS = Path(provenance.__file__).resolve().parent.parent / "ops"


@pytest.fixture(autouse=True)
def _fresh_hashes():
    """``source_hash`` is memoised per process: start and end every test without it."""
    provenance.clear_caches()
    yield
    provenance.clear_caches()


def _same_length_edit(data: bytes, at: int) -> bytes:
    """``data`` with the digit or letter at ``at`` replaced by another of the same class."""
    old = chr(data[at])
    assert old.isalnum(), f"byte {at} is {old!r}"
    new = ("1" if old != "1" else "2") if old.isdigit() else ("x" if old != "x" else "y")
    edited = data[:at] + new.encode() + data[at + 1:]
    assert len(edited) == len(data) and edited != data
    return edited


def _alnum_after(data: bytes, anchor: bytes) -> int:
    """The offset of the first digit or letter at or after the first ``anchor`` in ``data``."""
    start = data.index(anchor)
    return next(i for i in range(start, len(data)) if chr(data[i]).isalnum())


def _row(op: str, backend: str) -> dict:
    """The provenance part of a row measured now, plus what ``stale_reason`` reads."""
    return {"op": op, "backend": backend, **provenance.provenance(op, backend)}


@pytest.fixture
def csrc_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the JIT source tree, made the one the provenance hash reads."""
    copy = tmp_path / "csrc"
    shutil.copytree(csrc_dir(), copy)
    monkeypatch.setenv("KPT_CSRC_DIR", str(copy))
    return copy


@pytest.mark.parametrize("backend", ["cuda", "hip"])
def test_native_source_hash_follows_kernel_contents(csrc_copy, backend):
    """A same-length edit of a CUDA kernel file (the d64 forward's key tile 64 -> 14) makes the
    hash change, and with it the verdict on every row measured on the old file; writing the
    original bytes back restores the old hash."""
    names = [name for name, _ in provenance.kernel_sources(OP, backend)]
    kernel = "flash_attention/fwd_d64.cu"
    assert kernel in names, names  # the edited file is one the hash covers
    row = _row(OP, backend)
    before = row["source_hash"]
    assert provenance.stale_reason(row) is None

    path = csrc_copy / kernel
    original = path.read_bytes()
    path.write_bytes(_same_length_edit(original, _alnum_after(original, b"64, 8, 3>")))
    provenance.clear_caches()
    after = provenance.source_hash(OP, backend)
    assert after != before
    reason = provenance.stale_reason(row)
    assert reason is not None and "source_hash" in reason, reason

    path.write_bytes(original)
    provenance.clear_caches()
    assert provenance.source_hash(OP, backend) == before
    assert provenance.stale_reason(row) is None


def test_native_source_hash_covers_a_shared_header(csrc_copy):
    """The shared header the kernels include (csrc/include/kpt/<op>.h) counts like a kernel."""
    header = csrc_copy / "include" / "kpt" / f"{OP}.h"
    assert f"include/kpt/{OP}.h" in dict(provenance.kernel_sources(OP, "cuda"))
    before = provenance.source_hash(OP, "cuda")
    data = header.read_bytes()
    header.write_bytes(_same_length_edit(data, _alnum_after(data, b"#define")))
    provenance.clear_caches()
    assert provenance.source_hash(OP, "cuda") != before


def test_identical_sources_hash_identically_wherever_they_live(csrc_copy):
    """The copy (another directory, new mtimes) hashes like the tree it was copied from: the
    hash names files relative to the tree and reads their bytes, nothing else."""
    copied = provenance.source_hash(OP, "cuda")
    original = provenance.hash_parts(provenance.kernel_sources(OP, "cuda", csrc=csrc_dir()))
    assert copied == original


@pytest.fixture
def ops_copy(tmp_path, monkeypatch) -> Path:
    """A copy of ``kpt/ops`` that ``kernel_sources`` reads by default: it finds the ops next to
    its own module (``<package>/autotune/provenance.py`` -> ``<package>/ops``), so its module
    path is pointed into the copy."""
    package = tmp_path / "kpt"
    shutil.copytree(REPO_OPS, package / "ops",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "__file__", str(package / "autotune" / "provenance.py"))
    return package / "ops"


def _kernel_literal(path: Path) -> tuple[str, int]:
    """The name of the first ``@triton.jit`` function of ``path`` that has a number literal in
    its body, and the byte offset of that literal's last character."""
    text = path.read_text(encoding="utf-8")
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line.encode()))
    for fn in ast.parse(text).body:
        if not (isinstance(fn, ast.FunctionDef) and any(
                "jit" in ast.unparse(d) for d in fn.decorator_list)):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Constant) and type(node.value) in (int, float)
                    and node.end_lineno == node.lineno):
                line = text.splitlines(keepends=True)[node.lineno - 1]
                end = len(line[:node.end_col_offset].encode())
                return fn.name, line_starts[node.lineno - 1] + end - 1
    raise AssertionError(f"no @triton.jit function with a number literal in {path}")


def test_triton_source_hash_follows_kernel_contents(ops_copy):
    """A same-length edit inside a ``@triton.jit`` kernel (one digit of a literal) changes the
    Triton hash; the unedited copy hashes like the installed package."""
    installed = provenance.hash_parts(provenance.kernel_sources(OP, "triton", ops_dir=REPO_OPS))
    row = _row(OP, "triton")
    assert row["source_hash"] == installed  # the copy is read, and identical bytes agree
    assert provenance.stale_reason(row) is None

    module = ops_copy / OP / "_triton.py"
    kernel, at = _kernel_literal(module)
    assert f"_triton.py:{kernel}" in dict(provenance.kernel_sources(OP, "triton"))
    original = module.read_bytes()
    module.write_bytes(_same_length_edit(original, at))
    provenance.clear_caches()
    assert provenance.source_hash(OP, "triton") != installed
    reason = provenance.stale_reason(row)
    assert reason is not None and "source_hash" in reason, reason

    module.write_bytes(original)
    provenance.clear_caches()
    assert provenance.source_hash(OP, "triton") == installed


def test_reference_source_hash_follows_the_module(ops_copy):
    """The reference backend's kernel is its module: a same-length edit changes its hash."""
    before = provenance.source_hash(OP, "reference")
    module = ops_copy / OP / "reference.py"
    data = module.read_bytes()
    module.write_bytes(_same_length_edit(data, _alnum_after(data, b"\ndef ")))
    provenance.clear_caches()
    assert provenance.source_hash(OP, "reference") != before
