"""The pseudo-label losses of the adaptation loop: pixel-weighted cross-entropy and IR2F's rectification-aware
mixture loss (Gong et al., CVPR 2023; the mixture form is ours, the paper's code was not available)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mixture_loss", "weighted_ce"]


def mixture_loss(logits: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, weights: torch.Tensor,
                 ignore_index: int) -> torch.Tensor:
    """Rectification-aware mixture loss (ours, after IR2F's rectification-aware mixture model).

    The pseudo-label y is modelled as correct with probability r and uniform noise otherwise:
    ``L = -log(r * p(y | x) + (1 - r) / K)`` per pixel, so pixels with small r contribute small gradients. r is used
    with a stop-gradient (it is learned from its own signal, never pushed to 0 by this loss).

    Args:
        logits: (B, K, H, W) student logits.
        labels: (B, H, W) int64 pseudo-labels (``ignore_index`` = no loss).
        r: (B, H, W) rectification values in [0, 1].
        weights: (B, H, W) per-pixel weights (e.g. the confidence mask).

    Returns:
        scalar loss: weighted mean over labelled pixels.
    """
    k = logits.shape[1]
    valid = labels != ignore_index
    lab = torch.where(valid, labels, torch.zeros_like(labels))
    p = F.softmax(logits.float(), 1).gather(1, lab[:, None])[:, 0]
    r = r.detach().clamp(0, 1)
    nll = -torch.log(r * p + (1 - r) / k + 1e-8)
    w = weights * valid.float()
    return (nll * w).sum() / w.sum().clamp_min(1.0)


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixel-weighted cross-entropy: (B, K, H, W) logits, (B, H, W) labels and weights; mean over weighted pixels."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    w = weights * (labels != ignore_index).float()
    return (ce * w).sum() / w.sum().clamp_min(1.0)
