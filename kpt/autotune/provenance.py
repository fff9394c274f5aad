"""What a tuned row was measured on and with: hardware fingerprint, versions, kernel sources.

A timing is only worth reusing on the same GPU model running the same kernel. The
*fingerprint* names the hardware and the CUDA/HIP runtime (rows are keyed by it); the
*provenance* (a hash of the backend's kernel sources and build flags, and package versions) is
stored with every row and compared on lookup, so a row measured on another kernel is ignored
instead of trusted. The hash covers what decides a kernel's speed and nothing else (see
:func:`kernel_sources`): rows shipped with kpt survive edits of the Python launchers, and
``tests/autotune/test_shipped_rows.py`` fails when a kernel changes under a shipped row.

Nothing here imports torch at module level: the database and its worker processes stay cheap.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import hashlib
import importlib.metadata
import io
import json
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Provenance fields a row must match to be trusted, per backend: the hash of what the backend
# compiles (:func:`kernel_sources`: kernel sources and build flags) and the version of what
# compiles it or is it. CUDA/HIP kernels include no torch header and their compiler's version is
# the fingerprint's runtime; Triton's compiler is Triton; the reference (and any other backend
# written in PyTorch) *is* torch. kpt's version is recorded but not compared: the source hash
# says which kernel ran, and a release number would orphan every shipped row at each release.
STALE_FIELDS: dict[str, tuple[str, ...]] = {
    "cuda": ("source_hash",),
    "hip": ("source_hash",),
    "triton": ("source_hash", "triton_version"),
}
DEFAULT_STALE_FIELDS = ("source_hash", "torch_version")

# Files of csrc/ that can end up in a build (not editor backups or build outputs).
_KERNEL_SUFFIXES = frozenset(
    {".cu", ".hip", ".cpp", ".cc", ".c", ".h", ".hh", ".hpp", ".hxx", ".cuh", ".inc", ".inl"}
)
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-xpu")


def device_fingerprint(device: torch.device | str | None = None) -> str | None:
    """A readable id of the GPU model and runtime that tuned rows hold for, e.g.
    ``NVIDIA H200/sm_90/132sm/140GiB/cuda12.8`` or ``AMD Instinct MI300X/gfx942:sramecc+:
    xnack-/304cu/192GiB/hip6.2.41133``; None for devices that are not tuned (CPU and others).

    SM (or CU) count and memory size tell apart MIG slices and SKUs of one name; the runtime
    version stands for the compiler that built the kernels. The driver version is recorded
    with each row but left out of the key: drivers update often and do not change the code
    nvcc, hipcc or Triton's bundled ptxas emit, and a key with it would orphan shipped rows.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_fingerprint(index)


@functools.cache
def _cuda_fingerprint(index: int) -> str:
    import torch

    props = torch.cuda.get_device_properties(index)
    memory = f"{round(props.total_memory / 2**30)}GiB"
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "") or "gfx-unknown"
        hip = str(torch.version.hip).split("-")[0]
        return f"{props.name}/{arch}/{props.multi_processor_count}cu/{memory}/hip{hip}"
    arch = f"sm_{props.major}{props.minor}"
    return f"{props.name}/{arch}/{props.multi_processor_count}sm/{memory}/cuda{torch.version.cuda}"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions stored with every row (computed once per process)."""
    import torch

    import kpt

    return {
        "kpt_version": kpt.__version__,
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "runtime_version": torch.version.hip or torch.version.cuda or "",
        "driver_version": _driver_version(),
    }


def triton_version() -> str:
    """Installed Triton version without importing it (importing Triton takes a second)."""
    module = sys.modules.get("triton")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    for name in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _driver_version() -> str:
    """The CUDA driver API version (e.g. ``12080``) through libcuda, or "" when unknown."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.dylib")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0:
            return str(value.value)
    return ""


def _package(op: str, ops_dir: Path) -> Path | None:
    """The folder of ``kpt/ops/`` that defines ``op``: the op's own name, else the longest
    folder name that prefixes it (``flash_attention_backward`` lives in ``flash_attention/``)."""
    if (ops_dir / op).is_dir():
        return ops_dir / op
    found = [d for d in ops_dir.iterdir() if d.is_dir() and op.startswith(d.name + "_")]
    return max(found, key=lambda d: len(d.name), default=None)


def _python_tokens(text: str) -> bytes:
    """Python source as its tokens, one line per logical line: comments and layout dropped, so
    that rewording a comment or rewrapping a line leaves the hash alone."""
    lines, line = [], []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if line:
                lines.append(" ".join(line))
            line = []
        elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            line.append(tok.string)
    return "\n".join(lines).encode()


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _segment(lines: list[str], node: ast.stmt) -> str:
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return textwrap.dedent("".join(lines[first - 1:node.end_lineno]))


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import, including those under a module-level ``if``/``try``."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                yield from _module_level(block)


def _triton_kernels(path: Path) -> list[tuple[str, bytes]]:
    """The ``@triton.jit`` functions of one module, and the module-level assignments they read
    (a ``tl.constexpr`` global, a constant): the kernels, not their launchers."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    statements = list(_module_level(ast.parse(text).body))
    kernels = [n for n in statements if isinstance(n, ast.FunctionDef)
               and any(_dotted(d).split(".")[-1] == "jit" for d in n.decorator_list)]
    read = {n.id for k in kernels for n in ast.walk(k) if isinstance(n, ast.Name)}
    parts = []
    for node in statements:
        if node in kernels:
            parts.append((f"{path.name}:{node.name}", _python_tokens(_segment(lines, node))))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if names & read:
                parts.append((f"{path.name}:{','.join(sorted(names))}",
                              _python_tokens(_segment(lines, node))))
    return parts


def _jit_specs(package: Path) -> tuple[list[tuple[str, bytes]], set[str]]:
    """Every ``JitSpec(...)`` the op's modules declare, as canonical JSON of its literal
    arguments (name, sources, extra flags), and the csrc folders their sources live in."""
    parts, folders = [], set()
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "JitSpec" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and _dotted(node.func).endswith("JitSpec")):
                continue
            try:
                args = {f"arg{i}": ast.literal_eval(a) for i, a in enumerate(node.args)}
                args.update((k.arg, ast.literal_eval(k.value)) for k in node.keywords)
                declared = json.dumps(args, sort_keys=True).encode()
            except ValueError:  # not literals: the call as written
                args, declared = {}, _python_tokens(ast.get_source_segment(text, node) or "")
            sources = args.get("sources", args.get("arg1", ()))
            folders.update(Path(s).parts[0] for s in sources if len(Path(s).parts) > 1)
            parts.append((f"{path.name}:JitSpec", declared))
    return parts, folders


# A folder's torch binding: host code that checks tensors and passes pointers on (the C++ side
# of a launcher), built with the kernels but deciding nothing about the code a config runs.
_HOST_ONLY = frozenset({"binding.cpp"})


def _files(root: Path, folder: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.suffix in _KERNEL_SUFFIXES and p.is_file() and not p.stem.startswith(skip)
            and p.name not in _HOST_ONLY]


def kernel_sources(op: str, backend: str, *, ops_dir: Path | None = None,
                   csrc: Path | None = None) -> list[tuple[str, bytes]]:
    """What decides the code one backend of one op runs, as (stable name, content) pairs.

    * ``cuda``/``hip``: the op's ``JitSpec`` declarations (sources and extra flags), kpt's base
      build flags for that runtime, every kernel file of the csrc folders those specs build
      (``csrc/<op>/``, ``csrc/<op>_<variant>/``) and the headers of ``csrc/include/`` those
      files include (directly or through each other), except those named after another op's
      folder;
    * ``triton``: the ``@triton.jit`` functions of the op's modules and of the shared
      ``kpt/ops/_triton_compat.py``, with the module-level values they read, comments and
      layout left out;
    * ``reference`` and any other backend: its whole module (``reference.py``, ``_<name>.py``):
      that Python is the kernel.

    Not the launchers (``_cuda.py``'s or ``_triton.py``'s wrapper code, and the csrc folders'
    ``binding.cpp``, their C++ side): editing how a call is checked or passed on does not
    change the code a config runs, and must not orphan the tuned rows shipped with kpt. A
    change to what a config *means* (a launcher that maps a config key to other launch
    parameters) is not seen here: drop the shipped rows of that op.

    ``ops_dir`` and ``csrc`` default to this installation's ``kpt/ops`` and JIT source tree;
    other values hash another checkout (to check which code old rows were measured on).
    """
    ops_dir = ops_dir or Path(__file__).resolve().parent.parent / "ops"
    package = _package(op, ops_dir)
    if backend == "triton":
        modules = sorted(package.glob("*.py")) if package is not None else []
        compat = ops_dir / "_triton_compat.py"
        return [part for path in [*modules, *([compat] if compat.is_file() else [])]
                for part in _triton_kernels(path)]
    if backend not in ("cuda", "hip"):
        module = "reference.py" if backend == "reference" else f"_{backend}.py"
        path = package / module if package is not None else None
        return [(module, path.read_bytes())] if path is not None and path.is_file() else []

    from kpt.jit import base_flags, csrc_dir
    from kpt.jit.spec import included_headers

    root = csrc or csrc_dir()
    specs, folders = _jit_specs(package) if package is not None else ([], set())
    if package is not None:
        folders |= {d.name for d in root.iterdir() if d.is_dir()
                    and (d.name == package.name or d.name.startswith(package.name + "_"))}
    others = tuple(d.name for d in root.iterdir()
                   if d.is_dir() and d.name != "include" and d.name not in folders)
    parts = [*specs, ("flags", json.dumps(base_flags(backend)).encode())]
    for name in sorted(folders):
        if (root / name).is_dir():
            parts += _files(root, root / name)
    if (root / "include").is_dir():
        reached = included_headers(root, [root / rel for rel, _ in parts
                                          if (root / rel).is_file()])
        parts += [part for part in _files(root, root / "include", skip=others)
                  if part[0] in reached]
    return parts




@functools.cache
def source_hash(op: str, backend: str) -> str:
    """A short hash of :func:`kernel_sources` of one backend of one op.

    Not the JIT's build hash: that one also covers the host compiler, Python and torch's git
    revision, which do not change how fast a kernel runs but would make rows shipped with kpt
    match no user's machine; and it needs compiler version probes, which do not belong on the
    first lookup. A backend with no sources hashes to the digest of nothing, which is stable.
    """
    return hash_parts(kernel_sources(op, backend))


def hash_parts(parts: list[tuple[str, bytes]]) -> str:
    """The 16-hex-digit hash of (name, content) pairs, in order."""
    digest = hashlib.sha256()
    for name, data in parts:
        digest.update(name.encode() + b"\0")
        digest.update(data + b"\0")
    return digest.hexdigest()[:16]


def provenance(op: str, backend: str) -> dict[str, str]:
    """Provenance columns for a row measured now."""
    return {"source_hash": source_hash(op, backend), **versions()}


def stale_reason(row: dict[str, Any]) -> str | None:
    """Why a row does not describe the code running now, or None when it does."""
    current = provenance(row["op"], row["backend"])
    for name in STALE_FIELDS.get(row["backend"], DEFAULT_STALE_FIELDS):
        if not row.get(name):  # e.g. a Triton row from a file without triton_version
            return f"{name} not recorded (current {current[name]!r})"
        if row.get(name) != current[name]:
            return f"{name} {row.get(name)!r} != current {current[name]!r}"
    return None


def clear_caches() -> None:
    """Forget cached hashes and versions (after sources changed, or in tests)."""
    source_hash.cache_clear()
    versions.cache_clear()
    _cuda_fingerprint.cache_clear()
