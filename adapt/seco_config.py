"""Typed configuration of SeCo's offline pseudo-label pass in ``segadapt adapt`` (no torch); the implementation is
:mod:`segadapt.adapt.seco` (methods.md 3). Off by default; off, the loop computes exactly what it computes without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from segadapt.adapt.typed_config import Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Size, check_size

__all__ = ["SecoConfig"]


@dataclass
class SecoConfig:
    """SeCo (Zhao et al., arXiv 2312.06331; methods.md 3) as an offline, source-free pseudo-label pass before
    self-training: the source model after AdaBN labels each target frame (class-wise top fraction, CBST-style),
    Pixel Semantic Aggregation grows the labels over regions (SAM from a local directory, or superpixels when no SAM is
    given), Semantic Connectivity Correction drops or relabels the connected components a briefly trained classifier
    finds noisy (median-loss rule), and the labels join the online pseudo-labels (``merge``). [RECON] parts, all
    configurable: the initial pixel fraction, the superpixel region source and its thing rule, the small SCC
    classifier and its crop size, the merge modes. Written to ``<out>/seco_labels/`` and reused when nothing changed.
    Measured against the full method at today's defaults (docs/benchmarks.md "Session 14"; superpixels, 150 steps,
    3 seeds): -0.25 mIoU on dusk, -0.35 on KITTI (it lifts Building/Tree/Car and loses the thin classes); off by
    default."""

    enabled: bool = False
    """run the SeCo pass before self-training and train on its labels too"""
    pixel_fraction: Fraction = 0.5
    """initial pixel pseudo-labels: share of each class's predicted pixels kept, most confident first [RECON]"""
    sam_dir: str = ""
    """local transformers SAM directory (SamModel + SamProcessor, from_pretrained, no download); empty = superpixels"""
    superpixels: Literal["slic", "felzenszwalb"] = "slic"
    """region source without SAM (scikit-image)"""
    slic_segments: PositiveInt = 150
    """SLIC: approximate number of superpixels per frame"""
    slic_compactness: PositiveFloat = 10.0
    """SLIC: colour vs space trade-off (higher = more compact)"""
    felzenszwalb_scale: PositiveFloat = 100.0
    """Felzenszwalb: scale (higher = larger regions)"""
    purity: Fraction = 0.2
    """stuff: a region takes the stuff class holding more than this share of its labelled pixels (SeCo: 0.20)"""
    thing_purity: Fraction = 0.5
    """superpixels only: a region takes a thing class holding more than this share of its labelled pixels [RECON]"""
    thing_min_pixels: NonNegInt = 10
    """things: classes and components with fewer labelled pixels get no SAM prompt (SeCo: 10)"""
    sam_points_per_side: PositiveInt = 16
    """SAM automatic masks for stuff: prompt grid of N x N points (SeCo: 32)"""
    sam_iou_threshold: Fraction = 0.88
    """SAM automatic masks: keep masks whose predicted IoU exceeds this (SAM's default)"""
    sam_stability_threshold: Fraction = 0.95
    """SAM automatic masks: keep masks whose stability score exceeds this (SAM's default)"""
    scc: bool = True
    """Semantic Connectivity Correction after PSA"""
    scc_iterations: PositiveInt = 300
    """SCC: training iterations of the connectivity classifier (stopped early: early-loss statistics)"""
    scc_batch: PositiveInt = 32
    """SCC: components per training batch"""
    scc_crop: Size = (64, 128)
    """SCC: H W of the component crops (SeCo: 256 512)"""
    scc_lr: PositiveFloat = 0.01
    """SCC: SGD learning rate, decayed by (1 + 10 p) ** -0.75 as in SeCo"""
    scc_smoothing: Fraction = 0.1
    """SCC: label smoothing of the classifier's targets (SeCo: 0.1)"""
    scc_rule: Literal["both_loss", "class_median"] = "both_loss"
    """SCC drop rule: both_loss (SeCo's code: loss above the predicted class's median and above the mean of those
    medians) or class_median (loss above the median of the components with the same PSA class)"""
    scc_relabel: bool = True
    """SCC: kept components take the classifier's predicted class (SeCo), else they keep their PSA class"""
    merge: Literal["fill", "agree", "replace"] = "fill"
    """fill: SeCo label where the online label is ignore; agree: only pixels where both agree; replace: SeCo only"""
    fill_weight: NonNegFloat = 1.0
    """loss weight of the pixels labelled by SeCo alone (fill, replace)"""

    def check(self) -> None:
        check_size(self.scc_crop, "--seco.scc-crop")
        if self.sam_dir and not Path(self.sam_dir).is_dir():
            raise ValueError(f"--seco.sam-dir: {self.sam_dir}: no such directory (a local transformers SAM directory)")
