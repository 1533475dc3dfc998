"""Evaluation of a segmenter on a labelled split: one confusion matrix over the whole set (methods.md 0.1).

Frames are resized to the inference size, logits are upsampled bilinearly to the label's own resolution, and the
argmax is compared with the label there. Target labels are read only here, never during adaptation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segadapt.adapt.augment import normalize
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.metrics import ConfusionMatrix, format_table
from segadapt.adapt.models.segmenter import Segmenter, upsample_logits
from segadapt.runtime.classes import ClassInfo, overlay


@torch.no_grad()
def predict_logits(model: Segmenter, images: torch.Tensor, mean, std, size: Optional[Tuple[int, int]] = None,
                   out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Logits for a batch of frames.

    Args:
        model: the segmenter (put in eval mode by the caller).
        images: (B, 3, H, W) uint8 RGB on the model's device.
        mean, std: normalisation (RGB in [0, 1] units).
        size: (h, w) to resize the frames to before inference (None: as they are).
        out_size: (H', W') to upsample logits to (None: the input frames' H, W).

    Returns:
        (B, K, H', W') float32 logits.
    """
    x = normalize(images, mean, std)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    logits = model(x).float()
    return upsample_logits(logits, out_size or tuple(images.shape[-2:]))


@torch.no_grad()
def evaluate(model: Segmenter, dataset: LabeledImageFolder, mean, std, size: Optional[Tuple[int, int]] = None,
             device: str | torch.device = "cpu", batch_size: int = 4, overlay_dir: Optional[str | Path] = None,
             max_overlays: int = 20, progress: bool = False) -> dict:
    """Evaluate on a labelled split.

    Args:
        model: the segmenter.
        dataset: labelled frames (their transform must not change sizes randomly; normally None).
        mean, std: normalisation of the model.
        size: inference size (h, w); None = each frame's own size.
        device: torch device.
        batch_size: frames per forward pass (frames of the same size are batched together).
        overlay_dir: if set, write colourised overlays (prediction | label) of the first ``max_overlays`` frames.

    Returns:
        metrics dict of :func:`segadapt.adapt.metrics.metrics_from_confusion` plus ``num_images``.
    """
    classes: ClassInfo = dataset.classes
    cm = ConfusionMatrix(classes.num_classes, classes.ignore_index)
    was_training = model.training
    model.eval()
    written = 0
    if overlay_dir is not None:
        Path(overlay_dir).mkdir(parents=True, exist_ok=True)
    idx = list(range(len(dataset)))
    it = range(0, len(idx), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="evaluate", unit="batch")
    for start in it:
        items = [dataset[i] for i in idx[start:start + batch_size]]
        groups: dict = {}
        for item in items:
            groups.setdefault(tuple(item["image"].shape), []).append(item)
        for group in groups.values():
            imgs = torch.stack([g["image"] for g in group]).to(device)
            labels = torch.stack([g["label"] for g in group]).to(device)
            logits = predict_logits(model, imgs, mean, std, size, tuple(labels.shape[-2:]))
            pred = logits.argmax(1)
            cm.update(pred.cpu(), labels.cpu())
            if overlay_dir is not None and written < max_overlays:
                for g, p in zip(group, pred.cpu().numpy()):
                    if written >= max_overlays:
                        break
                    img = g["image"].permute(1, 2, 0).numpy()
                    lab = g["label"].numpy().copy()
                    left = overlay(img, p, classes.palette, 0.5)
                    right = overlay(img, lab, classes.palette, 0.5)
                    right[lab == classes.ignore_index] = img[lab == classes.ignore_index]
                    grid = np.concatenate([left, right], axis=1)
                    cv2.imwrite(str(Path(overlay_dir) / f"{g['name']}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
                    written += 1
    model.train(was_training)
    m = cm.compute()
    m["num_images"] = len(dataset)
    m["classes"] = list(classes.names)
    return m


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, size: Optional[Sequence[int]] = None,
                        device: str = "cpu", batch_size: int = 4, overlay_dir: Optional[str] = None,
                        json_out: Optional[str] = None, progress: bool = True) -> dict:
    """Load a checkpoint and evaluate it on a labelled split directory; prints nothing, returns the metrics.

    ``size`` defaults to the checkpoint's input size. The label set is the checkpoint's; the split's classes.json
    (if any) must have the same number of classes.

    Raises:
        ValueError: the split's classes differ from the checkpoint's.
    """
    from segadapt.adapt.models.checkpoint import load_segmenter

    model, meta = load_segmenter(checkpoint, map_location=device)
    ds = LabeledImageFolder(data, classes=None)
    if ds.classes.num_classes != meta.classes.num_classes:
        raise ValueError(f"{data}: has {ds.classes.num_classes} classes, checkpoint {checkpoint} has "
                         f"{meta.classes.num_classes}")
    size_t = tuple(size) if size else tuple(meta.input_size)
    m = evaluate(model, ds, meta.mean, meta.std, size_t, device, batch_size, overlay_dir, progress=progress)
    m["checkpoint"] = str(checkpoint)
    m["data"] = str(data)
    m["size"] = list(size_t)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(m, indent=1))
    return m


__all__ = ["predict_logits", "evaluate", "evaluate_checkpoint", "format_table"]
