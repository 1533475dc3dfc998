"""Typed configuration dataclasses of source training and adaptation (no torch).

Each field is documented by the string under it; the command line (``segadapt.cli_args``) turns every field into a
flag with that text as its help, ``Literal`` fields into choices and ``Annotated[.., Bounds]`` fields into checked
ranges (see :mod:`segadapt.adapt.typed_config`). ``from_dict`` reads (partial) JSON configs and the configs saved
with runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Tuple

from segadapt.adapt.typed_config import (Bounds, Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Size,
                                         check_config, check_size, from_dict, hints, to_dict)
from segadapt.adapt.methods.config import (BiDAConfig, DepthConfig, RCCRConfig, RectifierConfig,  # noqa: F401
                                           SecoConfig)  # re-exported: the adaptation config's sections

__all__ = ["AdaptConfig", "DepthConfig", "ModelConfig", "MonitorConfig", "PhotometricConfig", "PseudoLabelConfig",
           "RectifierConfig", "SourceTrainConfig", "TeacherConfig", "check_config", "check_device",
           "default_camvid_dir", "default_data_root", "from_dict", "hints", "parse_size", "to_dict", "SOURCE_FREE_LR",
           "UDA_LR"]

DEFAULT_DATA_ENV = "SEGADAPT_DATA"
#: adaptation learning rates by mode (--lr 0), measured on CamVid dusk and KITTI over 3 seeds (docs/results.md)
SOURCE_FREE_LR = 2e-5
UDA_LR = 6e-5
Device = str  # "auto", "cpu", "cuda", "cuda:1", ...
Scale = Annotated[Tuple[float, float], Bounds(0, lo_open=True)]


def default_data_root() -> str:
    """The data directory: ``$SEGADAPT_DATA`` if set, else ``../shared/data`` next to the checkout, else ``data``."""
    env = os.environ.get(DEFAULT_DATA_ENV)
    if env:
        return env
    here = Path(__file__).resolve().parents[1]
    cand = here.parent / "shared" / "data"
    return str(cand) if cand.is_dir() else "data"


def default_camvid_dir() -> str:
    """``<data root>/camvid-day2dusk`` (see :func:`default_data_root`)."""
    return str(Path(default_data_root()) / "camvid-day2dusk")


def parse_size(s: Any) -> Tuple[int, int]:
    """Parse ``(H, W)`` from a pair or a ``HxW`` string."""
    if isinstance(s, str):
        h, w = s.lower().split("x")
        return int(h), int(w)
    h, w = s
    return int(h), int(w)


def _check_range(lo_hi: Tuple[float, float], flag: str) -> None:
    if lo_hi[0] > lo_hi[1]:
        raise ValueError(f"{flag}: the first value (min) must not exceed the second (max), got {lo_hi}")


def check_device(device: str, flag: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked up front; torch would only fail once it runs).

    Raises:
        ValueError: naming ``flag``.
    """
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"{flag}: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


@dataclass
class PhotometricConfig:
    """Strengths of the photometric augmentation (image only); 0 disables a component."""

    brightness: Fraction = 0.3
    """brightness factor drawn from [1 - s, 1 + s]"""
    contrast: Fraction = 0.3
    """contrast factor drawn from [1 - s, 1 + s]"""
    saturation: Fraction = 0.3
    """saturation factor drawn from [1 - s, 1 + s]"""
    hue: Annotated[float, Bounds(0, 0.5)] = 0.05
    """hue rotation drawn from [-hue, hue], in full turns"""
    gamma: Fraction = 0.3
    """gamma exponent drawn from [1 - g, 1 + g]"""
    jitter_p: Fraction = 0.8
    """probability of colour jitter + gamma for a sample"""
    blur_p: Fraction = 0.3
    """probability of a Gaussian blur for a sample"""
    blur_sigma_min: NonNegFloat = 0.15
    """smallest blur sigma, pixels"""
    blur_sigma_max: NonNegFloat = 1.15
    """largest blur sigma, pixels"""

    def check(self) -> None:
        _check_range((self.blur_sigma_min, self.blur_sigma_max), "--blur-sigma-min/--blur-sigma-max")


@dataclass
class ModelConfig:
    """Which segmenter to build: DeepLabV3 (Chen et al., 2017) on a MobileNetV2 backbone (Sandler et al., CVPR
    2018), or SegFormer (Xie et al., NeurIPS 2021) from the transformers library."""

    arch: Literal["deeplabv3-mobilenetv2", "segformer"] = "deeplabv3-mobilenetv2"
    """segmenter: MobileNetV2 with a DeepLabV3 head, or SegFormer (transformers classes)"""
    variant: str = ""
    """SegFormer size b0..b5, or the MobileNetV2 depth multiplier (1.0, 0.75, 0.5...); empty = b0 / 1.0"""
    pretrained: str = ""
    """initial weights: a local transformers directory (from_pretrained, no download) or a segadapt checkpoint;
    empty = random initialisation"""
    output_stride: Literal[8, 16, 32] = 16
    """MobileNetV2 only: the backbone's total stride; 16 and 8 dilate the last stages instead of striding (finer
    features, slower training)"""
    dropout: Fraction = 0.1
    """dropout probability before the classifier"""


@dataclass
class SourceTrainConfig:
    """Supervised training of the source model on labelled frames (``segadapt train-source``). Sizes are (H, W) in
    pixels; validation metrics are computed at the label's own resolution."""

    data: str = field(default_factory=default_camvid_dir)
    """data root holding the train/val split folders (<split>/images, <split>/labels) and classes.json"""
    train_split: str = "source_train"
    """training split folder under --data"""
    val_split: str = "source_val"
    """validation split folder under --data (model selection); empty = no validation"""
    out: str = "runs/source"
    """run directory (checkpoints best/ and last/, history)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    size: Size = (360, 480)
    """H W the frames are resized to before the random scale and crop; also the validation inference size"""
    crop: Size = (0, 0)
    """H W of the random training crop; 0 0 = --size"""
    scale: Scale = (0.75, 1.5)
    """min max of the random scale factor applied before cropping"""
    batch_size: PositiveInt = 8
    """frames per training step"""
    steps: PositiveInt = 4000
    """optimiser steps (the length of the learning-rate schedule)"""
    lr: PositiveFloat = 1e-3
    """peak learning rate (AdamW, linear warm-up then poly decay)"""
    head_lr_mult: PositiveFloat = 1.0
    """learning-rate multiplier of the decode head"""
    weight_decay: NonNegFloat = 0.01
    """AdamW weight decay"""
    warmup_steps: NonNegInt = 200
    """linear learning-rate warm-up steps"""
    poly_power: NonNegFloat = 1.0
    """exponent of the poly learning-rate decay: lr * (1 - progress) ** power after the warm-up"""
    val_every: PositiveInt = 500
    """validate (and keep best/) every N steps"""
    save_every: PositiveInt = 500
    """write the resumable last/ checkpoint every N steps"""
    max_minutes: NonNegFloat = 0.0
    """wall-clock budget in minutes (0 = none): training stops there with a checkpoint, and the learning rate
    decays to 0 by then"""
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    augment: bool = True
    """random scale, crop, flip and photometric augmentation"""
    rare_class_sampling: bool = False
    """draw each training frame by rare-class sampling (DAFormer): a class c with probability softmax((1 - f_c) / T),
    f_c its share of the labelled pixels, then a frame holding c, cropped to show c; false = uniform frames"""
    rare_class_temperature: PositiveFloat = 0.01
    """rare-class sampling: temperature T > 0; smaller favours rare classes more (DAFormer: 0.01)"""
    rare_class_min_pixels: NonNegInt = 256
    """rare-class sampling: a frame is drawn for class c only when its label file holds at least this many pixels
    of c, at the file's resolution (256: a 0.0015 share of a 360x480 frame, as DAFormer's 3000 of 1914x1052)"""
    rare_class_crop_tries: PositiveInt = 10
    """rare-class sampling: random crops tried per frame; the first showing the drawn class is kept, else the
    last (DAFormer: 10)"""
    loss: Literal["ce", "balanced", "ohem"] = "ce"
    """training loss: ce = cross-entropy; balanced = cross-entropy with median-frequency class weights (Eigen and
    Fergus 2015); ohem = cross-entropy over the hard pixels only (online hard example mining, mmseg's form)"""
    class_weight_power: NonNegFloat = 1.0
    """balanced loss: the median-frequency weights are raised to this power (1 = Eigen and Fergus; 0.5 = their
    square root, a milder push towards rare classes; 0 = plain cross-entropy)"""
    ohem_thresh: Fraction = 0.7
    """ohem loss: a pixel is hard when the probability of its true class is below this, in [0, 1]"""
    ohem_min_kept: NonNegInt = 4000
    """ohem loss: pixels kept per frame at least (those of lowest true-class probability), at the crop size"""
    amp: bool = True
    """mixed precision on GPU (bf16/fp16 autocast); ignored on CPU"""
    device: Device = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N"""
    num_workers: NonNegInt = 2
    """DataLoader worker processes"""
    seed: NonNegInt = 0
    """random seed"""
    resume: Literal[False, True, "auto"] = False
    """continue from <out>/last (or last.prev after a kill while saving) with the exact state of the run; an error
    when there is nothing to resume; auto: resume when possible, else start fresh"""

    def check(self) -> None:
        _check_range(self.scale, "--scale")
        check_size(self.size, "--size")
        check_size(self.crop, "--crop", zero_means="--size")
        check_device(self.device)


@dataclass
class TeacherConfig:
    """EMA teacher of the self-training (mean teacher, Tarvainen and Valpola, NeurIPS 2017) with a fixed momentum
    and no warm-up ramp (see docs/method-notes.md, Mean teacher). 0.999 is the momentum of DAFormer (Hoyer et al.,
    CVPR 2022) and CrossMatch, 0.99 that of DACS. Over n steps the teacher moves 1 - alpha^n of the way toward the
    student, so short runs need a smaller alpha: the quick pipeline preset (150 steps) uses 0.99."""

    alpha: Annotated[float, Bounds(0, 1, hi_open=True)] = 0.999
    """EMA momentum of the teacher, in [0, 1): teacher = alpha * teacher + (1 - alpha) * student after every step;
    use about 0.99 for runs of a few hundred steps"""
    flip: bool = False
    """pseudo-label from the mean of the teacher's softmax (B, K, H, W) on the weak view and on its horizontal
    mirror (flipped back); the rectifier's prior and the monitor read the averaged probabilities too. One more
    teacher forward per step; an option of this project, not from the papers"""


@dataclass
class PseudoLabelConfig:
    """Pseudo-label selection of the self-training, after CBST (Zou et al., ECCV 2018, sec. 4.2): with
    ``class_balanced``, per-class thresholds lambda_c keep the top ``fraction`` of each class's pixels, bounded by
    [floor, threshold]. The anchor blend, the class-frequency loss weights and the curriculum of the kept share are
    additions to the paper (see docs/method-notes.md, CBST)."""

    threshold: Fraction = 0.9
    """confidence threshold in [0, 1]: the fixed one, or the upper bound of the class-balanced ones"""
    class_balanced: bool = True
    """per-class thresholds keeping the top --pseudo.fraction of each class's pixels (CBST)"""
    fraction: Fraction = 0.5
    """CBST: share of each class's pixels kept"""
    floor: Fraction = 0.0
    """CBST: lower bound of the per-class thresholds (0: a rare class whose confidence stays low keeps its
    pseudo-labels)"""
    anchor_weight: Fraction = 0.0
    """w > 0: pseudo-labels from (1 - w) p_teacher + w p_anchor, the anchor being the frozen source model after
    AdaBN; 0 = the teacher alone (an addition to CBST)"""
    class_weight_power: NonNegFloat = 0.5
    """p > 0: weight each kept pixel's loss by its class's running pseudo-label frequency to the power -p,
    normalised to mean 1; 0 = unweighted (an addition to CBST)"""
    class_weight_max: Annotated[float, Bounds(1)] = 10.0
    """upper bound of a class-frequency weight"""
    rule: Literal["cbst", "argmax"] = "cbst"
    """labelling rule: cbst = argmax_c p_c / lambda_c, kept where that ratio >= 1 (CBST's class-normalised rule; a
    pixel can take a rare class); argmax = argmax_c p_c, kept where p_c >= its class's threshold"""
    fraction_start: Fraction = 0.0
    """curriculum: > 0 ramps the kept share linearly from this to --pseudo.fraction over
    --pseudo.fraction-ramp-steps (CBST grows it per round); 0 = off"""
    fraction_ramp_steps: NonNegInt = 0
    """curriculum: steps of the ramp from --pseudo.fraction-start to --pseudo.fraction (0 = off)"""


@dataclass
class MonitorConfig:
    """Label-free monitor of an adaptation run and its optional stopping rule (a design of this project, not from a
    paper; the thresholds are untuned and the rule is off by default). A logged step *violates* when the
    class-share drift exceeds ``max_drift`` or the teacher-anchor agreement falls below ``min_agreement`` (only
    when the run keeps the anchor); ``stop`` ends the run, with its checkpoint, after ``patience`` consecutive
    violating logged steps."""

    stop: bool = False
    """stop the run early when the label-free stopping rule fires (the reason goes into summary.json)"""
    max_drift: Fraction = 0.2
    """stopping rule: largest total-variation distance of the teacher's class shares from the anchor's (or from the
    first logged step's without an anchor), in [0, 1]"""
    min_agreement: Fraction = 0.5
    """stopping rule: smallest share of pixels where the teacher's and the anchor's argmax agree"""
    patience: PositiveInt = 3
    """stopping rule: consecutive violating logged steps (--log-every apart) before the run stops"""
    entropy_floor: Fraction = 0.0
    """stopping rule (only with --monitor.stop): also stop when the teacher's mean entropy over the last
    --monitor.patience logged steps is at most this share of its mean over the first ones (0 = off)"""


@dataclass
class SelectionConfig:
    """Label-free selection of the adapted model (``--select auto``): candidates, validators and the rule."""

    frames: Annotated[int, Bounds(2, 100000)] = 16
    """target frames the candidates are scored on (evenly spread over the footage; all when fewer); each candidate
    costs two forward passes per frame"""
    blends: bool = True
    """also score AdaBN at blends 0.5, 0.75 and 1 (each is one pass over the target frames)"""
    rule: str = "guard:mixval_intra"
    """how the pick is made: guard:<validator> (the last save unless the validator scores it below the AdaBN
    model it started from, then the best model that did not self-train), mixval (MixVal's rank sum), last,
    reference or max:<validator> (validators: entropy, im, snd, mixval_intra, mixval_inter, agreement, drift);
    chosen by measurement, see docs/results.md"""
    confidence: Annotated[float, Bounds(0.5, 0.999)] = 0.8
    """verdict: the pick is better than the source model when this interval (over resampled frames) of its MixVal
    intra-class accuracy minus the source model's lies above 0, no better when below 0, else uncertain"""

    def check(self) -> None:
        from segadapt.adapt.selection import RULES

        if self.rule not in RULES:
            raise ValueError(f"--selection.rule {self.rule!r}: expected one of {', '.join(RULES)}")


@dataclass
class AdaptConfig:
    """Adaptation (``segadapt adapt``): a source checkpoint and unlabelled target footage in, an adapted checkpoint of
    the same architecture out; there is no field for target labels. Source-free by default: with ``source_data``
    empty nothing reads source data. With it (the UDA mode) labelled source frames add a source cross-entropy and
    the source->target ClassMix of DACS (Tranheden et al., WACV 2021), and RCCR and BiDA run in their papers'
    forms."""

    checkpoint: str = ""
    """the source model: a segadapt checkpoint directory, a local transformers directory, or a Hugging Face Hub id
    (owner/name) read from the local Hugging Face cache (required)"""
    target: str = ""
    """unlabelled target footage: an image folder (<dir>/images or <dir>), a video file or a folder of video files
    (required)"""
    source_data: str = ""
    """UDA mode: a labelled source split (<dir>/images + <dir>/labels, the checkpoint's classes); empty = source-free
    (nothing reads source data)"""
    source_weight: NonNegFloat = 1.0
    """UDA mode: weight of the source cross-entropy (DACS: 1)"""
    source_batch_size: NonNegInt = 0
    """UDA mode: source frames per step; 0 = --batch-size"""
    source_mix: bool = True
    """UDA mode: the strong view is DACS's source->target ClassMix (half the classes of a source frame pasted onto a
    target frame); false = target-to-target ClassMix, plus the source cross-entropy"""
    rare_class_sampling: bool = False
    """UDA mode: draw the source frames by rare-class sampling (DAFormer), as segadapt train-source does; false =
    uniform source frames"""
    rare_class_temperature: PositiveFloat = 0.01
    """UDA mode, rare-class sampling: temperature T > 0; smaller favours rare classes more (DAFormer: 0.01)"""
    rare_class_min_pixels: NonNegInt = 256
    """UDA mode, rare-class sampling: a source frame is drawn for class c only when its label file holds at least
    this many pixels of c, at the file's resolution"""
    rare_class_crop_tries: PositiveInt = 10
    """UDA mode, rare-class sampling: random crops tried per frame; the first showing the drawn class is kept, else
    the last (DAFormer: 10)"""
    out: str = "runs/adapt"
    """run directory (adapted/, last/, logs, debug grids)"""
    size: Size = (0, 0)
    """H W the frames are resized to; 0 0 = the checkpoint's input size (or --keep-aspect)"""
    keep_aspect: NonNegInt = 0
    """short side in pixels; the long side follows the target frames' median aspect, rounded to the model's
    stride (e.g. 120 -> 120x400 on KITTI); 0 = off; excludes --size"""
    crop: Size = (0, 0)
    """H W of the random crop; 0 0 = --size"""
    scale: Scale = (0.75, 1.25)
    """min max of the random scale factor applied before cropping"""
    video_stride: PositiveInt = 5
    """video targets: use every N-th frame"""
    video_max_frames: NonNegInt = 600
    """video targets: at most this many frames per video, spread evenly over it (0 = all)"""
    video_skip_duplicates: Annotated[float, Bounds(0, 1, hi_open=True)] = 0.0
    """video targets: skip a frame whose 32-pixel grayscale thumbnail differs from the last kept frame's by a mean
    absolute difference below this, as a fraction of 255 (e.g. 0.01 for parked cameras; 0 = off; one decode pass
    per video at the start; untuned)"""
    video_cache: str = ""
    """video targets: folder for a per-video cache of decoded frames at the training size (PNG), reused by later
    epochs and runs; empty = decode every time"""
    adabn: bool = True
    """first re-estimate the BatchNorm statistics on the target frames (AdaBN, Li et al. 2016)"""
    adabn_layers: Fraction = 1.0
    """share of the BatchNorm layers, input side first, whose statistics AdaBN re-estimates; the deeper ones keep
    the source statistics; 1 = all, as in AdaBN (see docs/method-notes.md, AdaBN)"""
    adabn_alpha: Fraction = 0.75
    """weight of the target statistics: BatchNorm mean/variance = (1 - alpha) * source + alpha * target (the
    blend of Schneider et al., NeurIPS 2020); 1 = AdaBN as in Li et al. 2016 (see docs/method-notes.md, AdaBN)"""
    self_training: bool = True
    """then run the EMA-teacher self-training (false = AdaBN only)"""
    keep: Literal["teacher", "student"] = "teacher"
    """which weights become the adapted checkpoint: the EMA teacher or the student"""
    steps: PositiveInt = 1000
    """self-training steps"""
    batch_size: PositiveInt = 4
    """target frames per step"""
    lr: NonNegFloat = 0.0
    """backbone learning rate (AdamW; the decode head's is --head-lr-mult times it); 0 = the mode's default: 2e-5
    source-free, 6e-5 with --source-data"""
    head_lr_mult: PositiveFloat = 10.0
    """learning-rate multiplier of the decode head"""
    weight_decay: NonNegFloat = 0.01
    """AdamW weight decay"""
    class_mix: bool = True
    """target-to-target ClassMix (Olsson et al., WACV 2021) on the student's strong view"""
    mask_padding: bool = True
    """never pseudo-label, train on or count the black padding of the random crop (false: only for ablations)"""
    strong: PhotometricConfig = field(default_factory=lambda: PhotometricConfig(
        brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, gamma=0.0, jitter_p=0.8, blur_p=0.5))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    rectifier: RectifierConfig = field(default_factory=RectifierConfig)
    rccr: RCCRConfig = field(default_factory=RCCRConfig)
    bida: BiDAConfig = field(default_factory=BiDAConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seco: SecoConfig = field(default_factory=SecoConfig)
    save_every: PositiveInt = 250
    """write the resumable last/ checkpoint every N steps"""
    keep_saves: bool = False
    """also keep the adapted model of every save as saves/step_<N>/ (to pick a step afterwards, e.g. by the
    monitor's signals in coverage.jsonl; each copy is one model's weights)"""
    select: Literal["auto", "last"] = "auto"
    """which model adapted/ holds: auto = the candidate (source model, AdaBN blends, every save) that the label-free
    selection rule picks, with a verdict against the source model (selection.json); last = the last save"""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    debug_every: NonNegInt = 100
    """write a debug grid (frame, pseudo-label, rectifier values) every N steps; 0 = never"""
    log_every: PositiveInt = 20
    """log losses and pseudo-label coverage every N steps"""
    max_minutes: NonNegFloat = 0.0
    """wall-clock budget in minutes (0 = none)"""
    grad_share_every: NonNegInt = 0
    """every N steps (and at the last), log each loss term's gradient norm on the student's backbone relative to
    the pseudo-label loss's, as grad_share in coverage.jsonl (one extra backward pass per term); 0 = off"""
    amp: bool = True
    """mixed precision on GPU; ignored on CPU"""
    device: Device = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N"""
    num_workers: NonNegInt = 2
    """DataLoader worker processes"""
    seed: NonNegInt = 0
    """random seed"""
    resume: Literal[False, True, "auto"] = False
    """continue from <out>/last (or last.prev after a kill while saving) with the exact state of the run; an error
    when there is nothing to resume; auto: resume when possible, else start fresh"""

    def learning_rate(self) -> float:
        """The backbone learning rate this run uses: ``lr``, or for 0 :data:`SOURCE_FREE_LR` (source-free) or
        :data:`UDA_LR` (with ``source_data``)."""
        if self.lr > 0:
            return self.lr
        return UDA_LR if self.source_data else SOURCE_FREE_LR

    def check(self) -> None:
        _check_range(self.scale, "--scale")
        check_size(self.size, "--size", zero_means="the checkpoint's input size")
        if self.keep_aspect and all(self.size):
            raise ValueError("--size and --keep-aspect exclude each other; give one")
        check_size(self.crop, "--crop", zero_means="--size")
        check_device(self.device)
        if self.rare_class_sampling and not self.source_data:
            raise ValueError("--rare-class-sampling samples the labelled source frames of the UDA mode; give "
                             "--source-data too")
        if self.source_data and self.depth.provider != "none":
            raise ValueError("--source-data with --depth.provider: the UDA mode has no depth for source frames; "
                             "use one of them")
