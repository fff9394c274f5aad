"""A non-editable install must carry csrc/ (as kpt/_csrc) so that it can JIT-build.

Builds real wheels of a temporary copy of the repo (``pip wheel --no-build-isolation``), unpacks
one, and asks *that* copy of kpt where its csrc is. The copy also gets a probe header and a
probe op, so the check means something before csrc/ has kernels of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What pyproject.toml needs (besides [project]); kpt/jit/_setuptools.py explains the hook.
PACKAGING_SNIPPET = """
[tool.setuptools]
cmdclass = { build_py = "kpt.jit._setuptools.BuildPyWithCsrc" }

[tool.setuptools.packages.find]
include = ["kpt", "kpt.*"]
"""

MINIMAL_PYPROJECT = (
    """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "kpt"
version = "0.0.0"
"""
    + PACKAGING_SNIPPET
)

_TOP_LEVEL_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.so", "_csrc", ".*")


def _copy_repo(dest: Path, pyproject: str | None) -> Path:
    dest.mkdir()
    for name in ("kpt", "csrc"):
        shutil.copytree(REPO / name, dest / name, ignore=_JUNK)
    for name in _TOP_LEVEL_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    if pyproject is not None:
        (dest / "pyproject.toml").write_text(pyproject)
    probe_header = dest / "csrc" / "include" / "kpt" / "kpt_packaging_probe.h"
    probe_kernel = dest / "csrc" / "kpt_packaging_probe" / "kernels.cu"
    probe_kernel.parent.mkdir()
    probe_header.write_text("// packaging probe\n")
    probe_kernel.write_text("// packaging probe\n")
    return dest


def _build_wheel(project: Path, out: Path) -> Path:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(project),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        f"pip wheel failed (does pyproject.toml have PACKAGING_SNIPPET of {__name__}?):\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    (wheel,) = out.glob("kpt-*.whl")
    return wheel


def _installed_csrc_files(wheel: Path, site: Path) -> tuple[Path, set[str]]:
    """Unpack ``wheel`` into ``site`` and ask the kpt found there for its csrc_dir()."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "KPT_CSRC_DIR"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-c", "import kpt.jit; print(kpt.jit.csrc_dir())"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=site,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    root = Path(done.stdout.strip())
    return root, {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check(wheel: Path, project: Path, site: Path) -> None:
    root, installed = _installed_csrc_files(wheel, site)
    assert root == site / "kpt" / "_csrc", f"installed kpt uses {root}, not its own copy"
    expected = {
        p.relative_to(project / "csrc").as_posix()
        for p in (project / "csrc").rglob("*")
        if p.is_file()
    }
    assert expected <= installed, f"missing from the wheel: {sorted(expected - installed)}"
    assert "include/kpt/kpt_packaging_probe.h" in installed
    assert "kpt_packaging_probe/kernels.cu" in installed
    assert any(f.startswith("include/kpt/") and f.endswith(".h") for f in installed)


def _require_setuptools_backend() -> None:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed (needed with --no-build-isolation)")


def test_proposed_packaging_ships_csrc(tmp_path):
    """The snippet above, on its own, puts csrc/ in the wheel where csrc_dir() finds it."""
    _require_setuptools_backend()
    project = _copy_repo(tmp_path / "project", MINIMAL_PYPROJECT)
    _check(_build_wheel(project, tmp_path / "dist"), project, tmp_path / "site")


def test_repo_wheel_ships_csrc(tmp_path):
    """The repo's own pyproject.toml does it too (fails until it includes the snippet)."""
    if not (REPO / "pyproject.toml").is_file():
        pytest.fail("no pyproject.toml in the repo; it needs the snippet in PACKAGING_SNIPPET")
    _require_setuptools_backend()
    project = _copy_repo(tmp_path / "project", None)
    _check(_build_wheel(project, tmp_path / "dist"), project, tmp_path / "site")
