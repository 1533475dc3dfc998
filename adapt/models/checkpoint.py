"""Our checkpoint format: a directory, written atomically.

::

    <dir>/model.safetensors      the segmenter's weights (``Segmenter.state_dict()``)
    <dir>/config.json            architecture (transformers config), classes, palette, ignore index,
                                 normalisation, input size, provenance
    <dir>/training_state.pt      optimizer/scheduler state, step, RNG state, best metric (for --resume); optional

    <dir>/manifest.json          size and SHA-256 of the files above, written last: the completeness marker

The directory is written as ``<dir>.tmp`` and swapped in (``<dir>`` -> ``<dir>.prev``, ``<dir>.tmp`` -> ``<dir>``,
``<dir>.prev`` removed; :func:`segadapt.runtime.files.atomic_dir`), so a crash never leaves a half-written checkpoint
under the final name and a complete one exists at every moment; :func:`resumable_checkpoint` finds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file, save

from segadapt.adapt.models.segmenter import Segmenter, _hf_class, arch_of
from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import TrackedFile, atomic_dir, is_complete, read_json_object, sibling, write_file
from segadapt.runtime.hub import resolve_model_dir

FORMAT = "segadapt-checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CheckpointMeta:
    """What ``config.json`` records besides the transformers config.

    Attributes:
        classes: the label set.
        mean, std: per-channel normalisation of RGB in [0, 1] units: ``x = (rgb / 255 - mean) / std``.
        input_size: (H, W) in pixels the model was trained/evaluated at.
        info: free-form provenance (command, step, metrics, source checkpoint hash...).
    """

    classes: ClassInfo
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    input_size: Tuple[int, int] = (360, 480)
    info: dict = field(default_factory=dict)


def _tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested dict/list (an estimate of its serialised size)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 64


def save_checkpoint(path: str | Path, model: Segmenter, meta: CheckpointMeta,
                    training_state: Optional[dict] = None) -> Path:
    """Write ``model`` (and optionally the training state) as a checkpoint directory, atomically.

    Args:
        path: target directory (replaced if it exists).
        model: the segmenter; its weights are saved in float32 from CPU copies.
        meta: classes, normalisation and provenance.
        training_state: dict of tensors/primitives for resuming (optimizer, scheduler, step, RNG...).

    Returns:
        the checkpoint directory.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "in_channels": model.in_channels,
        "output_stride": model.output_stride,
        "hf_config": model.hf.config.to_dict(),
        **meta.classes.to_dict(),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "input_size": list(meta.input_size),
        "info": meta.info,
    }

    weights = save(state, metadata={"format": FORMAT})
    config = json.dumps(cfg, indent=1).encode()
    needed = len(weights) + len(config) + (_tensor_bytes(training_state) if training_state is not None else 0)
    with atomic_dir(path, needed=needed, what="checkpoint") as d:
        write_file(d / "model.safetensors", weights)
        write_file(d / "config.json", config)
        if training_state is not None:
            with TrackedFile(d / "training_state.pt") as f:
                torch.save(training_state, f)
    return Path(path)


def read_checkpoint_config(path: str | Path) -> dict:
    """Read and validate ``<path>/config.json`` of one of our checkpoints.

    Raises:
        FileNotFoundError: no such directory or no config.json.
        ValueError: config.json is not JSON or not a segadapt checkpoint (the message names the file).
    """
    p = Path(path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    cfg = read_json_object(p, "checkpoint config")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{p}: not a segadapt checkpoint (format={cfg.get('format')!r})")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{p}: checkpoint format version {cfg['format_version']} is newer than this segadapt "
                         f"({FORMAT_VERSION})")
    return cfg


def is_checkpoint(path: str | Path) -> bool:
    try:
        read_checkpoint_config(path)
        return True
    except (FileNotFoundError, ValueError):
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Tuple[Segmenter, CheckpointMeta]:
    """Load one of our checkpoints: rebuild the architecture from its config (no download) and load the weights.

    Returns:
        (segmenter in eval mode, metadata).

    Raises:
        FileNotFoundError / ValueError: missing or corrupt files, or weights that do not fit the architecture
            (the message names the file).
    """
    path = Path(path)
    cfg = read_checkpoint_config(path)
    hf_cfg_d = dict(cfg["hf_config"])
    model_type = hf_cfg_d.get("model_type")
    cls = _hf_class(model_type)
    hf_cfg = cls.config_class.from_dict(hf_cfg_d)
    model = Segmenter(cls(hf_cfg))
    wpath = path / "model.safetensors"
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: checkpoint weights missing")
    try:
        state = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{wpath}: corrupt weights file: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{wpath}: weights do not match the architecture in config.json: {e}") from None
    model.to(map_location).eval()
    meta = CheckpointMeta(
        classes=ClassInfo.from_dict(cfg),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        input_size=tuple(cfg.get("input_size", (360, 480))),
        info=cfg.get("info", {}),
    )
    return model, meta


def load_training_state(path: str | Path) -> Optional[dict]:
    """The training state saved beside a checkpoint, or None if there is none.

    Raises:
        ValueError: the file is truncated or not a training state (the message names it).
    """
    p = Path(path) / "training_state.pt"
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{p}: corrupt or truncated training state ({why})") from None


def resumable_checkpoint(path: str | Path) -> Optional[Path]:
    """The newest complete checkpoint with a training state at ``path`` (e.g. ``<out>/last``): ``path`` itself,
    else ``<path>.prev`` (kept when a run was killed inside the checkpoint swap), else None. Completeness is the
    manifest's sizes and SHA-256 (:func:`segadapt.runtime.files.newest_complete`)."""
    for d in (Path(path), sibling(path, "prev")):
        # a folder without a manifest under the final name was written, whole, by an older segadapt
        if (is_complete(d, verify_hashes=True, legacy_ok=d == Path(path)) and (d / "training_state.pt").is_file()
                and is_checkpoint(d)):
            return d
    return None


def load_segmenter(path: str | Path, classes: Optional[ClassInfo] = None,
                   map_location: str | torch.device = "cpu") -> Tuple[Segmenter, CheckpointMeta]:
    """Load a segmenter from our checkpoint or from a local transformers directory.

    A transformers directory (``config.json`` with ``model_type`` + weights) is loaded with
    ``from_pretrained(local_files_only=True)``; its class names come from ``classes`` or from the config's
    ``id2label``. A Hugging Face Hub id (``owner/name``, when no such folder exists) is read from the Hugging Face
    cache (:func:`segadapt.runtime.hub.resolve_model_dir`).

    Raises:
        FileNotFoundError: the path does not exist (nor the Hub id in the cache) or holds neither format.
        ValueError: corrupt files.
    """
    path = resolve_model_dir(path)
    if is_checkpoint(path):
        return load_checkpoint(path, map_location)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a segadapt checkpoint nor a transformers model directory")
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = _hf_class(hf_cfg.model_type)
    hf = cls.from_pretrained(str(path), local_files_only=True)
    model = Segmenter(hf).to(map_location).eval()
    if classes is None:
        names = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
        from segadapt.runtime.classes import default_palette

        classes = ClassInfo(tuple(names), tuple(tuple(c) for c in default_palette(len(names))),
                            int(getattr(hf.config, "semantic_loss_ignore_index", 255)))
    return model, CheckpointMeta(classes=classes, info={"transformers_dir": str(path)})


def checkpoint_hash(path: str | Path) -> str:
    """SHA-256 (hex) of the checkpoint's ``model.safetensors``: identifies the weights an export came from."""
    h = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["CheckpointMeta", "save_checkpoint", "load_checkpoint", "load_segmenter", "load_training_state",
           "resumable_checkpoint",
           "read_checkpoint_config", "is_checkpoint", "checkpoint_hash", "arch_of"]
