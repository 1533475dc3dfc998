"""Evaluation of a segmenter on a labelled split: one confusion matrix over the whole set (as mmsegmentation does).

Frames are resized to the inference size, logits are upsampled bilinearly to the label's own resolution, and the
argmax is compared with the label there. Target labels are read only here, never during adaptation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segadapt.adapt.augment import normalize
from segadapt.adapt.class_map import ScoredMapping, drop_no_counterpart
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.metrics import ConfusionMatrix, format_table
from segadapt.adapt.models.segmenter import Segmenter, upsample_logits
from segadapt.runtime.classes import ClassInfo, overlay
from segadapt.runtime.files import write_json


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
             max_overlays: int = 20, progress: bool = False, mapping: Optional[ScoredMapping] = None) -> dict:
    """Evaluate on a labelled split (of the model's class set, or of another one through ``mapping``).

    Args:
        model: the segmenter.
        dataset: labelled frames (their transform must not change sizes randomly; normally None).
        mean, std: normalisation of the model.
        size: inference size (h, w); None = each frame's own size.
        device: torch device.
        batch_size: frames per forward pass (frames of the same size are batched together).
        overlay_dir: if set, write colourised overlays (prediction | label) of the first ``max_overlays`` frames.
        mapping: labels of another class set: predictions and labels are scored in ``mapping.classes``
            (:func:`segadapt.adapt.class_map.evaluation_mapping`); None = the labels use the model's classes.

    Returns:
        metrics dict of :func:`segadapt.adapt.metrics.metrics_from_confusion` plus ``num_images`` and ``classes``
        (the scored class names).
    """
    classes: ClassInfo = dataset.classes if mapping is None else mapping.classes
    # with a map, one more column: predictions of model classes that have no counterpart (always wrong)
    cm = ConfusionMatrix(classes.num_classes + (mapping is not None), classes.ignore_index)
    if mapping is not None:
        pred_lut, label_lut = torch.from_numpy(mapping.pred_lut), torch.from_numpy(mapping.label_lut)
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
            pred, labels = logits.argmax(1).cpu(), labels.cpu()
            if mapping is not None:
                pred, labels = pred_lut[pred], label_lut[labels]
            cm.update(pred, labels)
            if overlay_dir is not None and written < max_overlays:
                for g, p, lab in zip(group, pred.numpy(), labels.numpy()):
                    if written >= max_overlays:
                        break
                    img = g["image"].permute(1, 2, 0).numpy()
                    left = overlay(img, p, classes.palette, 0.5)
                    right = overlay(img, lab, classes.palette, 0.5)
                    right[lab == classes.ignore_index] = img[lab == classes.ignore_index]
                    grid = np.concatenate([left, right], axis=1)
                    cv2.imwrite(str(Path(overlay_dir) / f"{g['name']}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
                    written += 1
    model.train(was_training)
    m = cm.compute()
    if mapping is not None:
        m = drop_no_counterpart(m, classes.num_classes)
        m["map"] = {"direction": mapping.direction, "unscored": list(mapping.unscored)}
    m["num_images"] = len(dataset)
    m["classes"] = list(classes.names)
    return m


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, size: Optional[Sequence[int]] = None,
                        device: str = "cpu", batch_size: int = 4, overlay_dir: Optional[str] = None,
                        json_out: Optional[str] = None, progress: bool = True, class_map: str = "",
                        keep_aspect: int = 0) -> dict:
    """Load a checkpoint and evaluate it on a labelled split directory; prints nothing, returns the metrics.

    ``size`` (H, W) defaults to ``keep_aspect`` (the short side; the long side from the split's frames, see
    :mod:`segadapt.adapt.aspect`), else the checkpoint's input size. Without ``class_map`` the labels use the
    checkpoint's classes; with it (a map file or built-in name, :mod:`segadapt.adapt.class_map`) the labels' classes
    are the split's classes.json and both sides are scored through the map.

    Raises:
        ValueError: the split's classes differ from the checkpoint's (and no map), a map that does not fit the two
            class sets, or both ``size`` and ``keep_aspect``.
    """
    from segadapt.adapt.aspect import resolve_size
    from segadapt.adapt.class_map import evaluation_mapping, load_class_map
    from segadapt.adapt.models.checkpoint import load_segmenter

    cmap = load_class_map(class_map) if class_map else None  # a bad map file fails before the model loads
    model, meta = load_segmenter(checkpoint, map_location=device)
    ds = LabeledImageFolder(data, classes=None)
    mapping = evaluation_mapping(cmap, meta.classes, ds.classes) if cmap else None
    if mapping is None and ds.classes.num_classes != meta.classes.num_classes:
        raise ValueError(f"{data}: has {ds.classes.num_classes} classes, checkpoint {checkpoint} has "
                         f"{meta.classes.num_classes} (--map scores a model on labels of another class set)")
    size_t = resolve_size(size or (0, 0), keep_aspect, data, meta.input_size, model.arch, model.output_stride)
    m = evaluate(model, ds, meta.mean, meta.std, size_t, device, batch_size, overlay_dir, progress=progress,
                 mapping=mapping)
    m["checkpoint"] = str(checkpoint)
    m["data"] = str(data)
    m["size"] = list(size_t)
    if json_out:
        write_json(json_out, m, what="report")
    return m


__all__ = ["predict_logits", "evaluate", "evaluate_checkpoint", "format_table"]
