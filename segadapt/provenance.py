"""What decides a run's result besides its config: package version and commit, library versions and the machine.

Recorded in the pipeline's ``report.json`` / ``summary.json`` so that a user comparing their run with the README can
tell a different commit, library or machine from a broken install.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_commit(path: Optional[Path] = None) -> Dict[str, object]:
    """The git commit of the source tree that holds ``path`` (default: this package's folder).

    Returns:
        ``{"commit": "<40 hex>" | None, "dirty": bool | None}``; ``None`` values when the package is not run from a
        git checkout (an installed wheel) or git is missing.
    """
    where = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if len(commit) != 40:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict[str, object]:
    """The machine: CPU model, logical cores usable by this process, torch's intra-op threads and the GPU (name,
    or None). torch is optional here (the runtime-only install has none)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info: Dict[str, object] = {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(),
                               "torch_threads": None, "gpu": None}
    if "torch" in sys.modules or _version("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_provenance() -> Dict[str, object]:
    """Package version and commit, Python and library versions, and :func:`machine_info`."""
    return {"segadapt": _version("segadapt"), **source_commit(), "python": platform.python_version(),
            "libraries": {d: _version(d) for d in ("torch", "onnxruntime", "onnx", "opencv-python-headless",
                                                   "transformers")},
            "machine": machine_info()}
