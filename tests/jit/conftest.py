"""Fixtures of the JIT tests: a private csrc tree and cache dir per test, fresh JIT state."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpt.jit import spec as jit_spec

from .helpers import write_toy_csrc


@pytest.fixture(autouse=True)
def _fresh_jit_state(monkeypatch):
    """Forget loaded modules and failed builds, and clear the JIT environment variables."""
    for name in ("KPT_DISABLE_JIT", "KPT_CSRC_DIR", "KPT_CACHE_DIR", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jit_spec, "_LOADED", {})
    monkeypatch.setattr(jit_spec, "_FAILED", {})


@pytest.fixture
def toy_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """A toy csrc tree as ``KPT_CSRC_DIR``, an empty ``KPT_CACHE_DIR``, a compiler-run counter."""
    csrc = write_toy_csrc(tmp_path / "csrc")
    cache = tmp_path / "cache"
    monkeypatch.setenv("KPT_CSRC_DIR", str(csrc))
    monkeypatch.setenv("KPT_CACHE_DIR", str(cache))
    return {"csrc": csrc, "cache": cache, "counter": tmp_path / "compiler_runs.txt"}
