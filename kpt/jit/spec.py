"""JitSpec: what one extension is built from, its content hash, and load-or-build.

The FlashInfer scheme: a spec names sources under ``csrc/``; its hash covers everything that can
change the binary; builds live in ``cache_dir()/"jit"/"<name>-<hash>"`` and are made under a
file lock, re-checking for a finished build after taking it, so N processes that start together
(one per GPU, say) compile once and the other N-1 wait and load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

from . import _build, _cache
from ._env import (
    cache_dir,
    compilers,
    csrc_dir,
    cuda_arch_flags,
    host_compiler,
    jit_disabled,
    rocm_arch_flags,
    tool_version,
)
from ._errors import BuildError, CompilerMissing

log = logging.getLogger("kpt")

_GPU_SUFFIXES = (".cu", ".hip")
# What an ``#include`` can reach: hashed so that editing any of them rebuilds.
_HEADER_SUFFIXES = frozenset({".h", ".hh", ".hpp", ".hxx", ".cuh", ".inc", ".inl"})
_OP_SUFFIXES = _HEADER_SUFFIXES | {".cu", ".hip", ".cpp", ".cc", ".c"}
_HASH_CHARS = 16
# Host flags: torch's headers dictate the C++ standard of host code (cpp_extension adds it).
_BASE_CFLAGS = ("-O3",)
# Device code includes no torch header, so it stays C++17 like the compile checks; no
# --use_fast_math: it trades accuracy (flushed denormals, approximate division) for speed.
_BASE_CUDA_CFLAGS = ("-O3", "-std=c++17", "-lineinfo")
_BASE_HIP_CFLAGS = ("-O3", "-std=c++17")


def base_flags(runtime: str) -> tuple[str, ...]:
    """The flags every build for ``runtime`` (``"cuda"`` or ``"hip"``) compiles with, host's
    then device's, before the target arch and a spec's own flags: with the sources, what decides
    the code a kernel runs (autotune provenance hashes them)."""
    return _BASE_CFLAGS + {"cuda": _BASE_CUDA_CFLAGS, "hip": _BASE_HIP_CFLAGS}[runtime]


_LOADED: dict[tuple, types.ModuleType] = {}
_FAILED: dict[str, BuildError] = {}  # build hash -> the error; a process never retries a hash
_GUARD = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
# (spec, the environment variables its directories come from) -> load()'s key.
_KEYS: dict[tuple, tuple] = {}


@dataclass(frozen=True)
class _Plan:
    """A spec resolved against this machine: the files, the flags and their hash."""

    hash: str
    root: Path
    inputs: dict[str, bytes]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]


def _gpu_runtime() -> str | None:
    """``"cuda"`` or ``"hip"`` for a GPU build of torch, None for a CPU-only one."""
    import torch

    if torch.version.hip is not None:
        return "hip"
    return "cuda" if torch.version.cuda is not None else None


@dataclass(frozen=True)
class JitSpec:
    """One JIT-built extension: a name and its sources relative to :func:`csrc_dir`.

    Each build's Python module is ``<name>_<build hash>`` (the binding uses
    ``TORCH_EXTENSION_NAME``), so builds of one spec from different source trees load side by
    side in one process. CUDA is compiled in only when a ``.cu`` source is present, so a pure
    C++ spec builds with a CPU torch too. Lists given for the tuple fields are converted.
    """

    name: str
    sources: tuple[str, ...]
    extra_cflags: tuple[str, ...] = ()
    extra_cuda_cflags: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"JitSpec name must be a str, got {type(self.name).__name__}")
        for field in ("sources", "extra_cflags", "extra_cuda_cflags", "extra_ldflags"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                    isinstance(item, str) for item in value):
                raise TypeError(f"JitSpec {self.name!r}: {field} must be a sequence of str, got "
                                f"{value!r}")
            object.__setattr__(self, field, tuple(value))
        if not self.name.isidentifier():
            raise ValueError(f"JitSpec name {self.name!r} must be a Python identifier")
        if not self.sources:
            raise ValueError(f"JitSpec {self.name!r} has no sources")
        for source in self.sources:
            path = Path(source)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"JitSpec {self.name!r}: {source!r} must be relative to csrc/")

    @property
    def with_cuda(self) -> bool:
        return any(s.endswith(_GPU_SUFFIXES) for s in self.sources)

    # ---- hashing ---------------------------------------------------------------------------

    def _inputs(self, root: Path) -> dict[str, bytes]:
        """Every file the build can read, by path relative to ``root``: the sources, the
        sources' op folders and the headers of ``include/`` those files include."""
        files: set[str] = set()
        for source in self.sources:
            if not (root / source).is_file():
                raise BuildError(
                    f"kpt: source {source!r} of JIT extension {self.name!r} is not in {root}\n"
                    "hint: a non-editable install needs kpt/_csrc in the wheel; "
                    "KPT_CSRC_DIR overrides the csrc location"
                )
            files.add(source)
            parts = Path(source).parts
            if len(parts) > 1:
                files.update(_tree(root, parts[0], _OP_SUFFIXES))
        files.update(included_headers(root, [root / rel for rel in files]))
        return {rel: (root / rel).read_bytes() for rel in sorted(files)}

    def _plan(self) -> _Plan:
        import torch

        import kpt

        runtime = _gpu_runtime() if self.with_cuda else None
        cflags = _BASE_CFLAGS + self.extra_cflags
        cuda_cflags: tuple[str, ...] = ()
        cxx = host_compiler()
        tools = {"c++": tool_version(cxx) if cxx else "not found"}
        if runtime == "cuda":
            cuda_cflags = _BASE_CUDA_CFLAGS + cuda_arch_flags() + self.extra_cuda_cflags
        elif runtime == "hip":
            cuda_cflags = _BASE_HIP_CFLAGS + rocm_arch_flags() + self.extra_cuda_cflags
        if runtime is not None:
            compiler = compilers()["nvcc" if runtime == "cuda" else "hipcc"]
            tools[runtime] = tool_version(compiler) if compiler else "not found"
        root = csrc_dir()
        inputs = self._inputs(root)
        meta = {
            "name": self.name,
            "sources": self.sources,
            "cflags": cflags,
            "cuda_cflags": cuda_cflags,
            "extra_cuda_cflags": self.extra_cuda_cflags,  # also when unused: no surprises
            "ldflags": self.extra_ldflags,
            "tools": tools,
            "torch": [torch.__version__, torch.version.git_version],
            "torch_cuda": torch.version.cuda,
            "torch_hip": torch.version.hip,
            "python": [sys.implementation.cache_tag, sys.platform],
            "kpt": kpt.__version__,
        }
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for rel, data in inputs.items():
            digest.update(f"\0{rel}\0{len(data)}\0".encode())
            digest.update(data)
        return _Plan(digest.hexdigest()[:_HASH_CHARS], root, inputs, cflags, cuda_cflags)

    def build_hash(self) -> str:
        """Hash of sources, every header they can include, flags, target arch, compiler,
        torch (+CUDA/HIP), Python and kpt versions. Raises BuildError if a source is missing."""
        return self._plan().hash

    def build_dir(self) -> Path:
        return self._dir_for(self.build_hash())

    def _dir_for(self, build_hash: str) -> Path:
        return cache_dir() / "jit" / f"{self.name}-{build_hash}"

    # ---- availability ----------------------------------------------------------------------

    def _cannot_build(self) -> tuple[str, type[BuildError]] | None:
        """Why no compiler can run here, with the error class to raise, or None."""
        if jit_disabled():
            return "KPT_DISABLE_JIT=1 forbids compiling", BuildError
        if host_compiler() is None:
            return "no C++ compiler (c++ or $CXX) found", CompilerMissing
        runtime = _gpu_runtime() if self.with_cuda else None
        if runtime is not None:
            tool = "nvcc" if runtime == "cuda" else "hipcc"
            if compilers()[tool] is None:
                home = "CUDA_HOME" if tool == "nvcc" else "ROCM_HOME"
                return f"{tool} not found (set {home} or add it to PATH)", CompilerMissing
        if shutil.which("ninja") is None:
            return "ninja not found (pip install ninja)", CompilerMissing
        return None

    def unavailable_reason(self) -> str | None:
        """Why :meth:`load` cannot succeed here, found without compiling anything; else None.

        None means a finished build is cached or a build can be attempted (it may still fail).
        """
        if self._key() in _LOADED:
            return None
        if self.with_cuda and _gpu_runtime() is None:
            import torch

            return (
                f"torch {torch.__version__} is a CPU-only build "
                "(torch.version.cuda and torch.version.hip are None)"
            )
        try:
            plan = self._plan()
            failed = _FAILED.get(plan.hash)
            if failed is not None:
                return _one_line(f"building {self.name!r} failed in this process", failed)
            if _cache.read_marker(self._dir_for(plan.hash), plan.hash) is not None:
                return None
        except BuildError as err:
            return _one_line(f"cannot build {self.name!r}", err)
        cannot = self._cannot_build()
        if cannot is None:
            return None
        return f"{cannot[0]}, and no finished build of {self.name!r} is cached"

    # ---- loading ---------------------------------------------------------------------------

    def load(self) -> types.ModuleType:
        """The built extension module: from this process's memory, else from the cache, else
        built now (under the lock). Raises BuildError (CompilerMissing when a tool is absent)."""
        key = self._key()
        module = _LOADED.get(key)
        if module is not None:
            return module
        with _GUARD:
            key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
        with key_lock:
            module = _LOADED.get(key)
            if module is None:
                module = self._load_or_build()
                _LOADED[key] = module
        return module

    def _key(self) -> tuple:
        # The directories are part of the key so that tests (and tools) may switch them. They
        # are resolved once per value of the variables they come from: resolving them costs
        # file-system calls (~30 us), and load() runs on every kernel call.
        env = (os.environ.get("KPT_CSRC_DIR"), os.environ.get("KPT_CACHE_DIR"),
               os.environ.get("HOME"))
        key = _KEYS.get((self, env))
        if key is None:
            key = _KEYS.setdefault((self, env), (self, str(csrc_dir()), str(cache_dir())))
        return key

    def _load_or_build(self) -> types.ModuleType:
        try:
            return self._load_or_build_here()
        except OSError as err:  # the cache folder itself: not a folder, read-only, full
            if not str(getattr(err, "filename", "") or "").startswith(str(cache_dir())):
                raise
            raise BuildError(
                f"kpt: the JIT cache {cache_dir() / 'jit'} cannot be used for {self.name!r}: "
                f"{type(err).__name__}: {err}\nhint: point KPT_CACHE_DIR at a writable folder"
            ) from err

    def _load_or_build_here(self) -> types.ModuleType:
        if self.with_cuda and _gpu_runtime() is None:
            raise BuildError(
                f"kpt: cannot build the JIT extension {self.name!r}: it has CUDA/HIP sources and "
                "this torch is a CPU-only build\nhint: install a CUDA or ROCm build of torch"
            )
        plan = self._plan()
        failed = _FAILED.get(plan.hash)
        if failed is not None:
            raise BuildError(str(failed), first_error=failed.first_error, log_path=failed.log_path)
        build_dir = self._dir_for(plan.hash)
        module = _cache.load_finished(build_dir, plan.hash)
        if module is not None:
            return module
        cannot = self._cannot_build()
        if cannot is not None:
            reason, cls = cannot
            hint = (
                "unset KPT_DISABLE_JIT to build here, or build where a compiler is and share "
                "KPT_CACHE_DIR"
                if jit_disabled()
                else "install the missing tool, or set KPT_DISABLE_JIT=1 to skip JIT builds"
            )
            raise cls(
                f"kpt: cannot build the JIT extension {self.name!r}: {reason}, and no finished "
                f"build is cached in {build_dir}\nhint: {hint}"
            )
        lock = build_dir.with_name(build_dir.name + ".lock")
        with _cache.file_lock(lock, f"to build {self.name!r}"):
            # Another process may have finished this build while we waited for the lock.
            module = _cache.load_finished(build_dir, plan.hash)
            if module is not None:
                return module
            try:
                return self._build_locked(plan, build_dir)
            except BuildError as err:
                _FAILED[plan.hash] = err
                raise

    def _build_locked(self, plan: _Plan, build_dir: Path) -> types.ModuleType:
        """Build from scratch; the caller holds the lock, so ``build_dir`` is ours alone."""
        if build_dir.exists():
            _discard(build_dir)
        build_dir.mkdir(parents=True)
        log.info("kpt: building JIT extension %r in %s", self.name, build_dir)
        start = time.perf_counter()
        # One module name per build (its PyInit_ symbol): two builds of a spec from different
        # trees can then live in one process; under the plain name the second import could
        # hand back the module of the first.
        module = _build.build(
            f"{self.name}_{plan.hash}",
            plan.inputs,
            self.sources,
            cflags=plan.cflags,
            cuda_cflags=plan.cuda_cflags,
            ldflags=self.extra_ldflags,
            with_cuda=self.with_cuda,
            build_dir=build_dir,
            csrc=plan.root,
        )
        library = Path(module.__file__ or "")
        if library.parent.resolve() != build_dir.resolve():
            raise BuildError(f"kpt: {self.name!r} was loaded from {library}, not {build_dir}")
        size, sha256 = _cache.digest(library)
        _cache.write_marker(build_dir, _cache.Marker(plan.hash, module.__name__, library.name,
                                                     size, sha256))
        log.info("kpt: built %r in %.1f s", self.name, time.perf_counter() - start)
        return module


def _one_line(what: str, err: BuildError) -> str:
    """A BuildError as one line, the way dispatch lists reasons (one line per backend)."""
    detail = err.first_error or str(err).splitlines()[0].removeprefix("kpt: ")
    where = f" (full log: {err.log_path})" if err.log_path else ""
    return f"{what}: {detail}{where}"


def _discard(build_dir: Path) -> None:
    """Move an unfinished build out of the way, then delete it.

    It is stale: its objects, its log, and cpp_extension's own lock file, which would make
    cpp_extension wait forever. Renaming first matters when its builder was SIGKILLed: the
    orphaned ninja and compilers may still be running in it, and they keep writing into the
    renamed directory (their working directory) instead of into the fresh build.
    """
    log.info("kpt: discarding unfinished build %s", build_dir)
    trash = build_dir.with_name(f"{build_dir.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(build_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _tree(root: Path, folder: str, suffixes: frozenset[str]) -> list[str]:
    base = root / folder
    if not base.is_dir():
        return []
    return [
        p.relative_to(root).as_posix()
        for p in base.rglob("*")
        if p.suffix in suffixes and p.is_file()
    ]


_INCLUDE = re.compile(rb'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


def included_headers(root: Path, files: list[Path]) -> set[str]:
    """Paths (relative to ``root``) of the headers under ``root / "include"`` that ``files``
    ``#include``, directly or through each other (a name is looked up beside the including
    file, then in ``include/``, the build's include directory). Headers outside ``include/``
    (system, CUDA, torch) are not followed: the compiler and torch versions cover them."""
    base = root.resolve()
    include = base / "include"
    seen: set[Path] = set()
    todo = [f for f in files if f.is_file()]
    while todo:
        path = todo.pop()
        for name in _INCLUDE.findall(path.read_bytes()):
            text = name.decode(errors="replace")
            for candidate in (path.parent / text, include / text):
                target = candidate.resolve()
                if target.is_file():
                    if target.is_relative_to(include) and target not in seen:
                        seen.add(target)
                        todo.append(target)
                    break
    return {t.relative_to(base).as_posix() for t in seen}
