"""Backends for hardware beyond CUDA/HIP: ``xla`` (torch_xla: TPUs, and any PJRT device) and
``xpu`` (Intel GPUs through Triton's Intel backend and IPEX; IPEX's fused ops also serve Intel
CPUs).

Each op declares them in its ``BACKENDS`` tuple through :func:`kpt.backends.xla.xla_backend`
and :func:`kpt.backends.xpu.xpu_backend`; the per-op implementations live in
``kpt/backends/xla/<op>.py`` and ``kpt/backends/xpu/<op>.py`` (one name everywhere). Nothing
here imports torch_xla, IPEX or Triton at import time: a missing package is a reason that
``python -m kpt.info`` shows.
"""
