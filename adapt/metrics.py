"""Segmentation metrics from one confusion matrix accumulated over a whole set (as mmsegmentation and DAFormer do).

IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that appears neither in the labels nor in the predictions of the whole
set has an undefined IoU (NaN) and is left out of the mean, as in mmsegmentation's ``nanmean``; a class that
appears in the labels but is never predicted correctly has IoU 0 and counts.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix, rows = label, columns = prediction, over many batches.

    Args:
        num_classes: K.
        ignore_index: label value excluded from the counts (void).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: (B, H, W) or (H, W) integer predicted class ids in [0, K).
            target: same shape, integer label ids in [0, K) or ``ignore_index``.

        Raises:
            ValueError: shapes differ, or a prediction is outside [0, K).
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        k = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < k)
        pred, target = pred[keep], target[keep]
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted class ids must be in [0, {k})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.mat += counts.cpu()

    def compute(self) -> dict:
        return metrics_from_confusion(self.mat.numpy())


def metrics_from_confusion(cm: np.ndarray) -> Dict[str, object]:
    """Metrics from a (K, K) confusion matrix (rows = label, columns = prediction).

    Returns:
        dict with ``miou`` (percent, NaN classes left out), ``pixel_acc`` (percent), ``mean_acc`` (percent),
        ``iou`` (list of K per-class IoU in percent, None where undefined), ``acc`` (per-class recall, percent),
        ``support`` (labelled pixels per class), ``num_pixels``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
        "pixel_acc": float(tp.sum() / total * 100) if total > 0 else float("nan"),
        "mean_acc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
        "iou": [None if np.isnan(v) else float(v * 100) for v in iou],
        "acc": [None if np.isnan(v) else float(v * 100) for v in acc],
        "support": [int(v) for v in gt],
        "num_pixels": int(total),
    }


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.2f}"


def format_table(metrics: dict, class_names: Sequence[str], title: str = "") -> str:
    """A plain-text table: one row per class (IoU, accuracy, labelled pixels), then mIoU and pixel accuracy."""
    lines: List[str] = []
    if title:
        lines.append(title)
    w = max(8, max(len(n) for n in class_names))
    lines.append(f"{'class':<{w}}  {'IoU':>6}  {'Acc':>6}  {'pixels':>10}")
    for n, iou, acc, sup in zip(class_names, metrics["iou"], metrics["acc"], metrics["support"]):
        lines.append(f"{n:<{w}}  {_fmt(iou)}  {_fmt(acc)}  {sup:>10d}")
    lines.append(f"{'mIoU':<{w}}  {metrics['miou']:6.2f}")
    lines.append(f"{'pixel acc':<{w}}  {metrics['pixel_acc']:6.2f}")
    return "\n".join(lines)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores higher than a random negative
    (Mann-Whitney U with tied scores counted half).

    Args:
        scores: (N,) float scores (higher = more likely positive).
        positives: (N,) bool labels.

    Returns:
        AUROC in [0, 1]; NaN if either class is empty.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    pos = np.asarray(positives, bool).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
