"""Typed configuration of the optional loss components of ``segadapt adapt`` (no torch): RCCR and BiDA in their
source-free form (methods.md 2 and 4.3). Both are off by default; with both off the loop computes exactly what it
computes without them. The implementations are :mod:`segadapt.adapt.rccr` and :mod:`segadapt.adapt.bida`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from segadapt.adapt.typed_config import Bounds, Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt

__all__ = ["BiDAConfig", "RCCRConfig"]

Momentum = Annotated[float, Bounds(0, 1, hi_open=True)]


@dataclass
class RCCRConfig:
    """RCCR region-wise contrastive consistency (Zhou et al., ICME 2022; methods.md 2.2), source-free form.

    [CODE] defaults: temperature 0.1, confidence gate 0.75, loss weight 0.01 with the ramp
    ``w * exp(-5 (1 - sqrt(t / T)))``, projection 128-d, momentum (EMA) projection head on the teacher. [RECON]:
    the CutMix box is replaced by the loop's target-to-target ClassMix (positives are the un-augmented teacher
    features at the same location of the image each pixel came from), the bank size and samples per step are scaled
    down to our small feature maps, and every pixel can be an anchor (both images are target). With ``--source-data``
    (UDA mode) the paper's form runs instead: a source crop with a target box, one more student pass
    (:mod:`segadapt.adapt.rccr`); ``anchors`` then does not apply. Measured against the full method at today's
    defaults (docs/benchmarks.md "Session 14"; 150 steps, 3 seeds): +0.00 on dusk, -0.15 on KITTI; off by default."""

    enabled: bool = False
    """add the RCCR region contrastive loss (a projection head on the student, its EMA copy on the teacher)"""
    weight: NonNegFloat = 0.01
    """loss weight at the end of the ramp (RCCR code: 0.01)"""
    ramp: bool = True
    """ramp the weight as w * exp(-5 (1 - sqrt(step / steps))) (RCCR code); false = constant w"""
    temperature: PositiveFloat = 0.1
    """InfoNCE temperature (RCCR code: 0.1)"""
    confidence: Fraction = 0.75
    """anchors only where the teacher's max softmax exceeds this (RCCR code: 0.75)"""
    proj_dim: PositiveInt = 128
    """output channels of the projection head (L2-normalised; RCCR code: 128)"""
    proj_hidden: NonNegInt = 0
    """hidden channels of the projection head; 0 = the decoder's feature channels (RCCR code: 2048 -> 2048 -> 128)"""
    momentum: Momentum = 0.99
    """EMA momentum of the teacher's projection head (RCCR code: the teacher's 0.99)"""
    bank_size: PositiveInt = 4096
    """FIFO memory bank of detached embeddings (RCCR code: 3 iterations x 8000 = 24000) [RECON: scaled down]"""
    bank_samples: PositiveInt = 512
    """embeddings pushed per step from the student and from the teacher each (RCCR code: 4000 each) [RECON]"""
    anchors: Literal["all", "pasted"] = "all"
    """which student pixels are anchors: all (both mixed images are target) or only the ClassMix-pasted region (the
    analogue of RCCR's box) [RECON]"""
    max_anchors: PositiveInt = 4096
    """at most this many anchors per step (a random subset) to bound memory"""


@dataclass
class BiDAConfig:
    """BiDA bi-directional pixel-prototype contrast (Lee et al., ECCV 2022; methods.md 4.3 [RECON]), source-free
    form: source prototypes come from the source model (its confident decoder features on the target before
    adaptation, or its classifier weights), target prototypes are EMAs of the teacher's embeddings under its
    pseudo-labels, a class-wise calibration bias moves the source prototypes toward the target, and the nearest
    calibrated prototype (label transfer) vetoes pseudo-labels it disagrees with.

    ``source_prototypes`` measured once at step 0 (benchmarks/bida_label_transfer.py: the quick pipeline's seed-0
    source model after AdaBN, the 62 CamVid dusk target_adapt frames at 120x160, labels only to measure, 3 head
    seeds): label-transfer accuracy 0.67-0.70 with features (316 source samples, from the classes the source model is
    confident on) vs 0.66-0.69 with the classifier, the teacher's argmax 0.709. The vote dropped 0.3 % (features) and
    0.05-0.9 % (classifier) of the confidence >= 0.9 pseudo-labels; those were right 57-63 % (features) vs 77-98 %
    (classifier) of the time, the kept ones 88 %. After adaptation (docs/benchmarks.md, session 11's model, 150
    steps, 3 seeds): classifier prototypes -1.64 mIoU against features on dusk (session 12, lr 6e-5), so features
    stay the default; BiDA against the full method at today's defaults -0.24 on dusk, +0.26 on KITTI, and without
    the vote -0.23 / -0.21 (session 14): within the seed spread, so it is off by default. The vote is worth +0.47
    on KITTI (+0.82, +0.13, +0.46) and nothing on dusk (-0.01).

    With ``--source-data`` (UDA mode) the source prototypes are EMAs (``proto_momentum``) of the teacher's source
    features under the source labels, as in the paper (:mod:`segadapt.adapt.bida`); ``source_prototypes``,
    ``source_frames``, ``source_confidence`` and ``source_per_class`` then do not apply."""

    enabled: bool = False
    """add the BiDA prototype contrast (a projection head on the student, its EMA copy on the teacher)"""
    weight: NonNegFloat = 0.1
    """loss weight lambda (methods.md 4.3: 0.1-1; DASS code 0.1-0.2)"""
    reverse_weight: NonNegFloat = 1.0
    """weight of the source -> target-prototype direction relative to target pixels -> source prototypes"""
    temperature: PositiveFloat = 0.1
    """temperature of the prototype logits (DASS code: cosine x 10)"""
    source_prototypes: Literal["features", "classifier"] = "features"
    """source side: the source model's confident decoder features on target frames before adaptation, or its
    classifier's weight rows (scaled to the features' mean norm) [RECON]"""
    source_frames: PositiveInt = 64
    """target frames the source model sees to build the source side"""
    source_confidence: Fraction = 0.9
    """features: keep source-model pixels whose max softmax reaches this"""
    source_per_class: PositiveInt = 64
    """features: at most this many stored source features per class (random subset)"""
    proj_dim: PositiveInt = 128
    """output channels of the projection head (L2-normalised; methods.md 4.3: 256)"""
    proj_hidden: NonNegInt = 0
    """hidden channels of the projection head; 0 = the decoder's feature channels"""
    momentum: Momentum = 0.99
    """EMA momentum of the teacher's projection head"""
    proto_momentum: Momentum = 0.9
    """EMA momentum of the target prototypes (methods.md 4.3: 0.9-0.99)"""
    calibration_momentum: Momentum = 0.99
    """EMA momentum m of the calibration bias b <- m b + (1 - m)(target mean - source prototype) [RECON]"""
    vote: bool = True
    """label transfer: drop pseudo-label pixels whose nearest calibrated source prototype names another class"""
    vote_start: NonNegInt = 0
    """steps before the label-transfer vote is applied"""
