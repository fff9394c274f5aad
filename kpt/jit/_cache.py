"""The on-disk build cache: a lock per build, a completion marker, loading a finished build.

Layout under ``cache_dir()/"jit"``::

    <name>-<hash>/          cpp_extension's build directory (ninja files, objects, the .so,
                            src/ snapshot of the sources, build.log when the build failed)
    <name>-<hash>/.ok       completion marker, written last and atomically
    <name>-<hash>.lock      locked (an OS file lock, through ``filelock``) while a process
                            builds; kept afterwards on POSIX

Only a directory with a marker naming its hash is trusted. A build killed midway (SIGKILL, OOM,
a full disk) leaves a directory without one, which the next builder deletes and rebuilds; its
lock is released by the OS when the process dies, so nobody waits on a dead builder. The marker
also records the library's size and SHA-256: a library damaged after its build (truncated by a
full disk or an interrupted copy of the cache) is rebuilt, never loaded: mapping a truncated
shared object kills the process with SIGBUS, which no Python code can catch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ._errors import BuildError

log = logging.getLogger("kpt")

MARKER = ".ok"


@dataclass(frozen=True)
class Marker:
    """What a finished build recorded: its hash and the Python module it produced.

    The module name is recorded because cpp_extension renames an extension (``name_v1``)
    when one process builds two versions of the same name, and because builds made before
    module names carried the build hash are plain ``name``.
    """

    hash: str
    module: str
    library: str
    size: int = -1
    sha256: str = ""


def digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_marker(build_dir: Path, build_hash: str) -> Marker | None:
    """The marker of a finished build of ``build_hash`` in ``build_dir`` whose library is
    intact (the size and digest it recorded), else None."""
    try:
        data = json.loads((build_dir / MARKER).read_text())
        marker = Marker(hash=data["hash"], module=data["module"], library=data["library"],
                        size=int(data.get("size", -1)), sha256=str(data.get("sha256", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    library = build_dir / marker.library
    if marker.hash != build_hash or not library.is_file():
        return None
    try:
        intact = library.stat().st_size == marker.size and digest(library)[1] == marker.sha256
    except OSError:
        intact = False
    if not intact:  # (a marker of an older kpt records neither: rebuilt once)
        log.warning("kpt: the cached library %s does not match the size and digest recorded "
                    "when it was built; rebuilding it", library)
        return None
    return marker


def write_marker(build_dir: Path, marker: Marker) -> None:
    """Write the marker atomically (temp file, fsync, rename): it is either whole or absent."""
    tmp = build_dir / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(marker), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, build_dir / MARKER)


def import_library(module_name: str, path: Path) -> types.ModuleType:
    """Import a built extension from its file, without putting it in ``sys.modules``.

    The module's name must be the one it was built as (its ``PyInit_<name>`` symbol).
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot make an import spec for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_finished(build_dir: Path, build_hash: str) -> types.ModuleType | None:
    """The module of a finished build, or None when there is none (never a half-built one)."""
    marker = read_marker(build_dir, build_hash)
    if marker is None:
        return None
    try:
        module = import_library(marker.module, build_dir / marker.library)
    except ImportError as err:
        raise BuildError(
            f"the cached build in {build_dir} is marked finished but does not import: {err}\n"
            f"hint: delete {build_dir} to rebuild"
        ) from err
    loaded = Path(module.__file__ or "").resolve().parent
    if loaded != build_dir.resolve():
        # Python handed back a module of the same name loaded earlier from another build
        # (caches written before builds got their own module names): never run its code.
        raise BuildError(
            f"importing the cached build in {build_dir} returned the module loaded from "
            f"{loaded} (same module name {marker.module!r})\n"
            f"hint: delete {build_dir} to rebuild it under its own name"
        )
    return module


@contextlib.contextmanager
def file_lock(path: Path, waiting_for: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block.

    ``filelock``'s OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) rather than a
    lock *file* whose existence means "locked": the OS drops the lock when its process dies,
    so a killed builder can never leave a lock behind that hangs others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("kpt: waiting for another process %s (lock %s)", waiting_for, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
