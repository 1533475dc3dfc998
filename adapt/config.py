"""Typed configuration dataclasses of source training and adaptation, and their dict/JSON mapping (no torch).

The command line (``segadapt.cli_args``) turns every field into a flag; ``from_dict`` reads (partial) JSON configs
and the configs saved with runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Tuple

DEFAULT_DATA_ENV = "SEGADAPT_DATA"


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


@dataclass
class PhotometricConfig:
    """Strengths of the photometric augmentation (image only); 0 disables a component.

    brightness/contrast/saturation: factor drawn from [1 - s, 1 + s]. hue: rotation in [-hue, hue] of a full turn.
    gamma: exponent drawn from [1 - g, 1 + g]. jitter_p: probability of colour jitter + gamma for a sample.
    blur_p: probability of a Gaussian blur with sigma ~ U(blur_sigma_min, blur_sigma_max) pixels.
    """

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    gamma: float = 0.3
    jitter_p: float = 0.8
    blur_p: float = 0.3
    blur_sigma_min: float = 0.15
    blur_sigma_max: float = 1.15


@dataclass
class ModelConfig:
    """Which segmenter to build.

    arch: ``deeplabv3-mobilenetv2`` (transformers ``MobileNetV2ForSemanticSegmentation``) or ``segformer``
        (``SegformerForSemanticSegmentation``).
    variant: SegFormer size ``b0``..``b5``; for MobileNetV2 the depth multiplier (``1.0``, ``0.75``, ``0.5``...).
    pretrained: a local transformers directory (``from_pretrained``, no download) or one of our checkpoints;
        empty = random initialisation.
    output_stride: MobileNetV2 only, 8, 16 or 32 (dilated convolutions keep the resolution). 16 is the default:
        on 2 CPU cores a training step at 180x240, batch 8, takes 0.89 s at 16 and 2.9 s at 8 (measured).
    """

    arch: str = "deeplabv3-mobilenetv2"
    variant: str = ""
    pretrained: str = ""
    output_stride: int = 16
    dropout: float = 0.1


@dataclass
class SourceTrainConfig:
    """Supervised training of the source model (``segadapt train-source``).

    Sizes are (H, W) in pixels. ``size`` is the resolution frames are resized to before random scale/crop and the
    resolution of validation inference (metrics are computed at the label's own resolution). ``crop`` (0, 0) means
    the same as ``size``. ``max_minutes`` > 0 is a wall-clock budget: the poly schedule then decays to 0 by
    whichever comes first, ``steps`` or the budget, and training stops there with a checkpoint.
    """

    data: str = field(default_factory=default_camvid_dir)
    train_split: str = "source_train"
    val_split: str = "source_val"
    out: str = "runs/source"
    model: ModelConfig = field(default_factory=ModelConfig)
    size: Tuple[int, int] = (360, 480)
    crop: Tuple[int, int] = (0, 0)
    scale: Tuple[float, float] = (0.75, 1.5)
    batch_size: int = 8
    steps: int = 4000
    lr: float = 1e-3
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 200
    poly_power: float = 1.0
    val_every: int = 500
    save_every: int = 500
    max_minutes: float = 0.0
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    augment: bool = True
    amp: bool = True
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    resume: bool = False


# ---------------------------------------------------------------------------------------------------------------
# dataclass <-> dict (JSON configs, saved run configs)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, d: dict, path: str = ""):
    """Build dataclass ``cls`` from a (possibly partial, nested) dict.

    Raises:
        ValueError: a key that is not a field (with the closest names suggested) or a value of the wrong type.
    """
    import difflib

    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3)
            raise ValueError(f"unknown config key {path + k!r}" + (f"; did you mean {close}?" if close else ""))
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ValueError(f"config key {path + k!r} needs a mapping, got {v!r}")
            kwargs[k] = from_dict(t, v, path + k + ".")
        elif typing.get_origin(t) in (tuple, Tuple):
            args = typing.get_args(t)
            if not isinstance(v, (list, tuple)) or len(v) != len(args):
                raise ValueError(f"config key {path + k!r} needs {len(args)} values, got {v!r}")
            kwargs[k] = tuple(a(x) for a, x in zip(args, v))
        elif t is bool:
            if not isinstance(v, bool):
                raise ValueError(f"config key {path + k!r} needs true/false, got {v!r}")
            kwargs[k] = v
        elif t in (int, float, str):
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, t) or isinstance(v, bool):
                raise ValueError(f"config key {path + k!r} needs {t.__name__}, got {v!r}")
            kwargs[k] = v
        else:
            kwargs[k] = v
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) for JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_size(s: Any) -> Tuple[int, int]:
    """Parse ``(H, W)`` from a pair or a ``HxW`` string."""
    if isinstance(s, str):
        h, w = s.lower().split("x")
        return int(h), int(w)
    h, w = s
    return int(h), int(w)



@dataclass
class TeacherConfig:
    """EMA teacher: fixed momentum (no warm-up ramp, see adapt/teacher.py for why). 0.99 is DACS's default
    (methods.md 0.2): over a 150-step run the teacher moves 1 - 0.99^150 = 78 % of the way toward the student, with
    0.999 only 14 %. Raise it for long runs."""

    alpha: float = 0.99


@dataclass
class PseudoLabelConfig:
    """Pseudo-label selection. ``class_balanced``: per-class thresholds keeping the top ``fraction`` of each class's
    pixels (CBST), bounded by [floor, threshold] (floor 0 since session 3: a rare class whose confidence stays below
    0.5 keeps its pseudo-labels); otherwise the fixed ``threshold``. ``anchor_weight`` w > 0:
    pseudo-labels come from ``(1 - w) * p_teacher + w * p_anchor``, the anchor being the frozen source model after
    AdaBN [RECON] (measured once, seed 0: 33.55 mIoU at w = 0.5 vs 32.85 at 0, within the seed spread).
    ``class_weight_power`` p > 0: each kept pixel's loss is weighted by its class's running pseudo-label frequency
    to the power -p (mean weight 1, at most ``class_weight_max``), so that rare classes are not trained away
    [RECON, :class:`segadapt.adapt.pseudo_label.ClassFrequencyWeights`]. Measured together with floor 0 (CamVid dusk, the
    session-3 source model, 3 seeds): full method 37.52 -> 40.19 mIoU (docs/benchmarks.md, run 3)."""

    threshold: float = 0.9
    class_balanced: bool = True
    fraction: float = 0.5
    floor: float = 0.0
    anchor_weight: float = 0.0
    class_weight_power: float = 0.5
    class_weight_max: float = 10.0


@dataclass
class DepthConfig:
    """CrossMatch auxiliary RGB-D stream (training only). provider: ``none``, ``files``, ``stereo`` or ``model``.

    require_agreement: dual-head denoising keeps only pixels where the RGB and RGB-D teachers agree [RECON].
    cross_modal_weight: weight of the cross-modal consistency loss (each stream on the strong view trained toward
    the other stream's weak-view pseudo-label).
    """

    provider: str = "none"
    directory: str = ""
    right_dir: str = ""
    model_dir: str = ""
    file_kind: str = "disparity"
    png_scale: float = 256.0
    focal_px: float = 721.5
    baseline_m: float = 0.54
    require_agreement: bool = True
    cross_modal_weight: float = 1.0


@dataclass
class RectifierConfig:
    """IR2F rectifier [RECON]. Its source-free training signal is the agreement of observable predictions with the
    EMA teacher's label (a binary target, BCE):

    - ``anchor_consistency`` (default): the **anchor**, a frozen copy of the source model after AdaBN, agrees with
      the teacher; the anchor's class probabilities also enter the rectifier's latent grid next to the teacher's.
      Measured on CamVid dusk (a fixed adapted teacher, 150 rectifier steps): AUROC for "pseudo-label is right"
      0.840, vs 0.830 for the teacher's max-softmax; in 150-step adaptation runs 0.829 vs 0.820 on average over 6
      runs (docs/benchmarks.md), while the flip target averaged 0.774 vs 0.817.
    - ``flip_consistency``: the teacher's label is stable under a horizontal flip of the weak view;
    - ``photometric_consistency``: ... under the strong view's colour jitter and blur (one more teacher pass);
    - with depth, always: the RGB and RGB-D teachers agree.

    The enabled signals are combined by AND. ``warmup_steps``: steps before its values enter the mixture loss.
    ``query_stride``: r is predicted on a grid ``stride`` times coarser than the crop, then upsampled.

    ``prior`` [RECON]: what the implicit head corrects, ``r = sigmoid(logit(prior) + INR output)`` with the INR's
    last layer starting at zero: ``teacher_anchor`` (default) the mean of the teacher's and the anchor's probability
    of the pseudo-label, ``teacher`` the teacher's own probability, ``none`` the plain INR (``r = sigmoid(INR)``,
    sessions 1-2). Measured (docs/benchmarks.md, run 3): AUROC 0.01-0.04 above the plain INR in every paired run,
    mIoU unchanged; in the full method 0.864-0.870 vs max-softmax 0.838-0.845, about the prior's own AUROC (seed 0:
    prior 0.869, rectifier 0.870)."""

    enabled: bool = True
    latent_dim: int = 64
    hidden: int = 128
    layers: int = 3
    query_stride: int = 2
    lr: float = 1e-3
    loss_weight: float = 1.0
    warmup_steps: int = 50
    anchor_consistency: bool = True
    flip_consistency: bool = False
    photometric_consistency: bool = False
    prior: str = "teacher_anchor"


@dataclass
class AdaptConfig:
    """Source-free adaptation (``segadapt adapt``): a source checkpoint and unlabelled target footage in, an adapted
    checkpoint of the same architecture out. There is no field for source data or target labels.

    target: an image folder (``<dir>/images`` or ``<dir>``) or a video file (``video_stride``, ``video_max_frames``).
    size: (H, W) frames are resized to; (0, 0) = the checkpoint's input size. crop: random crop (0, 0) = size.
    adabn: re-estimate BatchNorm statistics on the target first. self_training: then run the EMA self-training
    (False = AdaBN only). keep: which weights become the adapted checkpoint, ``teacher`` (EMA) or ``student``.
    """

    checkpoint: str = ""
    target: str = ""
    out: str = "runs/adapt"
    size: Tuple[int, int] = (0, 0)
    crop: Tuple[int, int] = (0, 0)
    scale: Tuple[float, float] = (0.75, 1.25)
    video_stride: int = 5
    video_max_frames: int = 600
    adabn: bool = True
    self_training: bool = True
    keep: str = "teacher"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    class_mix: bool = True
    strong: PhotometricConfig = field(default_factory=lambda: PhotometricConfig(
        brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, gamma=0.0, jitter_p=0.8, blur_p=0.5))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    rectifier: RectifierConfig = field(default_factory=RectifierConfig)
    save_every: int = 250
    debug_every: int = 100
    log_every: int = 20
    max_minutes: float = 0.0
    amp: bool = True
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    resume: bool = False
