"""Debug image grids for self-training (DAFormer keeps them; so do we, in their own module)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
import torch

from segadapt.runtime.classes import colorize


def _gray(x: torch.Tensor) -> np.ndarray:
    a = x.detach().float().cpu().numpy()
    a = np.clip(a, 0, 1)
    return cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]


def save_debug_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor, palette, ignore_index: int,
                    rect: Optional[torch.Tensor] = None, depth: Optional[torch.Tensor] = None, max_rows: int = 4) -> None:
    """Write a PNG: one row per sample with image | teacher pseudo-label | rectification map | depth.

    Args:
        images: (B, 3, H, W) uint8; labels: (B, H, W) int64 (ignore shown black); rect: (B, H, W) in [0, 1];
        depth: (B, 1, H, W) in [0, 1].
    """
    rows: List[np.ndarray] = []
    for i in range(min(max_rows, images.shape[0])):
        img = images[i].permute(1, 2, 0).cpu().numpy()
        lab = labels[i].cpu().numpy().copy()
        col = colorize(np.where(lab == ignore_index, 255, lab), palette)
        cells = [img, col]
        if rect is not None:
            cells.append(_gray(rect[i]))
        if depth is not None:
            cells.append(_gray(depth[i, 0]))
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
