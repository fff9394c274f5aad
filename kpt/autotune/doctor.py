"""What can run here and why not: shared by ``kpt-autotune doctor`` and ``python -m kpt.info``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_table(device: torch.device | str | None = None) -> list[tuple[str, str, str]]:
    """(op, backend, status) for every op and backend on ``device`` (``kpt.info``'s table)."""
    from kpt.info import backend_rows

    return backend_rows(device if device is not None else _default_device())


def _tool_version(tool: str, pattern: str) -> str:
    home = os.environ.get("CUDA_HOME" if tool == "nvcc" else "ROCM_PATH", "")
    path = shutil.which(tool) or (str(Path(home) / "bin" / tool) if home else None)
    if not path or not Path(path).is_file():
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{path} (cannot run: {err})"
    match = re.search(pattern, out.stdout + out.stderr)
    return f"{match.group(1) if match else 'unknown version'} ({path})"


def environment(device: torch.device | str | None = None) -> list[tuple[str, str]]:
    """(name, value) lines: device, fingerprint, database, and the toolchain versions."""
    from kpt.autotune import db, provenance

    device = torch.device(device) if device is not None else _default_device()
    versions = provenance.versions()
    if device.type == "cuda":
        described = f"{device} {torch.cuda.get_device_name(device)}"
    else:
        described = str(device)
    return [
        ("device", described),
        ("fingerprint", provenance.device_fingerprint(device) or "none (device is not tuned)"),
        ("database", str(db.default_path())),
        ("kpt", versions["kpt_version"]),
        ("torch", versions["torch_version"]),
        ("triton", versions["triton_version"] or "not installed"),
        ("CUDA runtime", torch.version.cuda or "none"),
        ("HIP runtime", torch.version.hip or "none"),
        ("CUDA driver", versions["driver_version"] or "unknown"),
        ("nvcc", _tool_version("nvcc", r"release ([\d.]+)")),
        ("hipcc", _tool_version("hipcc", r"HIP version: ([\w.\-]+)")),
    ]
