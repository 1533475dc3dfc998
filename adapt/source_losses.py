"""Losses of supervised source training (``segadapt train-source --loss``) against rare classes.

* ``ce``: plain cross-entropy over the labelled pixels (the default).
* ``balanced``: cross-entropy with median-frequency class weights (Eigen and Fergus, "Predicting Depth, Surface
  Normals and Semantic Labels with a Common Multi-Scale Convolutional Architecture", ICCV 2015, their semantic-label
  loss; SegNet used them on CamVid): ``w_c = median_freq / freq(c)``, where ``freq(c)`` is the number of pixels of
  class c divided by the number of labelled pixels in the frames where c is present, and ``median_freq`` the median
  of these frequencies over the classes present in the labels (so the median class weighs 1, rarer ones more).
  :func:`balanced_ce` is PyTorch's weighted cross-entropy: the sum of ``w_{y_i} * CE_i`` over the labelled pixels
  divided by the sum of their ``w_{y_i}``.
* ``ohem``: online hard example mining (Shrivastava, Gupta and Girshick, "Training Region-based Object Detectors
  with Online Hard Example Mining", CVPR 2016) in the pixel form of semantic segmentation, following mmseg's
  ``OHEMPixelSampler``: a labelled pixel is kept when the softmax probability of its true class is below
  ``max(thresh, p_(m))``, where ``p_(m)`` is the ``m``-th smallest such probability in the batch and
  ``m = min_kept * B`` (so at least ``min_kept`` pixels per frame are kept, ties aside); the cross-entropy is
  averaged over the kept pixels (mmseg averages over all pixels with weight 0 on the others: the same gradient
  direction, another scale).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["balanced_ce", "median_frequency_weights", "ohem_ce", "ohem_mask"]


def median_frequency_weights(counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Median-frequency balancing weights (Eigen and Fergus, ICCV 2015; module docstring).

    Args:
        counts: (N, K) int pixel counts of class c in frame i (ignore excluded), e.g.
            :class:`~segadapt.adapt.data.rare_class.ClassStats` ``.counts``.
        power: exponent >= 0 applied to the weights (1 = the paper's; 0.5 = their square root, milder; 0 = all 1).

    Returns:
        (K,) float32 > 0: ``(median(freq) / freq(c)) ** power`` for the classes present in the labels, 1 for absent
        ones.

    Raises:
        ValueError: ``counts`` is not 2-D or holds no labelled pixel.
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or counts.sum() <= 0:
        raise ValueError(f"need (N, K) pixel counts with a labelled pixel, got shape {counts.shape}")
    present = counts > 0
    denom = (present * counts.sum(1, keepdims=True)).sum(0)  # labelled pixels of the frames holding c
    seen = denom > 0
    freq = np.ones(counts.shape[1])
    freq[seen] = counts.sum(0)[seen] / denom[seen]
    w = np.ones(counts.shape[1])
    w[seen] = (np.median(freq[seen]) / freq[seen]) ** power
    return w.astype(np.float32)


def balanced_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    """Class-weighted cross-entropy (weighted mean over the labelled pixels).

    Args:
        logits: (B, K, H, W) float logits at the labels' size.
        labels: (B, H, W) int64 class ids in [0, K) or ``ignore_index``.
        weights: (K,) float class weights (:func:`median_frequency_weights`).

    Returns:
        scalar float32 loss (NaN when every pixel is ignored, as ``F.cross_entropy``).
    """
    return F.cross_entropy(logits.float(), labels, weight=weights.to(logits.device, torch.float32),
                           ignore_index=ignore_index)


@torch.no_grad()
def ohem_mask(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, thresh: float = 0.7,
              min_kept: int = 4000) -> torch.Tensor:
    """The hard pixels of a batch, as mmseg's ``OHEMPixelSampler`` selects them (module docstring).

    Args:
        logits: (B, K, H, W) float logits at the labels' size.
        labels: (B, H, W) int64 class ids in [0, K) or ``ignore_index``.
        thresh: probability threshold in [0, 1]: pixels whose true-class probability is below it are hard.
        min_kept: pixels kept per frame at least (>= 0), taken from the lowest true-class probabilities.

    Returns:
        (B, H, W) bool, True on kept pixels (never on ignored ones).
    """
    valid = labels != ignore_index
    keep = torch.zeros_like(valid)
    if not valid.any():
        return keep
    lab = torch.where(valid, labels, torch.zeros_like(labels))
    prob = F.softmax(logits.float(), 1).gather(1, lab[:, None])[:, 0]  # (B, H, W) true-class probability
    p = prob[valid]
    sorted_p = p.sort().values
    floor = sorted_p[min(int(min_kept) * labels.shape[0], sorted_p.numel() - 1)]
    keep[valid] = p < max(float(floor), float(thresh))
    return keep


def ohem_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, thresh: float = 0.7,
            min_kept: int = 4000) -> torch.Tensor:
    """Cross-entropy averaged over the hard pixels of :func:`ohem_mask` (OHEM, Shrivastava et al., CVPR 2016, in
    mmseg's pixel form).

    Args:
        logits: (B, K, H, W) float logits at the labels' size; labels: (B, H, W) int64 (``ignore_index`` skipped).
        thresh, min_kept: see :func:`ohem_mask`.

    Returns:
        scalar float32 loss; 0 (with grad) when no pixel is kept.
    """
    keep = ohem_mask(logits, labels, ignore_index, thresh, min_kept)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1)
