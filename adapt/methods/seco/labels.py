"""SeCo as an offline, source-free pseudo-label pass before self-training (Zhao et al., arXiv 2312.06331;
"Connectivity-Driven Pseudo-Labeling Makes Stronger Cross-Domain Segmenters", NeurIPS 2024).

1. The source model after AdaBN predicts every target frame at the training size; the initial pixel pseudo-labels
   keep the most confident ``pixel_fraction`` of each class's predicted pixels over the whole footage (CBST-style;
   SeCo takes any pixel pseudo-labels as input, its examples use class-wise top fractions; the fraction is our
   design, see docs/method-notes.md, SeCo).
2. PSA (:mod:`segadapt.adapt.methods.seco.regions`) aggregates them over SAM masks or superpixels.
3. SCC (:mod:`segadapt.adapt.methods.seco.scc`) drops or relabels noisy connected components.
4. The labels are written as PNGs to ``<out>/seco_labels/`` (atomic; ``seco.json`` written last records what made
   them, and a later run with the same inputs reuses them) and travel with the frames as ``fixed_pseudo_label``;
   :func:`merge_fixed` joins them to the online pseudo-labels in each step (SeCo's route of fixed pseudo-labels in
   any self-training; the merge modes are our design, see docs/method-notes.md, SeCo).

No target label is read: the frames come from the unlabelled target dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segadapt.adapt.augment import normalize
from segadapt.adapt.data.datasets import Sample, collate, read_fixed_pseudo_label
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.methods.config import SecoConfig
from segadapt.adapt.methods.seco.regions import SamRegions, psa_superpixels, superpixels
from segadapt.adapt.methods.seco.scc import apply_decisions, extract_components, scc_decisions, train_and_score
from segadapt.adapt.typed_config import to_dict
from segadapt.runtime.files import write_atomic, write_json

__all__ = ["LABEL_DIR", "FixedLabels", "class_top_fraction", "merge_fixed", "predict_frames", "region_source",
           "run_seco", "seco_labels"]

LABEL_DIR = "seco_labels"


@torch.no_grad()
def predict_frames(model: torch.nn.Module, dataset, mean, std, device, batch_size: int = 8
                   ) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray, List[str]]:
    """The model on every frame of ``dataset`` (items ``image`` (3, H, W) uint8 at the training size, ``name``).

    Returns:
        (frames as (H, W, 3) uint8 RGB, (N, H, W) uint8 argmax (K <= 256), (N, H, W) float32 max-softmax, names).
    """
    model.eval()
    frames, preds, confs, names = [], [], [], []
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0):
        img = b["image"].to(device)
        p = F.softmax(upsample_logits(model(normalize(img, mean, std)).float(), tuple(img.shape[-2:])), 1)
        c, k = p.max(1)
        frames += list(b["image"].permute(0, 2, 3, 1).numpy())
        preds.append(k.cpu().numpy().astype(np.uint8))
        confs.append(c.cpu().numpy())
        names += list(b["name"])
    return frames, np.concatenate(preds).astype(np.uint8), np.concatenate(confs), names


def class_top_fraction(pred: np.ndarray, conf: np.ndarray, num_classes: int, fraction: float,
                       ignore: int) -> np.ndarray:
    """Keep, per class, the ``fraction`` most confident of the pixels predicted as that class over all frames.

    Args:
        pred: (N, H, W) int argmax; conf: (N, H, W) float max-probability; fraction in [0, 1].

    Returns:
        (N, H, W) int16 labels, ``ignore`` where not kept.
    """
    out = np.full(pred.shape, ignore, np.int16)
    for c in range(num_classes):
        sel = pred == c
        if not sel.any() or fraction <= 0:
            continue
        t = np.quantile(conf[sel], 1.0 - fraction)
        out[sel & (conf >= t)] = c
    return out


def region_source(cfg: SecoConfig) -> str:
    """What PSA aggregates over: ``sam`` or ``superpixels:<method>``."""
    return "sam" if cfg.sam_dir else f"superpixels:{cfg.superpixels}"


def _psa(frames: Sequence[np.ndarray], pixel: np.ndarray, stuff: Sequence[bool], cfg: SecoConfig, ignore: int,
         device: str) -> List[np.ndarray]:
    """PSA of every frame with the configured region source."""
    if cfg.sam_dir:
        sam = SamRegions(cfg.sam_dir, device)
        return [sam.psa(f, p, stuff, ignore, cfg.purity, cfg.thing_min_pixels, cfg.sam_points_per_side,
                        cfg.sam_iou_threshold, cfg.sam_stability_threshold, cfg.keep_things)[0]
                for f, p in zip(frames, pixel)]
    return [psa_superpixels(superpixels(f, cfg.superpixels, cfg.slic_segments, cfg.slic_compactness,
                                        cfg.felzenszwalb_scale), p, stuff, ignore, cfg.purity, cfg.thing_purity,
                            cfg.keep_things)
            for f, p in zip(frames, pixel)]


def seco_labels(frames: Sequence[np.ndarray], pred: np.ndarray, conf: np.ndarray, stuff: Sequence[bool],
                cfg: SecoConfig, ignore: int, mean, std, device: str = "cpu", seed: int = 0,
                log: Callable[[str], None] = print) -> Tuple[List[np.ndarray], dict]:
    """Stages 1-3 on predictions already made (:func:`predict_frames`).

    Returns:
        (per frame (H, W) int64 SeCo labels, ``ignore`` where unlabelled; a stats dict with the stages' coverage and
        the SCC component counts). The intermediate maps are in ``stats["stages"]`` ("pixel", "psa") for measurement.
    """
    k = len(stuff)
    pixel = class_top_fraction(pred, conf, k, cfg.pixel_fraction, ignore)
    psa = _psa(frames, pixel, stuff, cfg, ignore, device)
    stats = {"region_source": region_source(cfg), "coverage_pixel": float((pixel != ignore).mean()),
             "coverage_psa": float(np.mean([(m != ignore).mean() for m in psa]))}
    out = psa
    if cfg.scc:
        comps = extract_components(psa, k, ignore)
        if len(comps):
            losses, preds = train_and_score(frames, comps, k, mean, std, tuple(cfg.scc_crop), cfg.scc_iterations,
                                            cfg.scc_batch, cfg.scc_lr, cfg.scc_smoothing, device, seed)
            new = scc_decisions(losses, comps.cls, preds, cfg.scc_rule, cfg.scc_relabel)
            out = apply_decisions(comps, new, ignore)
            stats.update(components=len(comps), dropped=int((new < 0).sum()),
                         relabelled=int(((new >= 0) & (new != comps.cls)).sum()))
    stats["coverage"] = float(np.mean([(m != ignore).mean() for m in out]))
    log(f"SeCo: {stats['region_source']}; labelled share: pixel {stats['coverage_pixel']:.3f}, PSA "
        f"{stats['coverage_psa']:.3f}, final {stats['coverage']:.3f}"
        + (f"; SCC dropped {stats['dropped']} of {stats['components']} components" if "components" in stats else ""))
    stats["stages"] = {"pixel": list(pixel), "psa": psa}
    return out, stats


def run_seco(model_fn: Callable[[], torch.nn.Module], dataset, out: Path, cfg: SecoConfig, stuff: Sequence[bool],
             ignore: int, mean, std, device, fingerprint: dict, seed: int = 0,
             log: Callable[[str], None] = print) -> Path:
    """The pass of ``segadapt adapt``: write ``<out>/seco_labels/<frame name>.png`` (uint8 class ids, ``ignore``
    where unlabelled) and ``seco.json``, or reuse them when ``seco.json`` records the same inputs.

    Args:
        model_fn: returns the model to label with (the source model after AdaBN); called only when (re)building.
        dataset: the unlabelled target frames resized to the training size (items ``image``, ``name``).
        fingerprint: what else made the labels (source checkpoint hash, size, AdaBN, frames); compared on reuse.

    Returns:
        the label directory.
    """
    if not cfg.sam_dir:
        superpixels(np.zeros((8, 8, 3), np.uint8), cfg.superpixels, 4)  # scikit-image missing: fail before the work
    d = Path(out) / LABEL_DIR
    meta = d / "seco.json"
    want = {"seco": to_dict(cfg), "seed": seed, **fingerprint}
    if meta.is_file():
        try:
            have = json.loads(meta.read_text())
        except ValueError:
            have = {}
        if have.get("inputs") == json.loads(json.dumps(want)):
            log(f"SeCo: reusing {have.get('frames')} labels in {d}")
            return d
        log(f"SeCo: {d} was made from other inputs; rebuilding")
        meta.unlink()
    model = model_fn()
    frames, pred, conf, names = predict_frames(model, dataset, mean, std, device)
    labels, stats = seco_labels(frames, pred, conf, stuff, cfg, ignore, mean, std, str(device), seed, log)
    stats.pop("stages")
    d.mkdir(parents=True, exist_ok=True)
    for name, lab in zip(names, labels):
        png = cv2.imencode(".png", lab.astype(np.uint8))[1]
        write_atomic(d / f"{name}.png", png.tobytes())
    write_json(meta, {"inputs": want, "frames": len(names), "stats": stats})
    return d


class FixedLabels:
    """Joint transform that attaches ``<directory>/<sample name>.png`` as ``Sample.fixed_pseudo_label`` (resized to
    the frame, nearest) and then applies ``then`` (the training transform: resize, scale, crop with ``ignore``
    padding, flip move it with the image). Wraps any target dataset's ``transform`` (image folder or video)."""

    def __init__(self, directory: str | Path, then: Callable[[Sample], Sample] | None = None):
        self.directory, self.then = Path(directory), then

    def __call__(self, s: Sample) -> Sample:
        s.fixed_pseudo_label = read_fixed_pseudo_label(self.directory, s.name, s.image.shape[:2])
        return self.then(s) if self.then is not None else s


def merge_fixed(labels: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, fixed: torch.Tensor, mode: str,
                fill_weight: float, ignore: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join SeCo's fixed labels to one batch of online pseudo-labels (our design, see docs/method-notes.md, SeCo).

    Args:
        labels: (B, H, W) int64 online labels (``ignore`` where dropped); mask: (B, H, W) bool kept pixels;
            weights: (B, H, W) float32 loss weights; fixed: (B, H, W) int64 SeCo labels (``ignore`` where none).
        mode: ``fill`` (SeCo label where the online one is dropped, weight ``fill_weight``), ``agree`` (only pixels
            where both exist and agree, online weights) or ``replace`` (SeCo labels only, weight ``fill_weight``).

    Returns:
        (labels, mask, weights) of the same shapes and dtypes.

    Raises:
        ValueError: unknown mode.
    """
    has = fixed != ignore
    if mode == "fill":
        add = has & ~mask
        return (torch.where(add, fixed, labels), mask | add,
                torch.where(add, torch.full_like(weights, fill_weight), weights))
    if mode == "agree":
        keep = mask & has & (fixed == labels)
        return torch.where(keep, labels, torch.full_like(labels, ignore)), keep, weights * keep
    if mode == "replace":
        return (torch.where(has, fixed, torch.full_like(labels, ignore)), has,
                has.to(weights.dtype) * fill_weight)
    raise ValueError(f"unknown seco.merge mode {mode!r}; use fill, agree or replace")
