"""Label-free validators: scores of a segmentation model on unlabelled target frames.

A user who adapts has no target labels, so a candidate model (the source model, AdaBN blends, the run's saves, the
UDA model) can only be judged by what it predicts on the target frames. Each function here is one validator from the
unsupervised-validation literature, in a per-pixel form for segmentation; :mod:`segadapt.adapt.selection` scores
every candidate with them and picks one.

Conventions: ``probs`` is (B, K, H, W) float softmax probabilities; ``valid`` is (B, H, W) bool (True on real image
pixels, False on padding; None = all real); padding never counts. Each function returns a Python float; the
direction ("higher is better" or "lower is better") is in its docstring, and :data:`HIGHER_IS_BETTER` records it.

- entropy: Morerio, Cavazza, Murino, "Minimal-Entropy Correlation Alignment for Unsupervised Deep Domain
  Adaptation", ICLR 2018: entropy of the target predictions as the validation criterion.
- information maximisation (IM): the diversity-minus-uncertainty objective of Shi and Sha (ICML 2012) and SHOT
  (Liang et al., ICML 2020), compared with the other validators by Musgrave, Belongie and Lim (2022).
- SND: Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood
  Density", ICCV 2021 (its segmentation experiments sample pixels).
- MixVal: Hu et al., "Mixed Samples as Probes for Unsupervised Model Selection in Domain Adaptation", NeurIPS 2023
  (inference-time mixup with lambda = 0.55 labelled by the dominant sample's pseudo-label; ICE_intra on pairs of
  the same class, ICE_inter on pairs of different classes). Segmentation form (our design): a frame is mixed with
  another frame of the sample; each pixel is an intra pair where the two frames' pseudo-labels agree there, an
  inter pair where they differ.
- agreement with the AdaBN source model and class-share drift (total variation of the predicted class shares):
  our signals, as in the label-free monitor (:mod:`segadapt.adapt.monitor`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from segadapt.adapt.monitor import total_variation

__all__ = ["HIGHER_IS_BETTER", "MIXVAL_LAMBDA", "SND_TEMPERATURE", "agreement", "class_share_drift", "class_shares",
           "information_maximization", "mean_entropy", "mixval_accuracy", "mix_frames", "row_entropy", "snd"]

#: the validators' direction (True: a higher value is taken as a better model)
HIGHER_IS_BETTER = {"entropy": False, "im": True, "snd": True, "mixval_intra": True, "mixval_inter": True,
                    "agreement": True, "drift": False}
#: MixVal's mixing weight of the dominant frame (Hu et al., NeurIPS 2023)
MIXVAL_LAMBDA = 0.55
#: SND's temperature (Saito et al., ICCV 2021)
SND_TEMPERATURE = 0.05


def _valid(probs: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, W) bool mask: ``valid`` (checked against ``probs``) or all True."""
    if valid is None:
        return torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool, device=probs.device)
    if tuple(valid.shape) != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"valid mask has shape {tuple(valid.shape)}, expected {(probs.shape[0], *probs.shape[2:])}")
    return valid.bool()


def _pixels(probs: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, K) float32 probabilities of the N valid pixels."""
    m = _valid(probs, valid)
    return probs.float().permute(0, 2, 3, 1)[m]


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """(N,) entropy in nats of each row of (N, K) probabilities (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def mean_entropy(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """Entropy validator (Morerio et al., ICLR 2018): mean per-pixel prediction entropy over the valid pixels,
    divided by log K, in [0, 1]. Lower is taken as better (known failure: self-training sharpens wrong predictions
    too). NaN with no valid pixel.

    Args:
        probs: (B, K, H, W) probabilities. valid: (B, H, W) bool or None.

    Raises:
        ValueError: ``valid`` of another shape.
    """
    p = _pixels(probs, valid)
    return float(row_entropy(p).mean() / math.log(probs.shape[1])) if len(p) else float("nan")


def information_maximization(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """IM validator (as in SHOT, Liang et al., ICML 2020): entropy of the mean prediction minus the mean per-pixel
    entropy, both divided by log K; in [-1, 1], higher is better. A model that predicts one class everywhere
    scores at most 0; confident and diverse predictions score near 1. NaN with no valid pixel.

    Args:
        probs: (B, K, H, W) probabilities. valid: (B, H, W) bool or None.

    Raises:
        ValueError: ``valid`` of another shape.
    """
    p = _pixels(probs, valid)
    if not len(p):
        return float("nan")
    log_k = math.log(probs.shape[1])
    return float((row_entropy(p.mean(0, keepdim=True))[0] - row_entropy(p).mean()) / log_k)


def snd(probs: torch.Tensor, valid: Optional[torch.Tensor] = None, pixels: int = 4000,
        temperature: float = SND_TEMPERATURE, generator: Optional[torch.Generator] = None) -> float:
    """Soft Neighborhood Density (Saito et al., ICCV 2021; pixels sampled, as for segmentation there):
    L2-normalised probability vectors of ``pixels`` valid pixels drawn at random, their cosine similarities with
    the diagonal masked, a softmax of each row divided by ``temperature``, the mean entropy of the rows. Higher is
    taken as better (dense neighbourhoods). A model predicting one class everywhere reaches the maximum, log(n - 1)
    for n pixels: SND does not detect collapse (pair it with IM or drift). NaN with fewer than two valid pixels.

    Args:
        probs: (B, K, H, W) probabilities. valid: (B, H, W) bool or None.
        pixels: how many valid pixels to sample (all when fewer); memory grows with its square.
        temperature: the softmax temperature (paper: 0.05).
        generator: torch.Generator (CPU) for a reproducible sample.

    Raises:
        ValueError: ``valid`` of another shape, ``pixels`` < 2 or ``temperature`` <= 0.
    """
    if pixels < 2 or temperature <= 0:
        raise ValueError(f"snd: pixels must be >= 2 and temperature > 0 (got {pixels}, {temperature})")
    p = _pixels(probs, valid)
    if len(p) < 2:
        return float("nan")
    if len(p) > pixels:
        p = p[torch.randperm(len(p), generator=generator)[:pixels].to(p.device)]
    z = F.normalize(p, dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(float("-inf"))
    soft = torch.softmax(sim / temperature, dim=1)
    return float(row_entropy(soft).mean())


def mix_frames(a: torch.Tensor, b: torch.Tensor, lam: float = MIXVAL_LAMBDA) -> torch.Tensor:
    """MixVal's inference-time mixup (Hu et al., NeurIPS 2023): ``lam * a + (1 - lam) * b`` of two (B, 3, H, W)
    frames (uint8 or float; the result is float32 in the same units). ``lam`` > 0.5 keeps ``a`` dominant.

    Raises:
        ValueError: frames of different shapes or ``lam`` not in (0.5, 1).
    """
    if a.shape != b.shape:
        raise ValueError(f"mix_frames: shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.5 < lam < 1:
        raise ValueError(f"mix_frames: lam must be in (0.5, 1), got {lam}")
    return lam * a.float() + (1 - lam) * b.float()


def mixval_accuracy(pred_mixed: torch.Tensor, label_a: torch.Tensor, label_b: torch.Tensor,
                    valid: Optional[torch.Tensor] = None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """MixVal's counts for one batch of mixed frames (segmentation form, see the module docstring): a pixel is an
    intra pair where ``label_a == label_b``, an inter pair where they differ; it is correct where the prediction on
    the mixed frame equals ``label_a`` (the dominant frame's pseudo-label).

    Args:
        pred_mixed, label_a, label_b: (B, H, W) integer class ids: the candidate's argmax on the mixed frames, its
            own argmax on the dominant frames ``a`` and on the other frames ``b``.
        valid: (B, H, W) bool: pixels real in both frames (None = all).

    Returns:
        ((intra correct, intra total), (inter correct, inter total)) pixel counts; ICE_intra = correct / total.

    Raises:
        ValueError: tensors of different shapes.
    """
    if not (pred_mixed.shape == label_a.shape == label_b.shape):
        raise ValueError(f"mixval_accuracy: shapes differ: {tuple(pred_mixed.shape)}, {tuple(label_a.shape)}, "
                         f"{tuple(label_b.shape)}")
    m = torch.ones_like(label_a, dtype=torch.bool) if valid is None else valid.bool()
    same = (label_a == label_b) & m
    other = (label_a != label_b) & m
    hit = pred_mixed == label_a
    return (int((hit & same).sum()), int(same.sum())), (int((hit & other).sum()), int(other.sum()))


def class_shares(pred: torch.Tensor, num_classes: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(K,) float32 share of the valid pixels predicted as each class (all 0 with no valid pixel).
    ``pred``: (B, H, W) integer class ids in [0, K)."""
    m = torch.ones_like(pred, dtype=torch.bool) if valid is None else valid.bool()
    counts = torch.bincount(pred[m].reshape(-1).long(), minlength=num_classes).float().cpu()
    return counts / max(1.0, float(counts.sum()))


def agreement(pred: torch.Tensor, reference: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """Share of the valid pixels where two (B, H, W) class maps agree, in [0, 1] (NaN with no valid pixel). Used
    with the AdaBN source model as ``reference``: higher = closer to it."""
    m = torch.ones_like(pred, dtype=torch.bool) if valid is None else valid.bool()
    n = int(m.sum())
    return float(((pred == reference) & m).sum()) / n if n else float("nan")


def class_share_drift(pred: torch.Tensor, reference: torch.Tensor, num_classes: int,
                      valid: Optional[torch.Tensor] = None) -> float:
    """Class-share drift: total-variation distance ``0.5 * sum_c |s(c) - s_ref(c)|`` between the predicted class
    shares of two (B, H, W) class maps over the valid pixels, in [0, 1]; lower = the class balance moved less."""
    return total_variation(class_shares(pred, num_classes, valid), class_shares(reference, num_classes, valid))
