"""Pseudo-labels from teacher predictions: confidence thresholds, class-balanced thresholds, CBST's class-normalised
labelling rule, the kept-share curriculum and dual-head fusion.

Pure functions on (B, K, H, W) probabilities; shapes in each docstring.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from segadapt.adapt.training.distributed import all_reduce_sum, pool_class_thresholds


def class_balanced_thresholds(probs: torch.Tensor, fraction: float = 0.5, cap: float = 0.9,
                              floor: float = 0.0, sample: int = 200_000,
                              valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-class confidence thresholds, CBST-style (Zou et al., ECCV 2018: class-wise top-k%; the cap and floor are
    our design, see docs/method-notes.md, CBST).

    For each class c, the threshold is the confidence above which the top ``fraction`` of the pixels predicted as c
    lie, capped at ``cap`` (so frequent, confident classes do not crowd out rare ones) and floored at ``floor``.

    Args:
        probs: (B, K, H, W) softmax probabilities.
        fraction: share of each class's predicted pixels to keep, in (0, 1].
        cap, floor: bounds of the thresholds, in [0, 1].
        sample: at most this many pixels are used (random subset) to estimate the quantiles.
        valid: (B, H, W) bool, False on pixels that are not part of the image (crop padding): they are left out of
            the statistics; None = all pixels count.

    Returns:
        (K,) float thresholds; classes never predicted (on valid pixels) get ``cap``.
    """
    k = probs.shape[1]
    conf, pred = probs.max(1)
    if valid is not None:
        conf, pred = conf[valid], pred[valid]
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

    def update(self, probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Update with a batch of (B, K, H, W) probabilities; returns the (K,) thresholds.

        ``valid``: (B, H, W) bool, False on crop padding (left out of the statistics); None = all pixels count.
        """
        th = class_balanced_thresholds(probs.detach(), self.fraction, self.cap, self.floor, valid=valid)
        pred = probs.argmax(1) if valid is None else probs.argmax(1)[valid]
        # data-parallel runs: the same thresholds on every rank (adapt/distributed.py); no-op otherwise
        th, counts = pool_class_thresholds(th, pred.reshape(-1).bincount(minlength=self.num_classes))
        if self.value is None:
            self.value = th
        else:
            seen = counts > 0
            value = self.value.to(th.device)  # restored from a checkpoint on the CPU
            upd = self.momentum * value + (1 - self.momentum) * th
            self.value = torch.where(seen, upd, value)
        return self.value

    def state_dict(self) -> dict:
        return {"value": None if self.value is None else self.value.cpu()}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


class ClassFrequencyWeights:
    """Per-pixel loss weights that lift rare pseudo-label classes (our design, in the spirit of CBST, Zou et al.,
    ECCV 2018, which balances by thresholds only: see docs/method-notes.md, CBST).

    Self-training on CamVid dusk drives the rare classes (pole, sign, pedestrian, bicyclist) to 0 IoU within 150
    steps even with class-balanced thresholds: they are few, their gradients are swamped by road and sky, and the
    student stops predicting them. Here a running (EMA) estimate f_c of each class's share among the kept
    pseudo-labels gives weight ``w_c = f_c ** -power``, scaled so that the mean weight over kept pixels is 1
    (``sum_c f_c w_c = 1``) and clipped at ``max_weight``.

    Args:
        num_classes: K.
        power: 0 = no reweighting, 0.5 = inverse square root of the frequency, 1 = inverse frequency.
        momentum: EMA momentum of f across steps, in [0, 1).
        max_weight: upper bound of any class weight (after scaling), > 0.
    """

    def __init__(self, num_classes: int, power: float = 0.5, momentum: float = 0.99, max_weight: float = 10.0):
        self.num_classes, self.power, self.momentum, self.max_weight = num_classes, power, momentum, max_weight
        self.freq: Optional[torch.Tensor] = None

    def update(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Add a batch of (B, H, W) int64 pseudo-labels (``ignore_index`` = rejected); returns the (K,) weights."""
        valid = labels != ignore_index
        counts = torch.bincount(labels[valid].reshape(-1), minlength=self.num_classes).float()
        counts = all_reduce_sum(counts.double()).float()  # data-parallel runs: every rank's labels (else a no-op)
        f = counts / counts.sum().clamp_min(1.0)
        self.freq = f if self.freq is None else self.momentum * self.freq.to(f.device) + (1 - self.momentum) * f
        return self.class_weights()

    def class_weights(self) -> torch.Tensor:
        """(K,) float weights; all ones before the first update."""
        if self.freq is None:
            return torch.ones(self.num_classes)
        f = self.freq.clamp_min(1e-6)
        w = f.pow(-self.power)
        w = w / (self.freq * w).sum().clamp_min(1e-12)
        return w.clamp(max=self.max_weight)

    def pixel_weights(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """(B, H, W) float weights for (B, H, W) pseudo-labels: the class weight, 0 where ``ignore_index``."""
        w = self.class_weights().to(labels.device)
        valid = labels != ignore_index
        return torch.where(valid, w[labels.clamp(0, self.num_classes - 1)], torch.zeros((), device=labels.device))

    def state_dict(self) -> dict:
        return {"freq": None if self.freq is None else self.freq.cpu()}

    def load_state_dict(self, d: dict) -> None:
        self.freq = d["freq"]


PSEUDO_LABEL_RULES = ("cbst", "argmax")


def pseudo_label(probs: torch.Tensor, thresholds: torch.Tensor | float, ignore_index: int, rule: str = "argmax",
                 valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels with a confidence mask.

    Rules (``lambda_c`` = the threshold of class c):

    * ``"argmax"``: label = argmax_c p_c, kept where p_label >= lambda_label.
    * ``"cbst"``: CBST's class-normalised rule (Zou et al., ECCV 2018, sec. 4.2):
      label = argmax_c p_c / lambda_c, kept where max_c p_c / lambda_c >= 1. A pixel whose rare class is confident
      relative to that class's (low) threshold takes the rare class even when a common class has the larger p.
      With a scalar threshold both rules give the same labels and mask.

    Args:
        probs: (B, K, H, W) probabilities.
        thresholds: scalar or (K,) per-class confidence thresholds, in [0, 1] (clamped to >= 1e-6 by ``"cbst"``).
        ignore_index: label written where the mask is False.
        rule: ``"cbst"`` or ``"argmax"``.
        valid: (B, H, W) bool, False on crop padding: never labelled (mask False); None = all pixels are real.

    Returns:
        labels (B, H, W) int64 (``ignore_index`` where rejected), mask (B, H, W) bool, confidence (B, H, W) float
        (p of the chosen label).

    Raises:
        ValueError: unknown ``rule``.
    """
    if rule == "argmax":
        conf, lab = probs.max(1)
        th = thresholds[lab] if torch.is_tensor(thresholds) and thresholds.ndim == 1 else thresholds
        mask = conf >= th
    elif rule == "cbst":
        lam = thresholds.view(1, -1, 1, 1) if torch.is_tensor(thresholds) and thresholds.ndim == 1 else thresholds
        lam = lam.clamp_min(1e-6) if torch.is_tensor(lam) else max(float(lam), 1e-6)
        score, lab = (probs / lam).max(1)
        mask = score >= 1.0
        conf = probs.gather(1, lab[:, None])[:, 0]
    else:
        raise ValueError(f"pseudo-label rule must be one of {PSEUDO_LABEL_RULES}, got {rule!r}")
    if valid is not None:
        mask = mask & valid
    return torch.where(mask, lab, torch.full_like(lab, ignore_index)), mask, conf


def kept_fraction(step: int, fraction: float, start: float = 0.0, ramp_steps: int = 0) -> float:
    """The CBST kept share at ``step`` under a linear curriculum (CBST, Zou et al., ECCV 2018, sec. 4.2, grows the
    kept portion p from 20 % by 5 % per self-training round; the linear ramp over steps is our design, see
    docs/method-notes.md, CBST).

    Args:
        step: 0-based training step.
        fraction: the final share, in (0, 1].
        start: the share at step 0, in [0, 1]; 0 = no curriculum (``fraction`` throughout).
        ramp_steps: steps from ``start`` to ``fraction``; 0 = no curriculum.

    Returns:
        the share in [min(start, fraction), max(start, fraction)].
    """
    if start <= 0 or ramp_steps <= 0:
        return fraction
    return start + (fraction - start) * min(1.0, step / ramp_steps)


def fuse_dual_head(p_rgb: torch.Tensor, p_rgbd: torch.Tensor, require_agreement: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CrossMatch dual-head pseudo-label denoising (Yin et al., ICCV 2023; this fusion rule is our design, not the
    paper's: see docs/method-notes.md, CrossMatch): average the RGB and RGB-D teachers' softmax; optionally keep
    only pixels where both heads' argmax agree.

    Args:
        p_rgb, p_rgbd: (B, K, H, W) probabilities of the two teachers.

    Returns:
        fused probabilities (B, K, H, W) and an agreement mask (B, H, W) bool (all True without the requirement).
    """
    fused = 0.5 * (p_rgb + p_rgbd)
    agree = p_rgb.argmax(1) == p_rgbd.argmax(1) if require_agreement else torch.ones_like(fused[:, 0], dtype=torch.bool)
    return fused, agree


def coverage_per_class(labels: torch.Tensor, num_classes: int, ignore_index: int,
                       valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of the real pixels carrying each class's pseudo-label: (K,) float; 1 - sum = rejected share.

    ``labels``: (B, H, W) int64; ``valid``: (B, H, W) bool, False on crop padding (not counted); None = all real.
    """
    labelled = labels != ignore_index
    counts = torch.bincount(labels[labelled].reshape(-1), minlength=num_classes).float()
    n = labels.numel() if valid is None else int(valid.sum())
    return counts / max(1, n)


def kept_share(mask: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """Share of the real pixels that carry a pseudo-label: (B, H, W) bool ``mask`` and ``valid`` (None = all real)."""
    if valid is None:
        return float(mask.float().mean())
    return float((mask & valid).sum()) / max(1, int(valid.sum()))
