"""JIT builds of ``csrc/`` with torch's cpp_extension: content-hashed cache, locks, checks.

An op's ``_cuda.py`` declares a :class:`JitSpec` and calls ``spec.load()`` on first use; its
backend's ``available()`` returns ``spec.unavailable_reason()``, which never compiles. Builds
land in ``cache_dir()/"jit"/"<name>-<hash>"``; see :mod:`kpt.jit.spec` for the locking scheme.

Environment: ``KPT_CACHE_DIR`` (cache root), ``KPT_CSRC_DIR`` (sources to build from),
``KPT_DISABLE_JIT=1`` (never compile, only load finished builds), ``TORCH_CUDA_ARCH_LIST`` /
``PYTORCH_ROCM_ARCH`` (target arch), ``MAX_JOBS`` (ninja parallelism).
"""

from ._compile import compile_check
from ._env import cache_dir, compilers, csrc_dir
from ._errors import BuildError, CompilerMissing
from .spec import JitSpec, base_flags

__all__ = [
    "BuildError",
    "CompilerMissing",
    "JitSpec",
    "base_flags",
    "cache_dir",
    "compile_check",
    "compilers",
    "csrc_dir",
]
