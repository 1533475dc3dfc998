"""Typed configuration of the adaptation methods, one dataclass each (no torch).

Each section is a field of :class:`~segadapt.adapt.config.AdaptConfig` and a flag group of ``segadapt adapt``
(``--depth.*``, ``--rectifier.*``, ``--seco.*``, ``--rccr.*``, ``--bida.*``). The implementations are the
components in :mod:`segadapt.adapt.methods`. Where a setting is not fixed by the paper, or departs from it, its
help points to the method notes (docs/method-notes.md), which give the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from segadapt.adapt.typed_config import (Bounds, Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Size,
                                         check_size)

__all__ = ["BiDAConfig", "DepthConfig", "RCCRConfig", "RectifierConfig", "SecoConfig"]

Momentum = Annotated[float, Bounds(0, 1, hi_open=True)]


@dataclass
class DepthConfig:
    """CrossMatch's RGB-D auxiliary stream (Yin et al., ICCV 2023), training only: a copy of the source model with a
    depth input (zero weights at the start) learns the fused pseudo-labels, its EMA teacher joins the RGB teacher in
    dual-head pseudo-label denoising, and each stream learns the other's weak-view pseudo-labels (cross-modal
    consistency). Off unless a depth provider is given; the exported model stays RGB only. The depth input's
    initialisation and learning rate, the validity channel and the RGB-D teacher's momentum are this project's
    (see docs/method-notes.md, CrossMatch)."""

    provider: Literal["none", "files", "stereo", "model"] = "none"
    """depth source: none, files (maps beside the images), stereo (OpenCV SGBM on the right views), model (a local
    depth-estimation model)"""
    directory: str = ""
    """files: folder of depth/disparity maps named like the images"""
    right_dir: str = ""
    """stereo: folder of right views named like the (left) images"""
    model_dir: str = ""
    """model: local transformers depth-estimation directory (from_pretrained, no download)"""
    file_kind: Literal["disparity", "depth"] = "disparity"
    """files: what the maps hold, disparity in pixels or depth"""
    png_scale: PositiveFloat = 256.0
    """files: 16-bit PNG value per unit (KITTI: 256 per pixel of disparity)"""
    focal_px: PositiveFloat = 721.5
    """stereo/files disparity: focal length in pixels"""
    baseline_m: PositiveFloat = 0.54
    """stereo/files disparity: stereo baseline in metres"""
    require_agreement: bool = True
    """dual-head denoising: keep only pixels where the RGB and RGB-D teachers' argmax agree"""
    cross_modal_weight: NonNegFloat = 1.0
    """weight of the cross-modal consistency loss (each stream toward the other's weak-view pseudo-label)"""
    teacher_alpha: Momentum = 0.99
    """EMA momentum of the RGB-D teacher, in [0, 1); lower than the RGB teacher's so that what the RGB-D student
    learns from depth reaches the dual-head pseudo-labels within a short run (see docs/method-notes.md,
    CrossMatch)"""
    input_lr: PositiveFloat = 1e-3
    """learning rate of the RGB-D stem's depth-input weights (their own AdamW group, no weight decay); they start
    at zero (see docs/method-notes.md, CrossMatch)"""
    validity_channel: bool = True
    """feed a depth-validity channel (1 = depth known, 0 = missing) next to depth, so that missing depth is not
    read as infinitely far (see docs/method-notes.md, CrossMatch)"""
    cache_dir: str = ""
    """folder of per-frame depth (.npz), computed once before training and reused by later runs; empty =
    <out>/depth_cache"""

    def check(self) -> None:
        need = {"files": ("directory", self.directory), "stereo": ("right_dir", self.right_dir),
                "model": ("model_dir", self.model_dir)}.get(self.provider)
        if need and not need[1]:
            raise ValueError(f"--depth.provider {self.provider} needs --depth.{need[0].replace('_', '-')}")


@dataclass
class RectifierConfig:
    """Per-pixel reliability r of the pseudo-labels, used in the rectification-aware mixture loss
    ``-log(r p(y|x) + (1 - r) / K)`` of IR2F (Gong et al., CVPR 2023). By default r is a confidence prior alone:
    per pixel, the mean of the EMA teacher's and the frozen anchor's (the source model after AdaBN) probability of
    the pseudo-label the student trains on. ``inr`` adds IR2F's learned part: an implicit neural head (LIIF-style)
    on the teacher's features that corrects the prior, ``r = sigmoid(logit(prior) + INR output)``, trained by BCE
    toward an observable agreement target (the enabled targets AND-ed; with depth, the RGB and RGB-D teachers'
    agreement joins). Without ``inr`` only ``enabled``, ``prior`` and ``warmup_steps`` act. The loss form and the
    prior are reconstructions (see docs/method-notes.md, IR2F)."""

    enabled: bool = True
    """train with the rectification-aware mixture loss weighted by r; false = plain weighted cross-entropy"""
    prior: Literal["teacher_anchor", "teacher", "none"] = "teacher_anchor"
    """r's prior: the mean of the teacher's and the anchor's probability of the label, the teacher's alone, or none
    (needs --rectifier.inr: r is then the implicit head's output alone)"""
    warmup_steps: NonNegInt = 50
    """steps before r enters the mixture loss (plain weighted cross-entropy until then)"""
    inr: bool = False
    """learn IR2F's implicit head (INR) that corrects the prior (the options below act only with it)"""
    latent_dim: PositiveInt = 64
    """INR: channels of the latent grid the implicit head reads"""
    hidden: PositiveInt = 128
    """INR: hidden width of the implicit head's MLP"""
    layers: PositiveInt = 3
    """INR: MLP layers of the implicit head"""
    query_stride: PositiveInt = 2
    """INR: r is predicted on a grid this many times coarser than the crop, then upsampled"""
    lr: PositiveFloat = 1e-3
    """INR: learning rate of the implicit head (AdamW)"""
    loss_weight: NonNegFloat = 1.0
    """INR: weight of the implicit head's BCE loss"""
    anchor_consistency: bool = True
    """INR target: the anchor agrees with the pseudo-label; the anchor's probabilities join the latent grid"""
    flip_consistency: bool = False
    """INR target: the teacher's label is stable under a horizontal flip of the weak view"""
    photometric_consistency: bool = False
    """INR target: the teacher's label is stable under the strong view's colour jitter and blur (one more teacher
    pass)"""
    features: Literal["decoder", "stride4", "stride8"] = "decoder"
    """INR latent grid: the decoder features at the model's output stride, or those upsampled to the backbone's
    stride-4/8 grid and concatenated with its features there (boundary detail)"""
    view_consensus: bool = False
    """INR target: the pseudo-label equals the argmax of the teacher's mean probability over views the head never
    sees (an upscaled view and a flipped photometric view; extra teacher passes, no gradients)"""
    view_scale: Annotated[float, Bounds(0)] = 1.5
    """view consensus: scale factor of the upscaled view; 0 = no scaled view"""
    view_flip_photometric: bool = True
    """view consensus: include the flipped view with the strong view's colour jitter and blur"""

    def check(self) -> None:
        if self.enabled and not self.inr and self.prior == "none":
            raise ValueError("--rectifier.inr false needs --rectifier.prior teacher or teacher_anchor")


@dataclass
class SecoConfig:
    """SeCo (Zhao et al., "Connectivity-Driven Pseudo-Labeling Makes Stronger Cross-Domain Segmenters", NeurIPS
    2024) as an offline pseudo-label pass before self-training: the source model after AdaBN labels each target
    frame (class-wise top fraction), Pixel Semantic Aggregation grows the labels over regions (SAM from a local
    directory, or superpixels when no SAM is given), Semantic Connectivity Correction drops or relabels the
    connected components a briefly trained classifier finds noisy (median-loss rule), and the labels join the
    online pseudo-labels (``merge``). The labels are written to ``<out>/seco_labels/`` and reused when nothing
    changed. The initial pixel fraction, the superpixel regions and their thing rule, the small SCC classifier and
    its crop size, the merge modes and ``keep_things`` are this project's (see docs/method-notes.md, SeCo)."""

    enabled: bool = False
    """run the SeCo pass before self-training and train on its labels too"""
    pixel_fraction: Fraction = 0.5
    """initial pixel pseudo-labels: share of each class's predicted pixels kept, most confident first (see
    docs/method-notes.md, SeCo)"""
    sam_dir: str = ""
    """local transformers SAM directory (SamModel + SamProcessor, from_pretrained, no download); empty = superpixels"""
    superpixels: Literal["slic", "felzenszwalb"] = "slic"
    """region source without SAM: SLIC or Felzenszwalb superpixels (scikit-image)"""
    slic_segments: PositiveInt = 150
    """SLIC: approximate number of superpixels per frame"""
    slic_compactness: PositiveFloat = 10.0
    """SLIC: colour vs space trade-off (higher = more compact)"""
    felzenszwalb_scale: PositiveFloat = 100.0
    """Felzenszwalb: scale (higher = larger regions)"""
    purity: Fraction = 0.2
    """stuff: a region takes the stuff class holding more than this share of its labelled pixels (SeCo: 0.2)"""
    thing_purity: Fraction = 0.5
    """superpixels only: a region takes a thing class holding more than this share of its labelled pixels (see
    docs/method-notes.md, SeCo)"""
    keep_things: bool = True
    """a pixel whose initial label is a thing class keeps it when a stuff region is painted over it, so that regions
    do not absorb thin objects such as poles and signs (see docs/method-notes.md, SeCo)"""
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
    """SCC: training iterations of the connectivity classifier (short: the drop rule reads early-training
    losses)"""
    scc_batch: PositiveInt = 32
    """SCC: components per training batch"""
    scc_crop: Size = (64, 128)
    """SCC: H W of the component crops (SeCo: 256 512)"""
    scc_lr: PositiveFloat = 0.01
    """SCC: SGD learning rate, decayed by (1 + 10 p) ** -0.75 over the progress p in [0, 1], as in SeCo"""
    scc_smoothing: Fraction = 0.1
    """SCC: label smoothing of the classifier's targets (SeCo: 0.1)"""
    scc_rule: Literal["both_loss", "class_median"] = "both_loss"
    """SCC drop rule: both_loss (SeCo's code: loss above the predicted class's median and above the mean of those
    medians) or class_median (loss above the median of the components with the same PSA class)"""
    scc_relabel: bool = True
    """SCC: kept components take the classifier's predicted class (SeCo), else they keep their PSA class"""
    merge: Literal["fill", "agree", "replace"] = "fill"
    """how SeCo's labels join the online ones: fill = SeCo's label where the online label is dropped; agree = only
    pixels where both agree; replace = SeCo's labels alone"""
    fill_weight: NonNegFloat = 1.0
    """loss weight of the pixels labelled by SeCo alone (fill, replace), before the class-frequency weights"""

    def check(self) -> None:
        check_size(self.scc_crop, "--seco.scc-crop")
        if self.sam_dir and not Path(self.sam_dir).is_dir():
            raise ValueError(f"--seco.sam-dir: {self.sam_dir}: no such directory (a local transformers SAM directory)")


@dataclass
class RCCRConfig:
    """RCCR region-wise contrastive consistency (Zhou et al., ICME 2022): student embeddings (a projection head on
    the decoder features) are pulled toward the teacher's embedding of the same location of the un-augmented frame
    and pushed from memory-bank entries of other classes (InfoNCE). The teacher's projection head is the EMA of the
    student's at the teacher's momentum (the paper's code: one EMA teacher for the whole model). Source-free form:
    the strong view's target-to-target ClassMix takes the place of the paper's CutMix box, and every pixel can be
    an anchor (see docs/method-notes.md, RCCR). With ``--source-data`` (UDA mode) the paper's form runs: a source
    crop with a target box."""

    enabled: bool = False
    """add the RCCR region contrastive loss (a projection head on the student, its EMA copy on the teacher)"""
    weight: NonNegFloat = 0.1
    """loss weight at the end of the ramp (RCCR's code: 0.01 over 40k SGD iterations; see docs/method-notes.md,
    RCCR)"""
    ramp: bool = True
    """ramp the weight as w * exp(-5 (1 - sqrt(step / steps))) (RCCR's code); false = constant w"""
    temperature: PositiveFloat = 0.1
    """InfoNCE temperature (RCCR's code: 0.1)"""
    confidence: Fraction = 0.75
    """anchors only where the teacher's max softmax exceeds this (RCCR's code: 0.75)"""
    proj_dim: PositiveInt = 128
    """output channels of the projection head (L2-normalised; RCCR's code: 128)"""
    proj_hidden: NonNegInt = 0
    """hidden channels of the projection head; 0 = the decoder's feature channels (RCCR's code: 2048 -> 2048 ->
    128)"""
    bank_size: PositiveInt = 4096
    """entries of the FIFO memory bank of detached embeddings (RCCR's code: 3 iterations x 8000 = 24000; smaller
    here for smaller feature maps, see docs/method-notes.md, RCCR)"""
    bank_samples: PositiveInt = 512
    """embeddings pushed to the bank per step from the student and from the teacher each (RCCR's code: 4000
    each)"""
    anchors: Literal["all", "pasted"] = "all"
    """which student pixels are anchors: all (both mixed images are target frames) or only the ClassMix-pasted
    region, the analogue of RCCR's box (see docs/method-notes.md, RCCR)"""
    max_anchors: PositiveInt = 4096
    """at most this many anchors per step (a random subset), to bound memory"""


@dataclass
class BiDAConfig:
    """BiDA bi-directional pixel-prototype contrast (Lee et al., ECCV 2022), built from the paper's text (see
    docs/method-notes.md, BiDA): target pixel embeddings are pulled toward the source prototype of their
    pseudo-label, source embeddings toward the target prototypes; a class-wise calibration bias moves the source
    prototypes toward the target, and the nearest calibrated prototype (label transfer) vetoes pseudo-labels it
    disagrees with. Source-free form: the source side is the source model's confident decoder features on target
    frames before adaptation (or its classifier weights). With ``--source-data`` (UDA mode) the source prototypes
    are EMAs of the teacher's embeddings of labelled source frames, as in the paper. The teacher's projection head
    follows the student's at the teacher's momentum."""

    enabled: bool = False
    """add the BiDA prototype contrast (a projection head on the student, its EMA copy on the teacher)"""
    weight: NonNegFloat = 0.1
    """loss weight lambda (the paper's text: 0.1-1; its code: 0.1-0.2)"""
    reverse_weight: NonNegFloat = 1.0
    """weight of the source -> target-prototype direction relative to target pixels -> source prototypes"""
    temperature: PositiveFloat = 0.1
    """temperature of the prototype logits (BiDA's code: cosine x 10, i.e. 0.1)"""
    source_prototypes: Literal["features", "classifier"] = "features"
    """source side: the source model's confident decoder features on target frames before adaptation, or its
    classifier's weight rows scaled to the features' mean norm (see docs/method-notes.md, BiDA)"""
    source_frames: PositiveInt = 64
    """target frames the source model sees to build the source side"""
    source_confidence: Fraction = 0.9
    """features: keep source-model pixels whose max softmax reaches this"""
    source_per_class: PositiveInt = 64
    """features: at most this many stored source features per class (random subset)"""
    proj_dim: PositiveInt = 128
    """output channels of the projection head (L2-normalised)"""
    proj_hidden: NonNegInt = 0
    """hidden channels of the projection head; 0 = the decoder's feature channels"""
    proto_momentum: Momentum = 0.9
    """EMA momentum of the prototypes, in [0, 1) (the paper's text: 0.9-0.99)"""
    calibration_momentum: Momentum = 0.99
    """EMA momentum m of the calibration bias: b <- m b + (1 - m) (target mean - source prototype) (see
    docs/method-notes.md, BiDA)"""
    vote: bool = True
    """label transfer: drop pseudo-label pixels whose nearest calibrated source prototype names another class"""
    vote_start: NonNegInt = 0
    """steps before the label-transfer vote applies"""
