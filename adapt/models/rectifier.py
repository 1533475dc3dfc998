"""IR2F rectifier: per-pixel reliability of pseudo-labels from an implicit neural representation
(Gong et al., CVPR 2023; our design, since the paper's code and exact design were not available: see
docs/method-notes.md, IR2F).

LIIF-style head (Chen et al., CVPR 2021): a latent grid (the teacher's features: its decoder features, or those
upsampled to the backbone's stride-4/8 grid and concatenated with its features there, see
:mod:`segadapt.adapt.methods.rectifier_signals`; optionally concatenated with its class probabilities, projected to
``latent_dim`` channels) is queried at continuous image coordinates. For each
query q the 4 nearest latents z_i contribute ``r_i = MLP([z_i, (q - v_i) * (h, w), cell * (h, w)])``; the local
ensemble weights each r_i by the area of the rectangle diagonally opposite to it, and ``r(q) = sigmoid(sum w_i r_i)``
is the probability that the pseudo-label at q is right. The rectifier is training-only and never exported.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_coord(h: int, w: int, device=None) -> torch.Tensor:
    """Pixel-centre coordinates of an (h, w) grid in [-1, 1], as (h, w, 2) with (y, x) order."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


class ImplicitRectifier(nn.Module):
    """Predicts rectification values r in (0, 1) at continuous coordinates.

    Args:
        in_channels: D, channels of the features (decoder, or decoder + stride-4/8 backbone features).
        num_classes: channels of the class probabilities appended to the features: K for the teacher's
            probabilities, K * n when n models' probabilities are stacked (teacher + anchor: 2K); 0 = features only.
        latent_dim: channels of the projected latent grid.
        hidden: MLP width; layers: number of hidden layers.

        prior_residual: the last layer starts at zero, so that with a ``prior`` r starts equal to it.

    ``forward(features, probs, out_size, prior=None)``: features (B, D, h, w), probs (B, num_classes, h, w) or None,
    out_size (H, W), prior (B, H, W) in [0, 1] or None: returns r (B, H, W) float in (0, 1) at the pixel centres of
    an H x W grid. With a prior, ``r = sigmoid(logit(prior) + sum w_i r_i)``: the implicit head learns a per-pixel
    correction of an observable reliability (:func:`confidence_prior`) instead of starting from nothing (our
    design, see docs/method-notes.md, IR2F).
    ``query(features, probs, coords, cell, prior)`` does the same at arbitrary coordinates (B, Q, 2) in [-1, 1]
    (y, x), with prior (B, Q), returning (B, Q).

    Raises:
        ValueError: a prior whose size is not the query grid's.
    """

    def __init__(self, in_channels: int, num_classes: int = 0, latent_dim: int = 64, hidden: int = 128,
                 layers: int = 3, prior_residual: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.prior_residual = prior_residual
        self.proj = nn.Conv2d(in_channels + num_classes, latent_dim, 1)
        dims: List[int] = [latent_dim + 4] + [hidden] * layers
        mods: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(dims[-1], 1))
        self.mlp = nn.Sequential(*mods)
        if prior_residual:  # start exactly at the prior: the MLP learns a correction of it
            nn.init.zeros_(mods[-1].weight)
            nn.init.zeros_(mods[-1].bias)

    def latent(self, features: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        x = features if probs is None or self.num_classes == 0 else torch.cat([features, probs], 1)
        return self.proj(x)

    def query(self, features: torch.Tensor, probs: Optional[torch.Tensor], coords: torch.Tensor,
              cell: Tuple[float, float], prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.latent(features, probs)  # (B, L, h, w)
        b, _, h, w = z.shape
        grid_coord = make_coord(h, w, z.device).permute(2, 0, 1)[None].expand(b, 2, h, w)
        ry, rx = 1.0 / h, 1.0 / w  # half a latent cell in [-1, 1] units
        eps = 1e-6
        preds, areas = [], []
        for vy in (-1, 1):
            for vx in (-1, 1):
                c = coords.clone()
                c[..., 0] = (c[..., 0] + vy * ry + eps).clamp(-1 + eps, 1 - eps)
                c[..., 1] = (c[..., 1] + vx * rx + eps).clamp(-1 + eps, 1 - eps)
                g = c.flip(-1)[:, :, None, :]  # grid_sample wants (x, y)
                zi = F.grid_sample(z, g, mode="nearest", align_corners=False)[..., 0].permute(0, 2, 1)  # (B, Q, L)
                vi = F.grid_sample(grid_coord, g, mode="nearest", align_corners=False)[..., 0].permute(0, 2, 1)
                rel = (coords - vi) * torch.tensor([h, w], device=z.device, dtype=z.dtype)
                cl = torch.tensor([cell[0] * h, cell[1] * w], device=z.device, dtype=z.dtype).expand_as(rel)
                preds.append(self.mlp(torch.cat([zi, rel, cl], -1))[..., 0])
                areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
        total = torch.stack(areas).sum(0)
        areas[0], areas[3] = areas[3], areas[0]  # local ensemble: weight by the diagonally opposite area
        areas[1], areas[2] = areas[2], areas[1]
        out = sum(p * (a / total) for p, a in zip(preds, areas))
        if prior is not None:
            out = out + torch.logit(prior.float().clamp(1e-4, 1 - 1e-4))
        return torch.sigmoid(out)

    def forward(self, features: torch.Tensor, probs: Optional[torch.Tensor], out_size: Tuple[int, int],
                prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        H, W = out_size
        coords = make_coord(H, W, features.device).reshape(1, -1, 2).expand(features.shape[0], -1, -1)
        if prior is not None:
            if tuple(prior.shape[-2:]) != (H, W):
                raise ValueError(f"prior has size {tuple(prior.shape[-2:])}, the query grid is {(H, W)}")
            prior = prior.reshape(features.shape[0], H * W)
        r = self.query(features, probs, coords, (2.0 / H, 2.0 / W), prior)
        return r.reshape(features.shape[0], H, W)


def confidence_prior(teacher_probs: torch.Tensor, anchor_probs: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The observable reliability of a pseudo-label (ours): the teacher's probability of that label, averaged with
    the anchor's probability of the same label when ``anchor_probs`` is given.

    Args:
        teacher_probs: (B, K, H, W) float softmax probabilities of the EMA teacher.
        anchor_probs: optional (B, K, H, W) float softmax probabilities of the frozen AdaBN anchor.
        labels: (B, H, W) int64 the labels the student trains on (values outside [0, K), e.g. the ignore index,
            read the teacher's argmax); None = the teacher's argmax everywhere. Where the labelling rule, dual-head
            fusion, SeCo or BiDA changed a label, this is the reliability of that label, not of the argmax's.

    Returns:
        (B, H, W) float in [0, 1].
    """
    label = teacher_probs.argmax(1)
    if labels is not None:
        label = torch.where((labels >= 0) & (labels < teacher_probs.shape[1]), labels, label)
    label = label[:, None]
    p = teacher_probs.gather(1, label)[:, 0]
    if anchor_probs is not None:
        p = 0.5 * (p + anchor_probs.gather(1, label)[:, 0])
    return p
