"""Pseudo-labels from teacher predictions: confidence thresholds, class-balanced thresholds and dual-head fusion.

Pure functions on (B, K, H, W) probabilities; shapes in each docstring.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def class_balanced_thresholds(probs: torch.Tensor, fraction: float = 0.5, cap: float = 0.9,
                              floor: float = 0.0, sample: int = 200_000) -> torch.Tensor:
    """Per-class confidence thresholds, CBST-style (Zou et al., ECCV 2018; methods.md 1.3 "class-wise top-k%").

    For each class c, the threshold is the confidence above which the top ``fraction`` of the pixels predicted as c
    lie, capped at ``cap`` (so frequent, confident classes do not crowd out rare ones) and floored at ``floor``.

    Args:
        probs: (B, K, H, W) softmax probabilities.
        fraction: share of each class's predicted pixels to keep, in (0, 1].
        cap, floor: bounds of the thresholds, in [0, 1].
        sample: at most this many pixels are used (random subset) to estimate the quantiles.

    Returns:
        (K,) float thresholds; classes never predicted get ``cap``.
    """
    k = probs.shape[1]
    conf, pred = probs.max(1)
    conf, pred = conf.reshape(-1), pred.reshape(-1)
    if conf.numel() > sample:
        idx = torch.randint(0, conf.numel(), (sample,), device=conf.device)
        conf, pred = conf[idx], pred[idx]
    th = torch.full((k,), cap, device=probs.device, dtype=probs.dtype)
    for c in range(k):
        cc = conf[pred == c]
        if cc.numel() > 0:
            th[c] = torch.quantile(cc.float(), 1.0 - fraction).to(probs.dtype)
    return th.clamp(min=floor, max=cap)


class ThresholdTracker:
    """Running (EMA) class-balanced thresholds over batches, so rare classes get a stable estimate.

    Args:
        num_classes: K.
        fraction, cap, floor: see :func:`class_balanced_thresholds`.
        momentum: EMA momentum of the per-class thresholds across steps.
    """

    def __init__(self, num_classes: int, fraction: float = 0.5, cap: float = 0.9, floor: float = 0.0,
                 momentum: float = 0.9):
        self.fraction, self.cap, self.floor, self.momentum = fraction, cap, floor, momentum
        self.value: Optional[torch.Tensor] = None
        self.num_classes = num_classes

    def update(self, probs: torch.Tensor) -> torch.Tensor:
        """Update with a batch of (B, K, H, W) probabilities; returns the (K,) thresholds."""
        th = class_balanced_thresholds(probs.detach(), self.fraction, self.cap, self.floor)
        if self.value is None:
            self.value = th
        else:
            seen = (probs.argmax(1).reshape(-1).bincount(minlength=self.num_classes) > 0)
            upd = self.momentum * self.value + (1 - self.momentum) * th
            self.value = torch.where(seen, upd, self.value)
        return self.value

    def state_dict(self) -> dict:
        return {"value": None if self.value is None else self.value.cpu()}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


def pseudo_label(probs: torch.Tensor, thresholds: torch.Tensor | float,
                 ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels with a confidence mask.

    Args:
        probs: (B, K, H, W) probabilities.
        thresholds: scalar or (K,) per-class confidence thresholds.
        ignore_index: label written where the mask is False.

    Returns:
        labels (B, H, W) int64 (``ignore_index`` where rejected), mask (B, H, W) bool, confidence (B, H, W).
    """
    conf, lab = probs.max(1)
    th = thresholds[lab] if torch.is_tensor(thresholds) and thresholds.ndim == 1 else thresholds
    mask = conf >= th
    return torch.where(mask, lab, torch.full_like(lab, ignore_index)), mask, conf


def fuse_dual_head(p_rgb: torch.Tensor, p_rgbd: torch.Tensor, require_agreement: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CrossMatch dual-head pseudo-label denoising [RECON, methods.md 1.3]: average the RGB and RGB-D teachers'
    softmax; optionally keep only pixels where both heads' argmax agree.

    Args:
        p_rgb, p_rgbd: (B, K, H, W) probabilities of the two teachers.

    Returns:
        fused probabilities (B, K, H, W) and an agreement mask (B, H, W) bool (all True without the requirement).
    """
    fused = 0.5 * (p_rgb + p_rgbd)
    agree = p_rgb.argmax(1) == p_rgbd.argmax(1) if require_agreement else torch.ones_like(fused[:, 0], dtype=torch.bool)
    return fused, agree


def coverage_per_class(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Share of all pixels carrying each class's pseudo-label: (K,) float; 1 - sum = rejected share."""
    valid = labels != ignore_index
    counts = torch.bincount(labels[valid].reshape(-1), minlength=num_classes).float()
    return counts / max(1, labels.numel())
