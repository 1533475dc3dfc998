"""Real frames for parity checks, calibration and benchmarks (OpenCV only: usable in torch-free processes)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np

_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_frames(folder: str | Path, n: int, size: Tuple[int, int]) -> List[np.ndarray]:
    """Up to ``n`` frames from a folder (or a split directory with ``images/``), evenly spaced, resized to (H, W),
    as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: no such folder. ValueError: no readable image in it (the message names it).
    """
    d = Path(folder)
    if (d / "images").is_dir():
        d = d / "images"
    if not d.is_dir():
        raise FileNotFoundError(f"{folder}: no such frame folder")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in _SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no image files")
    idx = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    out = []
    for i in dict.fromkeys(idx.tolist()):
        bgr = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{files[i]}: cannot read as an image")
        out.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size[1], size[0]), interpolation=cv2.INTER_AREA))
    return out
