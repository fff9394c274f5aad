"""Test set-up shared by every test directory.

Without a GPU, Triton kernels run under its interpreter; the variable must be set before any
kernel is decorated, i.e. before kpt imports a ``_triton`` module, so it is set here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_kpt_state(tmp_path_factory, monkeypatch):
    """Each test sees an empty autotune database of its own and fresh dispatch caches."""
    from kpt.autotune import invalidate

    root = tmp_path_factory.mktemp("kpt-state")
    monkeypatch.setenv("KPT_AUTOTUNE_DB", str(root / "autotune.db"))
    for name in ("KPT_BACKEND", "KPT_STRICT"):
        monkeypatch.delenv(name, raising=False)
    invalidate()
    yield
    invalidate()


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
