"""Load-or-build through the cache: real cpp_extension builds of the toy C++ extension.

Covers what the cache promises: concurrent processes compile once, a build killed midway is
never trusted and never makes later loads hang, KPT_DISABLE_JIT=1 never compiles.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import types
from pathlib import Path

import pytest

from kpt.jit import BuildError, _build
from kpt.jit import spec as jit_spec
from kpt.jit._cache import MARKER

from .helpers import TOY_SPEC, compiler_runs, instrument, load_toy_worker, write_toy_csrc

# Generous: a spawned process imports torch (seconds on a loaded 2-core machine) and the
# toy build takes about one second; a hang is what these limits catch.
_PROCESS_TIMEOUT_S = 180


def _forbid_compiling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the compiler must not run here")

    monkeypatch.setattr(_build, "compile_extension", fail)


def _join(process, what: str) -> None:
    process.join(_PROCESS_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        pytest.fail(f"{what} still running after {_PROCESS_TIMEOUT_S} s: a load hangs")


def test_builds_once_then_loads_from_memory_and_disk(toy_env, monkeypatch):
    instrument(toy_env["counter"])
    assert TOY_SPEC.unavailable_reason() is None
    module = TOY_SPEC.load()
    assert module.add(2, 3) == 5
    assert TOY_SPEC.load() is module
    assert (TOY_SPEC.build_dir() / MARKER).is_file()
    assert compiler_runs(toy_env["counter"]) == 1

    monkeypatch.setattr(jit_spec, "_LOADED", {})  # as in a new process: the disk cache serves
    _forbid_compiling(monkeypatch)
    assert TOY_SPEC.load().add(2, 3) == 5


def test_edit_rebuilds(toy_env):
    instrument(toy_env["counter"])
    assert TOY_SPEC.load().add(2, 3) == 5
    (toy_env["csrc"] / "include" / "kpt" / "toy.h").write_text("#define TOY_OFFSET 100\n")
    jit_spec._LOADED.clear()
    assert TOY_SPEC.load().add(2, 3) == 105
    assert compiler_runs(toy_env["counter"]) == 2


def test_two_trees_load_side_by_side_in_one_process(toy_env, tmp_path, monkeypatch):
    """Switching KPT_CSRC_DIR in a process (kernel A/B tools do) gives each tree its own
    build and module, also when both come from the disk cache: builds get their own module
    names, so an import never hands back the other tree's module."""
    other = write_toy_csrc(tmp_path / "other", offset=100)
    trees = {toy_env["csrc"]: 5, other: 105}
    for _ in range(2):  # built, then loaded from the cache by a "new process"
        for tree, expected in trees.items():
            monkeypatch.setenv("KPT_CSRC_DIR", str(tree))
            module = TOY_SPEC.load()
            assert module.add(2, 3) == expected
            assert Path(module.__file__).parent == TOY_SPEC.build_dir()
        monkeypatch.setattr(jit_spec, "_LOADED", {})
        monkeypatch.setattr(jit_spec, "_KEYS", {})


def test_cached_build_answered_by_another_module_is_refused(toy_env, monkeypatch):
    """If an import of a cached build hands back a module loaded from elsewhere (what plain
    module names allowed), load() raises instead of running the other build's code."""
    from kpt.jit import _cache

    real = TOY_SPEC.load()
    monkeypatch.setattr(jit_spec, "_LOADED", {})
    monkeypatch.setattr(jit_spec, "_FAILED", {})
    stranger = types.ModuleType(real.__name__)
    stranger.__file__ = str(toy_env["cache"].parent / "elsewhere" / Path(real.__file__).name)
    monkeypatch.setattr(_cache, "import_library", lambda name, path: stranger)
    _forbid_compiling(monkeypatch)
    with pytest.raises(BuildError, match="returned the module loaded from"):
        TOY_SPEC.load()


def test_concurrent_processes_build_once(toy_env):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    args = (str(toy_env["csrc"]), str(toy_env["cache"]), str(toy_env["counter"]), barrier, results)
    # The builder holds the lock a while, so the other two are sure to find it taken.
    processes = [
        ctx.Process(target=load_toy_worker, args=args, kwargs={"pause_s": 1.0}) for _ in range(3)
    ]
    for p in processes:
        p.start()
    for p in processes:
        _join(p, "a concurrent load")
    outcomes = [results.get(timeout=5) for _ in processes]
    assert outcomes == [("ok", 5)] * 3
    assert compiler_runs(toy_env["counter"]) == 1
    log_text = Path(f"{toy_env['counter']}.log").read_text()
    assert "waiting for another process" in log_text, "the lock was never contended"


def test_build_killed_midway_is_rebuilt_without_hanging(toy_env):
    ctx = multiprocessing.get_context("spawn")
    common = (str(toy_env["csrc"]), str(toy_env["cache"]), str(toy_env["counter"]))
    hang_flag = toy_env["cache"].parent / "hanging"
    doomed = ctx.Process(target=load_toy_worker, args=common, kwargs={"hang_flag": str(hang_flag)})
    doomed.start()
    deadline = time.monotonic() + _PROCESS_TIMEOUT_S
    while not hang_flag.exists():
        assert doomed.is_alive() and time.monotonic() < deadline, "the doomed build never ran"
        time.sleep(0.1)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)

    # It left a library (truncated), cpp_extension's lock file, and no completion marker.
    build_dir = TOY_SPEC.build_dir()
    assert (build_dir / "lock").exists() and not (build_dir / MARKER).exists()
    assert TOY_SPEC.unavailable_reason() is None

    results = ctx.Queue()
    fresh = ctx.Process(target=load_toy_worker, args=(*common, None, results))
    fresh.start()
    _join(fresh, "the load after a killed build")
    assert results.get(timeout=5) == ("ok", 5)
    assert compiler_runs(toy_env["counter"]) == 2
    assert (build_dir / MARKER).is_file()
    leftovers = sorted(p.name for p in build_dir.parent.iterdir())
    assert leftovers == [build_dir.name, build_dir.name + ".lock"]


def test_disable_jit_never_compiles(toy_env, monkeypatch):
    monkeypatch.setenv("KPT_DISABLE_JIT", "1")
    _forbid_compiling(monkeypatch)
    reason = TOY_SPEC.unavailable_reason()
    assert "KPT_DISABLE_JIT=1" in reason and "no finished build" in reason
    with pytest.raises(BuildError, match="KPT_DISABLE_JIT=1") as caught:
        TOY_SPEC.load()
    assert str(TOY_SPEC.build_dir()) in str(caught.value)
    assert not TOY_SPEC.build_dir().exists()


def test_disable_jit_still_loads_a_finished_build(toy_env, monkeypatch):
    assert TOY_SPEC.load().add(2, 3) == 5
    monkeypatch.setattr(jit_spec, "_LOADED", {})
    monkeypatch.setenv("KPT_DISABLE_JIT", "1")
    _forbid_compiling(monkeypatch)
    assert TOY_SPEC.unavailable_reason() is None
    assert TOY_SPEC.load().add(2, 3) == 5


def test_unfinished_build_is_not_trusted(toy_env, monkeypatch):
    """A build dir without a marker (or with a marker of another hash) is rebuilt."""
    instrument(toy_env["counter"])
    build_dir = TOY_SPEC.build_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "kpt_toy.so").write_bytes(b"\x7fELF truncated")
    (build_dir / MARKER).write_text(
        '{"hash": "0000", "module": "kpt_toy", "library": "kpt_toy.so"}'
    )
    assert TOY_SPEC.load().add(2, 3) == 5
    assert compiler_runs(toy_env["counter"]) == 1


def _load_in_a_new_process(toy_env) -> tuple:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    args = (str(toy_env["csrc"]), str(toy_env["cache"]), str(toy_env["counter"]), None, results)
    process = ctx.Process(target=load_toy_worker, args=args)
    process.start()
    _join(process, "a load")  # fails the test on a signal (SIGBUS) or a hang
    return results.get(timeout=5)


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes"])
def test_damaged_library_behind_a_marker_is_rebuilt(toy_env, damage):
    """A finished build whose library was damaged afterwards (a full disk, an interrupted copy
    of the cache): the marker's size and digest no longer match, so the next process rebuilds
    it. Mapping the truncated library killed the loading process with SIGBUS."""
    assert _load_in_a_new_process(toy_env) == ("ok", 5)
    library = TOY_SPEC.build_dir() / json.loads((TOY_SPEC.build_dir() / MARKER).read_text())[
        "library"]
    data = library.read_bytes()
    library.write_bytes(data[:1000] if damage == "truncated" else
                        data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))
    assert _load_in_a_new_process(toy_env) == ("ok", 5)
    assert compiler_runs(toy_env["counter"]) == 2
    assert _load_in_a_new_process(toy_env) == ("ok", 5)  # the rebuilt one is trusted
    assert compiler_runs(toy_env["counter"]) == 2


def test_cuda_spec_on_cpu_torch(toy_env):
    import torch

    if torch.version.cuda or torch.version.hip:
        pytest.skip("needs a CPU-only torch")
    spec = jit_spec.JitSpec("kpt_toy_cuda", ("toy/kernels.cu", "toy/binding.cpp"))
    assert "CPU-only" in spec.unavailable_reason()
    with pytest.raises(BuildError, match="CPU-only"):
        spec.load()


TORCH_BINDING = """
#include <torch/extension.h>

torch::Tensor twice(const torch::Tensor& x) { return x * 2; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
"""


@pytest.mark.slow
def test_torch_binding_builds(toy_env):
    """The production path: a pybind11 binding with torch/extension.h (about 45 s on 2 cores)."""
    import torch

    (toy_env["csrc"] / "toy" / "binding.cpp").write_text(TORCH_BINDING)
    module = jit_spec.JitSpec("kpt_toy_torch", ("toy/binding.cpp",)).load()
    assert torch.equal(module.twice(torch.arange(3)), torch.tensor([0, 2, 4]))
