"""A tiny csrc tree and process workers for the JIT tests.

The toy extension is a plain Python C-API module (no torch header, no CUDA): it builds with the
CPU torch wheel through the same ``cpp_extension.load`` path as the real kernels, in about a
second instead of the ~40 s that ``torch/extension.h`` costs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kpt.jit import JitSpec

TOY_BINDING = r"""
#include <Python.h>
#include "kpt/toy.h"
#include "toy_impl.h"

#define KPT_STR2(x) #x
#define KPT_STR(x) KPT_STR2(x)
#define KPT_CAT2(a, b) a##b
#define KPT_CAT(a, b) KPT_CAT2(a, b)

static PyObject* add(PyObject*, PyObject* args) {
  long a, b;
  if (!PyArg_ParseTuple(args, "ll", &a, &b)) return nullptr;
  return PyLong_FromLong(toy_add(a, b) + TOY_OFFSET);
}

static PyMethodDef kMethods[] = {
    {"add", add, METH_VARARGS, "a + b + TOY_OFFSET"}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, KPT_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                              kMethods};

PyMODINIT_FUNC KPT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
"""

TOY_SPEC = JitSpec("kpt_toy", ("toy/binding.cpp",))


def write_toy_csrc(root: Path, offset: int = 0) -> Path:
    """A csrc tree: ``include/kpt/toy.h`` (shared header), ``toy/`` (the op's folder)."""
    (root / "include" / "kpt").mkdir(parents=True, exist_ok=True)
    (root / "toy").mkdir(parents=True, exist_ok=True)
    (root / "include" / "kpt" / "toy.h").write_text(f"#define TOY_OFFSET {offset}\n")
    impl = "inline long toy_add(long a, long b) { return a + b; }\n"
    (root / "toy" / "toy_impl.h").write_text(impl)
    (root / "toy" / "binding.cpp").write_text(TOY_BINDING)
    return root


def instrument(counter: Path, pause_s: float = 0.0, hang_flag: Path | None = None) -> None:
    """Wrap the compiler seam of this process: count runs in ``counter`` (one line per run),
    hold the build ``pause_s`` seconds, and with ``hang_flag`` leave the build dir as a crash
    mid-build would (cpp_extension's lock file, a truncated library), touch the flag, hang."""
    from kpt.jit import _build

    real = _build.compile_extension

    def compile_extension(name, sources, **kwargs):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(pause_s)
        module = real(name, sources, **kwargs)
        if hang_flag is not None:
            library = Path(module.__file__)
            library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
            (kwargs["build_dir"] / "lock").touch()
            hang_flag.touch()
            time.sleep(600)
        return module

    _build.compile_extension = compile_extension


def load_toy_worker(
    csrc: str,
    cache: str,
    counter: str,
    barrier=None,
    results=None,
    pause_s: float = 0.0,
    hang_flag: str | None = None,
) -> None:
    """Process entry point: load the toy spec and report ``("ok", add(2, 3))`` or the error."""
    os.environ["KPT_CSRC_DIR"] = csrc
    os.environ["KPT_CACHE_DIR"] = cache
    os.environ.pop("KPT_DISABLE_JIT", None)
    instrument(Path(counter), pause_s, Path(hang_flag) if hang_flag else None)
    kpt_log = logging.getLogger("kpt")
    kpt_log.setLevel(logging.INFO)
    kpt_log.addHandler(logging.FileHandler(f"{counter}.log"))
    import torch  # noqa: F401  - import before the barrier, so that loads really start together

    if barrier is not None:
        barrier.wait()
    try:
        outcome = ("ok", TOY_SPEC.load().add(2, 3))
    except Exception as err:  # reported to the parent, which fails the test
        outcome = ("error", f"{type(err).__name__}: {err}")
    if results is not None:
        results.put(outcome)


def compiler_runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0
