"""Checks of training data and checkpoints before any model loads (no torch: numpy, OpenCV, safetensors headers).

- :func:`check_class_file`: a ``classes.json`` that makes a label set (names unique, a colour each, an ignore value
  that is no class id).
- :func:`check_labelled_split`: every image decodes and has its label; every label decodes, is single-channel, has
  its image's size and holds only class ids of the class file or its ignore value.
- :func:`check_checkpoint`: a segadapt checkpoint (or a local transformers directory) whose class count agrees
  between ``config.json``'s class list, its transformers config and the classifier weights in
  ``model.safetensors`` (read from the file's header, nothing is loaded).
- :func:`check_depth_inputs`: the depth each target frame needs (maps, right views, a depth model directory).

Every failure is a :class:`~segadapt.runtime.inputs.InputError`, one line naming the file and the flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import manifest_problem, read_json_object
from segadapt.runtime.hub import resolve_model_dir
from segadapt.runtime.inputs import InputError, image_sizes

CHECKPOINT_FORMAT = "segadapt-checkpoint"  # segadapt.adapt.models.checkpoint.FORMAT (that module imports torch)
#: the largest downsampling of the backbones (MobileNetV2 and SegFormer reach 1/32 without dilation)
SEGFORMER_STRIDE = 32


def _flag(msg: str, flag: str) -> str:
    return f"{msg} ({flag})" if flag else msg


def find_class_file(directory: str | Path) -> Optional[Path]:
    """``classes.json`` in ``directory`` or up to 3 of its parents (the rule of the datasets), else None."""
    d = Path(directory).absolute()
    for p in [d, *list(d.parents)[:3]]:
        if (p / "classes.json").is_file():
            return p / "classes.json"
    return None


def check_class_file(path: str | Path, flag: str = "") -> ClassInfo:
    """Read and check a class file.

    Raises:
        InputError: not JSON, no class list, palette of another length, duplicate names, an ignore value that is a
            class id (the message names the file).
    """
    try:
        ci = ClassInfo.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(_flag(str(e), flag)) from None
    dup = sorted({n for n in ci.names if list(ci.names).count(n) > 1})
    if dup:
        raise InputError(_flag(f"{path}: class names appear twice: {', '.join(dup)}", flag))
    return ci


def _read_label(path: Path):
    import cv2
    import numpy as np

    data = np.fromfile(str(path), np.uint8)
    lab = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if lab is None:
        raise InputError(f"{path}: cannot be decoded as a label image" + (" (0 bytes)" if not data.size else ""))
    if lab.ndim != 2:
        raise InputError(f"{path}: a label must be single-channel class ids, got shape {lab.shape}")
    return lab


def check_labelled_split(split: str | Path, classes: ClassInfo, flag: str, image_dir: str | Path | None = None,
                         label_dir: str | Path | None = None) -> int:
    """Check a labelled split (``<split>/images``, ``<split>/labels``) against a label set; returns the frame count.

    Raises:
        InputError: a missing folder, an image that does not decode, an image without its label, a label that does
            not decode, has another size than its image, or holds a value that is neither a class id in
            ``[0, K)`` nor the ignore value (the first bad file is named, with the values found).
    """
    import numpy as np

    from segadapt.runtime.inputs import folder_images

    split = Path(split)
    files = folder_images(image_dir or split, flag, "split folder")
    ldir = Path(label_dir) if label_dir else split / "labels"
    if not ldir.is_dir():
        raise InputError(_flag(f"{ldir}: no labels folder in the split", flag))
    sizes = image_sizes(files, flag)
    k, ignore = classes.num_classes, classes.ignore_index
    for f in files:
        lp = ldir / (f.stem + ".png")
        if not lp.is_file():
            raise InputError(_flag(f"{lp}: label missing for image {f.name}", flag))
        lab = _read_label(lp)
        if lab.shape != sizes[f]:
            raise InputError(_flag(f"{lp}: label size {lab.shape[1]}x{lab.shape[0]} differs from its image's "
                                   f"{sizes[f][1]}x{sizes[f][0]} (W x H)", flag))
        vals = np.unique(lab)
        bad = [int(v) for v in vals if (v >= k or v < 0) and v != ignore]
        if bad:
            raise InputError(_flag(f"{lp}: label values {bad[:10]} are neither class ids 0-{k - 1} nor the ignore "
                                   f"value {ignore} of the class file", flag))
    return len(files)


@dataclass
class CheckpointInfo:
    """What a checkpoint's files say, read without loading it: ``classes`` (None for a transformers directory
    without a class file), ``num_classes``, ``input_size`` (H, W), ``stride`` (the backbone's largest downsampling),
    ``weights_bytes`` (size of the weights file), ``kind`` (``segadapt`` or ``transformers``)."""

    classes: Optional[ClassInfo]
    num_classes: int
    input_size: Tuple[int, int]
    stride: int
    weights_bytes: int
    kind: str


def _classifier_outputs(weights: Path) -> Optional[int]:
    """Output channels of the classifier in a safetensors file, from its header (no tensor is read).

    Raises:
        InputError: the file is empty, truncated or not safetensors.
    """
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    try:
        with safe_open(str(weights), "numpy") as f:
            keys = [k for k in f.keys() if "classifier" in k and k.endswith(".bias")]
            shapes = [f.get_slice(k).get_shape() for k in keys]
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise InputError(f"{weights}: corrupt or truncated weights file ({e})") from None
    outs = [s[0] for s in shapes if len(s) == 1]
    return int(outs[-1]) if outs else None


def check_checkpoint(path: str | Path, flag: str) -> CheckpointInfo:
    """A checkpoint whose files agree on the class count, checked from ``config.json`` and the weights' header.

    Raises:
        InputError: missing folder, no or corrupt ``config.json``, a newer format, missing, empty or truncated
            weights, a class list of another length than the transformers config's labels or than the classifier's
            outputs.
    """
    try:
        p = resolve_model_dir(path)  # a Hub id: its folder in the Hugging Face cache
    except FileNotFoundError as e:
        raise InputError(_flag(str(e), flag)) from None
    if not p.exists():
        raise InputError(_flag(f"{p}: no such checkpoint", flag))
    if not p.is_dir():
        raise InputError(_flag(f"{p}: a checkpoint is a folder (config.json, model.safetensors), this is a file", flag))
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise InputError(_flag(f"{p}: neither a segadapt checkpoint nor a transformers model folder "
                               f"(no config.json)", flag))
    try:
        cfg = read_json_object(cfg_path, "checkpoint config")
    except ValueError as e:
        raise InputError(_flag(str(e), flag)) from None
    if cfg.get("format") == CHECKPOINT_FORMAT:
        return _check_segadapt_checkpoint(p, cfg, flag)
    if "model_type" not in cfg:
        raise InputError(_flag(f"{cfg_path}: not a segadapt checkpoint or transformers config "
                               f"(no 'format' or 'model_type')", flag))
    weights = [w for w in (p / "model.safetensors", p / "pytorch_model.bin") if w.is_file()]
    if not weights:
        raise InputError(_flag(f"{p}: transformers folder without weights (model.safetensors)", flag))
    k = len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 0) or 0)
    stride = SEGFORMER_STRIDE if cfg["model_type"] == "segformer" else int(cfg.get("output_stride", 32) or 32)
    return CheckpointInfo(None, k, (0, 0), stride, weights[0].stat().st_size, "transformers")


def _check_segadapt_checkpoint(p: Path, cfg: dict, flag: str) -> CheckpointInfo:
    cfg_path = p / "config.json"
    problem = manifest_problem(p, legacy_ok=True)  # sizes only: cheap; a corrupt or mismatched manifest is named
    if problem:
        raise InputError(_flag(f"{p}: not a complete checkpoint: {problem}", flag))
    if int(cfg.get("format_version", 0)) > 1:
        raise InputError(_flag(f"{cfg_path}: checkpoint format version {cfg['format_version']} is newer than this "
                               f"segadapt reads (1)", flag))
    try:
        classes = ClassInfo.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise InputError(_flag(f"{cfg_path}: bad class list: {e}", flag)) from None
    k = classes.num_classes
    hf = cfg.get("hf_config") or {}
    labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 0) or 0)
    if labels and labels != k:
        raise InputError(_flag(f"{cfg_path}: names {k} classes, its model config has {labels} outputs", flag))
    weights = p / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size == 0:
        raise InputError(_flag(f"{weights}: checkpoint weights {'missing' if not weights.is_file() else 'empty'}",
                               flag))
    try:
        outs = _classifier_outputs(weights)
    except InputError as e:
        raise InputError(_flag(str(e), flag)) from None
    if outs is not None and outs != k:
        raise InputError(_flag(f"{p}: config.json names {k} classes, the weights' classifier has {outs} outputs",
                               flag))
    arch = cfg.get("arch", "")
    stride = SEGFORMER_STRIDE if "segformer" in arch else int(cfg.get("output_stride", 32) or 32)
    size = tuple(int(v) for v in cfg.get("input_size", (0, 0)))
    return CheckpointInfo(classes, k, size, stride, weights.stat().st_size, "segadapt")


def check_size_vs_stride(hw: Sequence[int], stride: int, flag: str) -> None:
    """A (H, W) size of at least the model's largest downsampling (0 0 = "the default" passes).

    Raises:
        InputError: ``--size 16 16 is below the model's stride 32: use at least 32 32``.
    """
    if tuple(hw) == (0, 0) or not hw:
        return
    if min(hw) < stride:
        raise InputError(f"{flag} {hw[0]} {hw[1]} is below the model's stride {stride}: use at least {stride} {stride}")


_DEPTH_SUFFIXES = (".png", ".npy", ".tiff", ".tif", ".exr")


def check_depth_inputs(depth, frames: List[Path], is_video: bool) -> None:
    """The depth ``depth`` (a :class:`~segadapt.adapt.config.DepthConfig`) needs for each target frame.

    Raises:
        InputError: a video target with a depth provider, a missing folder, or frames without a depth map or right
            view (the first is named, with how many lack one).
    """
    if depth.provider == "none":
        return
    if is_video:
        raise InputError(f"--depth.provider {depth.provider} needs image files; extract the video's frames first "
                         f"(--target)")
    if depth.provider == "model":
        if not (Path(depth.model_dir) / "config.json").is_file():
            raise InputError(f"{depth.model_dir}: not a transformers depth model folder (no config.json) "
                             f"(--depth.model-dir)")
        return
    folder, flag = ((depth.directory, "--depth.directory") if depth.provider == "files"
                    else (depth.right_dir, "--depth.right-dir"))
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: no such folder ({flag})")
    names = {f.name for f in d.iterdir()}
    if depth.provider == "files":
        missing = [f for f in frames if not any(f.stem + s in names for s in _DEPTH_SUFFIXES)]
        what = "depth map"
    else:
        missing = [f for f in frames if f.name not in names]
        what = "right view"
    if missing:
        raise InputError(f"{d}: no {what} for {len(missing)} of {len(frames)} target frames, e.g. "
                         f"{missing[0].name} ({flag})")
    if depth.provider == "files":
        empty = [f for f in frames for s in _DEPTH_SUFFIXES if (d / (f.stem + s)).is_file()
                 and (d / (f.stem + s)).stat().st_size == 0]
        if empty:
            raise InputError(f"{d / (empty[0].stem + '.png')}: empty depth map ({flag})")
