"""Small helpers shared by the training loops: device choice, seeding, schedules, autocast."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; otherwise the named device.

    Raises:
        ValueError: a CUDA device was requested but CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def warmup_poly(step: int, total: int, warmup: int, power: float = 1.0, warmup_ratio: float = 1e-6,
                progress: float | None = None) -> float:
    """LR factor: linear warmup from ``warmup_ratio`` to 1 over ``warmup`` steps, then poly decay to 0 at ``total``
    (DAFormer schedule, methods.md 0.2).

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
    """torch and Python RNG states as tensors/primitives (loadable with ``torch.load(weights_only=True)``)."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(v) for v in st["python"]), st["python_gauss"]))


def infinite(loader):
    """Yield batches forever, re-iterating ``loader`` (each pass reshuffles when the loader shuffles)."""
    while True:
        for b in loader:
            yield b


def nan_check(loss: torch.Tensor, step: int) -> None:
    """Raise FloatingPointError (naming the step) if the scalar ``loss`` is NaN or infinite."""
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"loss became {float(loss.detach())} at step {step}; lower the learning rate")
