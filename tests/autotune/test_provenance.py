"""Provenance: the source hash covers what decides a kernel's speed (kernel sources, build
flags), not the Python launchers; which versions make a row stale, per backend."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from autotune_helpers import make_row

import kpt
from kpt.autotune import provenance

CUDA_MODULE = '''
from kpt.jit import JitSpec

SPEC = JitSpec(name="toy", sources=("toy/kernels.cu", "toy/binding.cpp"))


def run(call, config):
    """The launcher: checks, then calls the binding."""
    return SPEC.load().toy(call, config["block"])
'''

TRITON_MODULE = '''
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast

SCALE = 2.0
CONFIGS = [{"BLOCK": 16}]


@triton.jit
def _kernel(x_ptr, n, BLOCK: tl.constexpr):
    # one program per block
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, _cast(x * SCALE, tl.float32), mask=offs < n)


def run(call, config):
    _kernel[(1,)](call.x, call.x.numel(), BLOCK=config["BLOCK"])
'''

COMPAT_MODULE = '''
import triton

if INTERPRET:

    @triton.jit
    def cast(x, DTYPE):
        return x.to(DTYPE)

else:

    @triton.jit
    def cast(x, DTYPE):
        return x.to(DTYPE)
'''


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A kpt/ops and csrc pair: op ``toy`` (csrc/toy, csrc/toy_sm90 and its header) beside an
    op ``other`` with its own folder and header."""
    ops, csrc = tmp_path / "ops", tmp_path / "csrc"
    files = {
        ops / "toy" / "__init__.py": "",
        ops / "toy" / "_cuda.py": CUDA_MODULE,
        ops / "toy" / "_triton.py": TRITON_MODULE,
        ops / "toy" / "reference.py": "def run(call, config):\n    return call.x * 2\n",
        ops / "toy" / "NOTES.md": "notes\n",
        ops / "_triton_compat.py": COMPAT_MODULE,
        csrc / "toy" / "kernels.cu": '#include "kpt/toy.h"\n__global__ void toy() {}\n',
        csrc / "toy" / "binding.cpp": "// binding\n",
        csrc / "toy" / "NOTES.md": "notes\n",
        csrc / "toy_sm90" / "kernels.cu": '#include <kpt/compat.h>\n__global__ void toy90() {}\n',
        csrc / "other" / "kernels.cu": "__global__ void other() {}\n",
        csrc / "include" / "kpt" / "compat.h": "#pragma once\n",
        csrc / "include" / "kpt" / "toy.h": '#pragma once\n#include "ptx.h"\n',
        csrc / "include" / "kpt" / "ptx.h": "#pragma once\n",  # shared, reached through toy.h
        csrc / "include" / "kpt" / "unused.h": "#pragma once\n",  # shared, included by none
        csrc / "include" / "kpt" / "other.h": "#pragma once\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return ops, csrc


def _hash(tree, backend: str, op: str = "toy") -> str:
    ops, csrc = tree
    return provenance.hash_parts(provenance.kernel_sources(op, backend, ops_dir=ops, csrc=csrc))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("backend", ["cuda", "hip"])
def test_native_hash_covers_kernels_headers_and_flags_not_the_launcher(tree, backend,
                                                                        monkeypatch):
    ops, csrc = tree
    names = [name for name, _ in provenance.kernel_sources("toy", backend, ops_dir=ops,
                                                           csrc=csrc)]
    assert names == ["_cuda.py:JitSpec", "flags", "toy/kernels.cu", "toy_sm90/kernels.cu",
                     "include/kpt/compat.h", "include/kpt/ptx.h", "include/kpt/toy.h"]
    before = _hash(tree, backend)

    # The launcher (Python and its C++ binding), notes, and another op's kernels and header:
    # no change.
    (csrc / "toy" / "binding.cpp").write_text("// another binding\n")
    _edit(ops / "toy" / "_cuda.py", "config[\"block\"]", "int(config[\"block\"])")
    _edit(ops / "toy" / "_cuda.py", "checks, then", "checks first, then")
    (csrc / "toy" / "NOTES.md").write_text("other notes\n")
    (csrc / "other" / "kernels.cu").write_text("__global__ void other2() {}\n")
    (csrc / "include" / "kpt" / "other.h").write_text("#define OTHER 1\n")
    (csrc / "include" / "kpt" / "other_v2.h").write_text("#define OTHER 2\n")
    # A shared header none of the op's kernels includes, edited or new: no change.
    (csrc / "include" / "kpt" / "unused.h").write_text("#define UNUSED 1\n")
    (csrc / "include" / "kpt" / "unused_v2.h").write_text("#define UNUSED 2\n")
    assert _hash(tree, backend) == before

    # Each kernel input: a change.
    changes = [
        lambda: _edit(csrc / "toy" / "kernels.cu", "toy()", "toy(int)"),
        lambda: _edit(csrc / "toy_sm90" / "kernels.cu", "toy90()", "toy90(int)"),
        lambda: _edit(csrc / "include" / "kpt" / "toy.h", "once", "once\n#define X 1"),
        lambda: _edit(csrc / "include" / "kpt" / "compat.h", "once", "once\n#define Y 1"),
        lambda: _edit(csrc / "include" / "kpt" / "ptx.h", "once", "once\n#define Z 1"),
        lambda: _edit(ops / "toy" / "_cuda.py", 'binding.cpp")', 'binding.cpp"), '
                      'extra_cuda_cflags=("--use_fast_math",)'),
        lambda: monkeypatch.setattr("kpt.jit.base_flags", lambda runtime: ("-O2",)),
    ]
    seen = {before}
    for change in changes:
        change()
        seen.add(_hash(tree, backend))
    assert len(seen) == len(changes) + 1


def test_triton_hash_covers_the_jit_functions_and_what_they_read(tree):
    ops, _ = tree
    module = ops / "toy" / "_triton.py"
    before = _hash(tree, "triton")
    # The launcher, a config list (configs are part of every row's key), comments, layout.
    _edit(module, "_kernel[(1,)]", "grid = (1,)\n    _kernel[grid]")
    _edit(module, '[{"BLOCK": 16}]', '[{"BLOCK": 16}, {"BLOCK": 32}]')
    _edit(module, "# one program per block", "# each program takes one block")
    _edit(module, "mask=offs < n)\n    tl.store", "mask=offs < n)\n\n    tl.store")
    assert _hash(tree, "triton") == before

    seen = {before}
    for path, old, new in [(module, "x * SCALE", "x * SCALE + 1"),  # the kernel
                           (module, "SCALE = 2.0", "SCALE = 3.0"),  # a global it reads
                           (ops / "_triton_compat.py", "return x.to(DTYPE)\n\nelse",
                            "return x.to(DTYPE) + 0\n\nelse")]:  # a shared helper
        _edit(path, old, new)
        seen.add(_hash(tree, "triton"))
    assert len(seen) == 4


def test_reference_hash_is_the_whole_module_and_only_the_references(tree):
    ops, _ = tree
    before = {b: _hash(tree, b) for b in ("reference", "cuda", "triton")}
    _edit(ops / "toy" / "reference.py", "call.x * 2", "2 * call.x")
    after = {b: _hash(tree, b) for b in ("reference", "cuda", "triton")}
    assert [b for b in before if before[b] != after[b]] == ["reference"]


def test_an_op_without_its_own_folder_belongs_to_the_longest_prefix(tree):
    ops, _ = tree
    (ops / "toy_extra").mkdir()
    (ops / "toy_extra" / "reference.py").write_text("def run(call, config):\n    pass\n")
    for backend in ("cuda", "triton", "reference"):
        assert _hash(tree, backend, op="toy_backward") == _hash(tree, backend)
    assert _hash(tree, "reference", op="toy_extra_backward") == _hash(tree, "reference",
                                                                       op="toy_extra")
    assert _hash(tree, "reference", op="toy_extra") != _hash(tree, "reference")
    assert provenance.kernel_sources("nothing_like_it", "reference", ops_dir=ops) == []


def test_the_installed_ops_hash_their_own_kernels():
    names = dict(provenance.kernel_sources("flash_attention_backward", "cuda"))
    assert "flash_attention/bwd_d128.cu" in names and "flash_attention_sm90/kernels_bwd.cu" in names
    assert not any(n.startswith("rmsnorm_qkv_rope") for n in names)
    rms = dict(provenance.kernel_sources("rmsnorm_qkv_rope", "cuda"))
    assert "rmsnorm_qkv_rope/kernels.cu" in rms and "include/kpt/rmsnorm_qkv_rope.h" in rms
    assert not any("flash_attention" in n for n in rms)


@pytest.mark.parametrize(("backend", "field", "stale"), [
    ("cuda", "torch_version", False),  # kernels include no torch header
    ("cuda", "source_hash", True),
    ("hip", "triton_version", False),
    ("triton", "triton_version", True),  # Triton compiles it
    ("triton", "torch_version", False),
    ("reference", "torch_version", True),  # torch is the kernel
    ("reference", "triton_version", False),
])
def test_which_versions_make_a_row_stale(backend, field, stale):
    row = make_row(backend, op="rmsnorm_qkv_rope", **{field: "0.0.0-other"})
    assert (provenance.stale_reason(row) is not None) is stale
    assert provenance.stale_reason(make_row(backend, op="rmsnorm_qkv_rope",
                                            kpt_version="0.0.0-other")) is None


def test_provenance_records_every_version(monkeypatch):
    monkeypatch.setattr(kpt, "__version__", "9.9")
    provenance.clear_caches()
    recorded = provenance.provenance("rmsnorm_qkv_rope", "cuda")
    assert recorded["kpt_version"] == "9.9" and recorded["torch_version"] == torch.__version__
    assert recorded["source_hash"] == provenance.source_hash("rmsnorm_qkv_rope", "cuda")
    provenance.clear_caches()
