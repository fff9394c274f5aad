"""The build hash: it must change with anything that changes the binary, and nothing else."""

from __future__ import annotations

import dataclasses
import os

import pytest

import kpt
from kpt.jit import BuildError, JitSpec, _env, cache_dir, csrc_dir
from kpt.jit import spec as jit_spec

from .helpers import TOY_SPEC


def test_stable_for_unchanged_inputs(toy_env):
    first = TOY_SPEC.build_hash()
    assert TOY_SPEC.build_hash() == first
    assert JitSpec("kpt_toy", ["toy/binding.cpp"]).build_hash() == first  # lists become tuples
    assert TOY_SPEC.build_dir() == cache_dir() / "jit" / f"kpt_toy-{first}"


@pytest.mark.parametrize(
    "path",
    ["toy/binding.cpp", "toy/toy_impl.h", "include/kpt/toy.h"],
    ids=["source", "op-folder header", "shared header"],
)
def test_changes_with_any_file_the_build_can_include(toy_env, path):
    before = TOY_SPEC.build_hash()
    file = toy_env["csrc"] / path
    file.write_text(file.read_text() + "\n// edited\n")
    assert TOY_SPEC.build_hash() != before


def _same_length_edit(data: bytes) -> bytes:
    """``data`` with one letter replaced by another: other content, the same length."""
    at = next(i for i, byte in enumerate(data) if chr(byte).isalpha())
    edited = data[:at] + (b"x" if data[at:at + 1] != b"x" else b"y") + data[at + 1:]
    assert len(edited) == len(data) and edited != data
    return edited


@pytest.mark.parametrize(
    "path",
    ["toy/binding.cpp", "toy/toy_impl.h", "include/kpt/toy.h"],
    ids=["source", "op-folder header", "shared header"],
)
def test_hash_is_of_contents_not_lengths_or_times(toy_env, path):
    """An edit that keeps a file's length (a renamed identifier, another digit) must rebuild,
    and rewriting the same bytes later (a new mtime, a fresh checkout) must not: the hash is
    of the contents, never of sizes or timestamps."""
    file = toy_env["csrc"] / path
    original = file.read_bytes()
    before = TOY_SPEC.build_hash()

    file.write_bytes(original)
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns + 10**10, stat.st_mtime_ns + 10**10))
    assert TOY_SPEC.build_hash() == before

    file.write_bytes(_same_length_edit(original))
    edited = TOY_SPEC.build_hash()
    assert edited != before
    assert TOY_SPEC.build_dir() != TOY_SPEC._dir_for(before)  # a build of its own

    file.write_bytes(original)
    assert TOY_SPEC.build_hash() == before


def test_same_length_value_change_reaches_the_hash(toy_env):
    """The toy's offset 0 -> 1: one digit, the compiled result differs, so must the hash."""
    header = toy_env["csrc"] / "include" / "kpt" / "toy.h"
    before = TOY_SPEC.build_hash()
    text = header.read_text()
    assert text == "#define TOY_OFFSET 0\n"
    header.write_text(text.replace("0", "1"))
    assert TOY_SPEC.build_hash() != before


def test_included_headers_change_it_unrelated_files_do_not(toy_env):
    """Shared headers count once the op's files include them, directly or through another
    shared header; another op's files, non-sources and headers nobody includes do not."""
    include = toy_env["csrc"] / "include" / "kpt"
    before = TOY_SPEC.build_hash()
    (toy_env["csrc"] / "other_op").mkdir()
    (toy_env["csrc"] / "other_op" / "kernels.cu").write_text("// another op\n")
    (toy_env["csrc"] / "toy" / "notes.txt").write_text("not a source\n")
    (include / "new.cuh").write_text("// new shared header, included by no one yet\n")
    assert TOY_SPEC.build_hash() == before
    (include / "toy.h").write_text((include / "toy.h").read_text() + '#include "new.cuh"\n')
    through = TOY_SPEC.build_hash()
    assert through != before
    (include / "new.cuh").write_text("// new shared header, edited\n")
    assert TOY_SPEC.build_hash() != through


@pytest.mark.parametrize("field", ["extra_cflags", "extra_cuda_cflags", "extra_ldflags"])
def test_changes_with_flags(toy_env, field):
    changed = dataclasses.replace(TOY_SPEC, **{field: ("-DKPT_TEST=1",)})
    assert changed.build_hash() != TOY_SPEC.build_hash()


def test_changes_with_kpt_and_compiler_versions(toy_env, monkeypatch):
    before = TOY_SPEC.build_hash()
    monkeypatch.setattr(kpt, "__version__", kpt.__version__ + ".post1")
    after_kpt = TOY_SPEC.build_hash()
    assert after_kpt != before
    monkeypatch.setattr(jit_spec, "tool_version", lambda path: "c++ (kpt test) 99.0")
    assert TOY_SPEC.build_hash() != after_kpt


def test_relocatable(tmp_path, toy_env, monkeypatch):
    """The same sources in another csrc dir, or another cache dir, give the same hash."""
    before = TOY_SPEC.build_hash()
    moved = tmp_path / "elsewhere"
    toy_env["csrc"].rename(moved)
    monkeypatch.setenv("KPT_CSRC_DIR", str(moved))
    monkeypatch.setenv("KPT_CACHE_DIR", str(tmp_path / "other-cache"))
    assert TOY_SPEC.build_hash() == before


def test_missing_source_is_a_build_error(toy_env):
    spec = JitSpec("kpt_toy", ("toy/missing.cpp",))
    with pytest.raises(BuildError, match="missing.cpp"):
        spec.build_hash()
    assert "missing.cpp" in spec.unavailable_reason()


def test_spec_validation():
    with pytest.raises(ValueError, match="identifier"):
        JitSpec("not-a-name", ("a.cpp",))
    with pytest.raises(ValueError, match="relative"):
        JitSpec("ok", ("../escape.cpp",))
    with pytest.raises(TypeError, match="sequence"):
        JitSpec("ok", "a.cpp")
    assert JitSpec("k", ("op/kernels.cu", "op/binding.cpp")).with_cuda
    assert not JitSpec("k", ("op/binding.cpp",)).with_cuda


def test_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "kpt"
    monkeypatch.setenv("KPT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    checkout = csrc_dir()
    assert checkout.name in ("csrc", "_csrc") and (checkout / "include").is_dir()
    monkeypatch.setenv("KPT_CSRC_DIR", str(tmp_path))
    assert csrc_dir() == tmp_path


@pytest.mark.parametrize(
    ("arch_list", "expected"),
    [
        ("8.0", ["-gencode=arch=compute_80,code=sm_80"]),
        (
            "8.0;9.0a+PTX",
            [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_90a,code=compute_90a",
            ],
        ),
        ("9.0", ["-gencode=arch=compute_90,code=sm_90"]),  # as written: the user chose it
    ],
)
def test_torch_cuda_arch_list_is_honoured(monkeypatch, arch_list, expected):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert list(_env.cuda_arch_flags()) == expected


@pytest.mark.parametrize(
    ("capability", "arch"), [((9, 0), "90a"), ((8, 6), "86"), ((10, 0), "100")]
)
def test_device_arch(monkeypatch, capability, arch):
    """sm_90 gets the arch-specific sm_90a target, where wgmma lives; others build as is."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert _env.cuda_arch_flags() == (f"-gencode=arch=compute_{arch},code=sm_{arch}",)


def test_arch_errors(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_90")
    with pytest.raises(BuildError, match="'sm_90'"):
        _env.cuda_arch_flags()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BuildError, match="TORCH_CUDA_ARCH_LIST"):
        _env.cuda_arch_flags()
