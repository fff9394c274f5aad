"""Build hook that puts ``csrc/`` into the wheel as ``kpt/_csrc``.

A non-editable install has no source checkout to JIT-build from, so the kernel sources must
travel inside the package, where :func:`kpt.jit.csrc_dir` finds them. ``pyproject.toml`` names
this class as setuptools' ``build_py``, and limits package discovery to ``kpt`` (csrc/ has no
Python, but flat-layout discovery would count it as a second top-level package)::

    [tool.setuptools]
    cmdclass = { build_py = "kpt.jit._setuptools.BuildPyWithCsrc" }

    [tool.setuptools.packages.find]
    include = ["kpt", "kpt.*"]

tests/jit/test_packaging.py builds wheels to check this.

setuptools loads this file by path during the build (without importing ``kpt``), so it must
import nothing but the standard library and setuptools.
"""

from __future__ import annotations

import os
import shutil

from setuptools.command.build_py import build_py

_SKIP_DIRS = frozenset({"__pycache__", "build"})
_SKIP_SUFFIXES = (".o", ".so", ".obj", ".pyc", "~")


class BuildPyWithCsrc(build_py):
    """setuptools ``build_py`` that also copies ``<project>/csrc`` to ``<build_lib>/kpt/_csrc``.

    Skipped for editable installs: there ``csrc_dir()`` uses the checkout's ``csrc/`` directly,
    so edits to kernels take effect without reinstalling.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = os.path.abspath("csrc")  # setuptools runs commands from the project root
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"kpt: {source} is missing, so the wheel would have no kernel sources "
                "(building from an sdist? add 'graft csrc' to MANIFEST.in)"
            )
        target = os.path.join(self.build_lib, "kpt", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=_ignore)


def _ignore(_directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in _SKIP_DIRS or n.startswith(".") or n.endswith(_SKIP_SUFFIXES)}
