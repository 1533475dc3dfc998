"""Small helpers shared by the training loops: device choice, seeding, schedules, autocast."""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; otherwise the named device. Under torchrun, CUDA means this
    process's GPU, ``cuda:LOCAL_RANK`` (:func:`segadapt.adapt.training.distributed.local_device`).

    Raises:
        ValueError: a CUDA device was requested but CUDA is not available.
    """
    from segadapt.adapt.training.distributed import local_device

    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return local_device(dev)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed``; with ``deterministic``, also make torch pick
    deterministic kernels (``torch.use_deterministic_algorithms(warn_only=True)``: an op without one warns instead
    of failing; on CUDA, cuBLAS gets the fixed workspace it needs and cuDNN autotuning is off).

    Two runs with the same seed, data and thread count then give bit-identical weights on CPU (tested on the
    pipeline); across thread counts or CPU instruction sets the float sums may still differ.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def warmup_poly(step: int, total: int, warmup: int, power: float = 1.0, warmup_ratio: float = 1e-6,
                progress: float | None = None) -> float:
    """LR factor: linear warmup from ``warmup_ratio`` to 1 over ``warmup`` steps, then poly decay to 0 at ``total``
    (DAFormer's schedule, Hoyer et al. CVPR 2022).

    ``progress`` (in [0, 1]) overrides the step-based position of the poly decay when it is further along; training
    with a wall-clock budget passes ``elapsed / budget`` so that the learning rate reaches 0 when the time is up,
    however fast the machine is.
    """
    if warmup > 0 and step < warmup:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup
    span = max(1, total - warmup)
    p = (step - warmup) / span
    if progress is not None:
        p = max(p, progress)
    return max(0.0, 1 - p) ** power


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled (no loss scaling needed); a no-op context on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (when initialised) CUDA RNG states as tensors/primitives (loadable with
    ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
          "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
          "numpy_gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` saved (states saved before NumPy/CUDA were recorded restore torch and
    Python only; CUDA states are restored when CUDA is available)."""
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(v) for v in st["python"]), st["python_gauss"]))
    if "numpy" in st:
        np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), int(st["numpy_pos"]),
                             int(st["numpy_has_gauss"]), float(st["numpy_gauss"])))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def infinite(loader):
    """Yield batches forever, re-iterating ``loader`` (each pass reshuffles when the loader shuffles)."""
    while True:
        for b in loader:
            yield b


def nan_check(loss: torch.Tensor, step: int) -> None:
    """Raise FloatingPointError (naming the step) if the scalar ``loss`` is NaN or infinite."""
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"loss became {float(loss.detach())} at step {step}; lower the learning rate")
