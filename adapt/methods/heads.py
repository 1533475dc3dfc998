"""Training-only heads and helpers shared by the contrastive methods (RCCR, BiDA): a projection head, its momentum
(EMA) copy and nearest-neighbour label resizing."""

from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectionHead", "ema_", "labels_at", "momentum_copy", "real_cells"]


class ProjectionHead(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> L2-normalise over channels (RCCR's code: 2048 -> 2048 -> 128; BiDA's
    projection in our reconstruction).

    ``forward``: (N, D, h, w) float -> (N, E, h, w) float, unit norm along dim 1."""

    def __init__(self, in_channels: int, out_channels: int = 128, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def momentum_copy(head: nn.Module) -> nn.Module:
    """A frozen copy of ``head`` to follow it by EMA (RCCR's "momentum projection head")."""
    t = copy.deepcopy(head).eval()
    t.requires_grad_(False)
    return t


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` over parameters, in place."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def labels_at(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) int64 labels to (B, h, w) (RCCR's code: labels nearest-downsampled to
    the feature resolution)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def real_cells(valid: torch.Tensor | None, size: Tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool: feature cells with no crop padding under them, from (B, H, W) bool ``valid`` (None = all
    real; then shaped like ``like``'s (B, h, w))."""
    if valid is None:
        return torch.ones(like.shape[0], *size, dtype=torch.bool, device=like.device)
    return F.adaptive_avg_pool2d(valid[:, None].float(), size)[:, 0] > 1 - 1e-6
