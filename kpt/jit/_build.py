"""Running one build: snapshot the sources, call torch's cpp_extension, capture the log.

The caller holds the build's lock and owns ``build_dir``. Everything that actually runs a
compiler goes through :func:`compile_extension`, the one seam tests replace to count, slow down
or kill builds.
"""

from __future__ import annotations

import logging
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._errors import build_error

log = logging.getLogger("kpt")

LOG_NAME = "build.log"
# cpp_extension prefixes ninja's output with this (the name may carry a "_v1" suffix).
_TORCH_PREFIX = re.compile(r"^Error building extension '[^']*':\s*")


def snapshot(inputs: Mapping[str, bytes], src_dir: Path) -> None:
    """Write the exact bytes that were hashed into ``src_dir``.

    Building from this copy rather than from csrc/ means the library always matches its hash,
    even if someone edits a source mid-build; it keeps the installed package read-only (on ROCm
    cpp_extension writes hipified files next to the sources); and it leaves what was compiled
    next to the binary for debugging.
    """
    for rel, data in inputs.items():
        path = src_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def compile_extension(
    name: str,
    sources: Sequence[Path],
    *,
    include_dirs: Sequence[Path],
    cflags: Sequence[str],
    cuda_cflags: Sequence[str],
    ldflags: Sequence[str],
    with_cuda: bool,
    build_dir: Path,
) -> types.ModuleType:
    """Build and import the extension with ``torch.utils.cpp_extension.load`` (ninja).

    ``verbose=False`` makes cpp_extension capture ninja's output and put it in the exception
    it raises on failure, which is where :func:`build` takes the log from.
    """
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=list(cflags),
        extra_cuda_cflags=list(cuda_cflags),
        extra_ldflags=list(ldflags),
        extra_include_paths=[str(d) for d in include_dirs],
        build_directory=str(build_dir),
        verbose=False,
        with_cuda=with_cuda,
    )


def build(
    name: str,
    inputs: Mapping[str, bytes],
    sources: Sequence[str],
    *,
    cflags: Sequence[str],
    cuda_cflags: Sequence[str],
    ldflags: Sequence[str],
    with_cuda: bool,
    build_dir: Path,
    csrc: Path,
) -> types.ModuleType:
    """Build ``sources`` (relative to the csrc tree held in ``inputs``) in ``build_dir``.

    On failure, writes the full compiler output to ``build_dir/build.log`` and raises a
    BuildError with the first error lines, naming files by their path under ``csrc`` (where
    the user edits them) rather than by their snapshot copy.
    """
    src_dir = build_dir / "src"
    snapshot(inputs, src_dir)
    try:
        return compile_extension(
            name,
            [src_dir / s for s in sources],
            include_dirs=[src_dir / "include"],
            cflags=cflags,
            cuda_cflags=cuda_cflags,
            ldflags=ldflags,
            with_cuda=with_cuda,
            build_dir=build_dir,
        )
    except Exception as err:
        text = _TORCH_PREFIX.sub("", str(err))
        log_path = build_dir / LOG_NAME
        log_path.write_text(f"{type(err).__name__}: {text}\n")
        raise build_error(
            f"kpt: building the JIT extension {name!r} failed:",
            text.replace(f"{src_dir}{os.sep}", f"{csrc}{os.sep}"),
            log_path,
            ("check nvcc/hipcc and CUDA_HOME/ROCM_HOME; " if with_cuda else "")
            + f"fix the source or delete {build_dir} to rebuild; "
            "set KPT_DISABLE_JIT=1 to skip JIT builds",
        ) from err
