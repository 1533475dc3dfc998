"""What the rectifier reads and what it is trained toward (IR2F, Gong et al. CVPR 2023; our design, not the paper's:
see docs/method-notes.md, IR2F).

The anchor-agreement target (teacher argmax == anchor argmax) is partly a function of the rectifier's own inputs (the
anchor's probabilities enter its latent grid), and the decoder's output-stride grid is coarse for the boundary detail
that motivates IR2F. This module adds

* features at stride 4 or 8 (:func:`rectifier_input`, ``rectifier.features``): the decoder features upsampled to
  the backbone's stride-4/8 grid and concatenated with the backbone's own features there, for both architectures;
* a source-free target the rectifier cannot compute from its inputs (:func:`view_consensus_probs`,
  ``rectifier.view_consensus``): the teacher's weak-view label is called right where it equals the argmax of the
  teacher's mean probability over views the rectifier never sees, an upscaled view (``view_scale``, default 1.5) and a
  flipped view with the strong view's colour jitter and blur. Extra teacher passes, no gradients. (IR2F learns r
  with labelled source data at hand, which a source-free run does not have; the views and their combination are
  our design.)
* :func:`agreement_target` and :func:`masked_bce`: the binary target (all enabled signals AND-ed) and its BCE over
  real pixels only (crop padding excluded).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.adapt.augment import normalize_float, photometric
from segadapt.adapt.config import PhotometricConfig, RectifierConfig

FEATURE_STRIDES = {"decoder": 0, "stride4": 4, "stride8": 8}


def feature_stride(rc: RectifierConfig) -> int:
    """The backbone stride of ``rectifier.features`` (0 = the decoder features only).

    Raises:
        ValueError: an unknown ``features`` value.
    """
    if rc.features not in FEATURE_STRIDES:
        raise ValueError(f"rectifier.features must be one of {tuple(FEATURE_STRIDES)}, got {rc.features!r}")
    return FEATURE_STRIDES[rc.features]


def rectifier_feature_channels(model: nn.Module, rc: RectifierConfig) -> int:
    """D, the channels of :func:`rectifier_input`'s features for a
    :class:`~segadapt.adapt.models.segmenter.Segmenter`."""
    s = feature_stride(rc)
    return int(model.feature_channels) + (model.low_level_channels(s) if s else 0)


def rectifier_input(model: nn.Module, x: torch.Tensor, rc: RectifierConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and the rectifier's features as configured.

    Args:
        model: a Segmenter (the teacher's, in eval mode; the caller decides about gradients).
        x: (B, 3, H, W) normalised float image.

    Returns:
        logits (B, K, h, w) at the model's output stride; features (B, D, h', w') with D =
        :func:`rectifier_feature_channels`: the decoder features at (h, w) for ``decoder``, else at the backbone's
        stride-4/8 grid (h' = ceil(H / s)).
    """
    s = feature_stride(rc)
    return model.forward_low_level(x, s) if s else model.forward_features(x)


def _probs_at(model: nn.Module, x: torch.Tensor, hw) -> torch.Tensor:
    return F.softmax(F.interpolate(model(x).float(), size=hw, mode="bilinear", align_corners=False), 1)


@torch.no_grad()
def view_consensus_probs(model: nn.Module, img: torch.Tensor, mean, std, rc: RectifierConfig,
                         strong: PhotometricConfig) -> Optional[torch.Tensor]:
    """The teacher's mean probability over the views the rectifier never sees, mapped back to the weak view.

    Args:
        model: the teacher segmenter (eval mode); img: (B, 3, H, W) uint8 weak view.
        mean, std: the checkpoint's RGB normalisation.
        rc: ``view_scale`` (0 = no scaled view) and ``view_flip_photometric`` select the views.
        strong: the colour jitter and blur of the flipped view (the strong view's settings).

    Returns:
        (B, K, H, W) float32 probabilities, or None when no view is enabled.
    """
    hw = tuple(img.shape[-2:])
    x01 = img.float() / 255.0
    views = []
    if rc.view_scale > 0:
        xs = F.interpolate(x01, scale_factor=rc.view_scale, mode="bilinear", align_corners=False).clamp(0, 1)
        views.append(_probs_at(model, normalize_float(xs, mean, std), hw))
    if rc.view_flip_photometric:
        xp = photometric(x01.flip(-1), strong)
        views.append(_probs_at(model, normalize_float(xp, mean, std), hw).flip(-1))
    return torch.stack(views).mean(0) if views else None


def agreement_target(label: torch.Tensor, others: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """1 where every given (B, K, H, W) probability map's argmax equals ``label`` (B, H, W); None entries are
    skipped. Returns (B, H, W) bool (all True when nothing is given)."""
    target = torch.ones_like(label, dtype=torch.bool)
    for p in others:
        if p is not None:
            target &= p.argmax(1) == label
    return target


def masked_bce(r: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean BCE of r (B, h, w) in (0, 1) toward a (B, H, W) bool target, over real pixels only.

    Target and ``valid`` ((B, H, W) bool, False = crop padding; None = all real) are brought to r's grid by
    nearest-neighbour sampling. Returns a scalar; 0 (with a gradient path) when no pixel is real.
    """
    size = tuple(r.shape[-2:])
    tgt = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0]
    bce = F.binary_cross_entropy(r.clamp(1e-6, 1 - 1e-6), tgt, reduction="none")
    if valid is None:
        return bce.mean()
    w = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0]
    return (bce * w).sum() / w.sum().clamp_min(1.0)


__all__ = ["FEATURE_STRIDES", "agreement_target", "feature_stride", "masked_bce", "rectifier_feature_channels",
           "rectifier_input", "view_consensus_probs"]
