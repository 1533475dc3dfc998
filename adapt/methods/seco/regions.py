"""SeCo stage A, Pixel Semantic Aggregation (PSA): grow sparse pixel pseudo-labels over image regions.

Zhao et al., "Semantic Connectivity-driven pseudo-labeling" (arXiv 2312.06331), as its code does it (PSA/seco_sam.py).
Two region sources:

* **SAM** (a local transformers ``SamModel``/``SamProcessor`` directory, no download): automatic masks from a grid of
  point prompts for *stuff* classes, painted with a stuff class when it holds more than ``purity`` (0.20) of the
  mask's labelled pixels; one box + two point prompts per connected component of each *thing* class, painted with
  that class (things overwrite stuff).
* **Superpixels** (scikit-image SLIC or Felzenszwalb) when no SAM checkpoint is given (our design, not the paper's:
  see docs/method-notes.md, SeCo): the same purity rule for stuff; a superpixel takes a thing class when that class
  holds more than ``thing_purity`` of its labelled pixels (superpixels take no prompts). Reported as such by the
  pass.

Label maps are (H, W) int64 class ids with ``ignore`` where unlabelled; the output starts all ``ignore``, so a pixel
no region covers stays unlabelled even if the input labelled it (as in SeCo).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch

__all__ = ["SamRegions", "class_counts", "keep_thing_pixels", "local_entropy", "paint_by_purity", "psa_masks",
           "psa_superpixels", "superpixels", "thing_prompts"]


def superpixels(image: np.ndarray, method: str = "slic", n_segments: int = 150, compactness: float = 10.0,
                scale: float = 100.0) -> np.ndarray:
    """Superpixels of an (H, W, 3) uint8 RGB frame with scikit-image: (H, W) int64 region ids from 0.

    Raises:
        ImportError: scikit-image is missing (``pip install 'segadapt[seco]'``).
        ValueError: unknown ``method``.
    """
    try:
        from skimage.segmentation import felzenszwalb, slic
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("SeCo's superpixel regions need scikit-image: pip install 'segadapt[seco]'") from e
    if method == "slic":
        seg = slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    elif method == "felzenszwalb":
        seg = felzenszwalb(image, scale=scale, sigma=0.8, min_size=20, channel_axis=-1)
    else:
        raise ValueError(f"unknown superpixel method {method!r}; use slic or felzenszwalb")
    return np.unique(seg, return_inverse=True)[1].reshape(seg.shape).astype(np.int64)


def class_counts(regions: np.ndarray, labels: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """(R, K) int64: per region id (0..R-1 in ``regions``, (H, W) int), the number of its pixels labelled each class
    in ``labels`` ((H, W) int, ``ignore`` pixels not counted)."""
    r = int(regions.max()) + 1
    ok = labels != ignore
    idx = regions[ok].astype(np.int64) * num_classes + labels[ok].astype(np.int64)
    return np.bincount(idx, minlength=r * num_classes).reshape(r, num_classes)


def paint_by_purity(counts: np.ndarray, allowed: np.ndarray, purity: float) -> np.ndarray:
    """The purity rule of SeCo's stuff aggregation for R regions at once.

    Args:
        counts: (R, K) labelled-pixel counts per region and class (:func:`class_counts`).
        allowed: (K,) bool, the classes a region may take (e.g. the stuff classes).
        purity: a region takes the allowed class with the largest share of its labelled pixels (all classes count
            in the denominator) when that share is strictly above ``purity`` (SeCo: 0.20).

    Returns:
        (R,) int64 class id per region, -1 where no allowed class passes (or the region has no labelled pixel).
    """
    total = counts.sum(1, keepdims=True)
    frac = np.where(total > 0, counts / np.maximum(total, 1), 0.0)
    frac = np.where(np.asarray(allowed, bool)[None], frac, -1.0)
    best = frac.argmax(1)
    return np.where(frac[np.arange(len(best)), best] > purity, best, -1).astype(np.int64)


def keep_thing_pixels(out: np.ndarray, labels: np.ndarray, stuff: np.ndarray, ignore: int) -> np.ndarray:
    """``out`` where it is not overruled: a pixel whose initial label is a thing class keeps that label (ours: a
    stuff region painted over a pole or a sign would otherwise absorb it). (H, W) int64."""
    lab = labels.astype(np.int64)
    thing = (lab != ignore) & (lab >= 0) & (lab < len(stuff))
    thing[thing] = ~stuff[lab[thing]]
    return np.where(thing, lab, out).astype(np.int64)


def psa_superpixels(regions: np.ndarray, labels: np.ndarray, stuff: Sequence[bool], ignore: int,
                    purity: float = 0.2, thing_purity: float = 0.5, keep_things: bool = False) -> np.ndarray:
    """PSA over a superpixel partition (our design, see docs/method-notes.md, SeCo): stuff by the purity rule, then
    things (which overwrite stuff) by ``thing_purity``.

    Args:
        regions: (H, W) int region ids 0..R-1 (:func:`superpixels`).
        labels: (H, W) int pixel pseudo-labels, ``ignore`` where unlabelled.
        stuff: (K,) per-class stuff flags.
        keep_things: pixels labelled with a thing class keep it (:func:`keep_thing_pixels`).

    Returns:
        (H, W) int64 aggregated labels, ``ignore`` where no class passed.
    """
    stuff = np.asarray(stuff, bool)
    counts = class_counts(regions, labels, len(stuff), ignore)
    cls = paint_by_purity(counts, stuff, purity)
    thing = paint_by_purity(counts, ~stuff, thing_purity)
    cls = np.where(thing >= 0, thing, cls)
    out = np.where(cls[regions] >= 0, cls[regions], ignore).astype(np.int64)
    return keep_thing_pixels(out, labels, stuff, ignore) if keep_things else out


def psa_masks(stuff_masks: Sequence[np.ndarray], thing_masks: Sequence[Tuple[int, np.ndarray]], labels: np.ndarray,
              stuff: Sequence[bool], ignore: int, purity: float = 0.2, keep_things: bool = False) -> np.ndarray:
    """PSA over SAM masks (as SeCo's code does it): each stuff mask in order (later ones overwrite earlier ones)
    takes the stuff class passing :func:`paint_by_purity`; then each ``(class, mask)`` of the thing prompts is
    painted.

    Args:
        stuff_masks: (H, W) bool masks of the automatic mask generator.
        thing_masks: (class id, (H, W) bool mask) from the box + point prompts.
        labels: (H, W) int pixel pseudo-labels; stuff: (K,) flags.

    Returns:
        (H, W) int64 aggregated labels, ``ignore`` where no mask painted.
    """
    stuff = np.asarray(stuff, bool)
    k = len(stuff)
    out = np.full(labels.shape, ignore, np.int64)
    valid = labels != ignore
    for m in stuff_masks:
        counts = np.bincount(labels[m & valid].astype(np.int64), minlength=k)[None, :k]
        c = int(paint_by_purity(counts, stuff, purity)[0])
        if c >= 0:
            out[m] = c
    for c, m in thing_masks:
        out[m] = c
    return keep_thing_pixels(out, labels, stuff, ignore) if keep_things else out


def local_entropy(labels: np.ndarray, num_classes: int, ignore: int, radius: int = 8) -> np.ndarray:
    """SeCo's local-purity map: the entropy (nats) of the class histogram in a (2 radius + 1)^2 box around each pixel,
    ``ignore`` counted as one more class. (H, W) float32, lower = purer."""
    lab = np.where(labels == ignore, num_classes, labels).astype(np.int64)
    k = 2 * radius + 1
    hist = np.stack([cv2.blur((lab == c).astype(np.float32), (k, k), borderType=cv2.BORDER_CONSTANT)
                     for c in range(num_classes + 1)], 0)
    hist = hist / np.maximum(hist.sum(0, keepdims=True), 1e-12)
    return -(hist * np.log(np.maximum(hist, 1e-12))).sum(0)


def thing_prompts(labels: np.ndarray, cls: int, num_classes: int, ignore: int, min_pixels: int = 10,
                  entropy: np.ndarray | None = None) -> List[Tuple[List[float], List[List[float]]]]:
    """Box + point prompts of SeCo for one thing class (as its code makes them): per 8-connected component of
    ``labels == cls`` with at least ``min_pixels`` pixels, the largest contour's minimum-area rectangle expanded by
    area * 1.25 / perimeter on each side (DBNet-style unclip of a rectangle), as an axis-aligned box clipped to the
    frame, and the purest pixel (:func:`local_entropy`) of each raster-order half of the component as two positive
    points (the released loop's 1-or-2-point quirk is not reproduced).

    Returns:
        list of (box [x0, y0, x1, y1], points [[x, y], [x, y]]) in pixels.
    """
    h, w = labels.shape
    n, comp, stats, _ = cv2.connectedComponentsWithStats((labels == cls).astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    ent = entropy if entropy is not None else local_entropy(labels, num_classes, ignore)
    out = []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < max(min_pixels, 2):
            continue
        m = (comp == i).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cnt = max(contours, key=cv2.contourArea)
        (cx, cy), (rw, rh), ang = cv2.minAreaRect(cnt)
        d = (rw * rh) * 1.25 / max(2 * (rw + rh), 1e-6)
        pts = cv2.boxPoints(((cx, cy), (rw + 2 * d, rh + 2 * d), ang))
        x0, y0 = np.clip(pts.min(0), 0, [w - 1, h - 1])
        x1, y1 = np.clip(pts.max(0), 0, [w - 1, h - 1])
        ys, xs = np.nonzero(m)  # raster order
        half = len(ys) // 2
        points = []
        for sl in (slice(0, half), slice(half, None)):
            j = int(np.argmin(ent[ys[sl], xs[sl]]))
            points.append([float(xs[sl][j]), float(ys[sl][j])])
        out.append(([float(x0), float(y0), float(x1), float(y1)], points))
    return out


class SamRegions:
    """SAM from a local transformers directory (``SamModel`` + ``SamProcessor``, ``local_files_only``): automatic
    masks for stuff and prompted masks for things.

    Args:
        directory: saved with ``save_pretrained`` (model and processor).
        device: torch device string.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: it holds no loadable SAM model or processor (the message names it).
    """

    def __init__(self, directory: str | Path, device: str = "cpu"):
        from transformers import SamModel, SamProcessor

        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory}: no such SAM directory (--seco.sam-dir)")
        try:
            self.model = SamModel.from_pretrained(str(directory), local_files_only=True).to(device).eval()
            self.processor = SamProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{directory}: not a transformers SAM directory (SamModel + SamProcessor): {e}") from None
        self.device = device

    @torch.no_grad()
    def _masks(self, image: np.ndarray, emb: torch.Tensor, inputs: dict, multimask: bool):
        """Run the prompt encoder + mask decoder on precomputed image embeddings; returns ((N, M, H, W) float32 mask
        logits at the frame's size, (N, M) predicted IoU)."""
        enc = self.processor(images=image, return_tensors="pt", **inputs)
        prompt = {k: v.to(self.device) for k, v in enc.items() if k.startswith("input_")}
        out = self.model(image_embeddings=emb, multimask_output=multimask, **prompt)
        logits = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), enc["original_sizes"], enc["reshaped_input_sizes"], binarize=False)[0]
        return logits.float().numpy(), out.iou_scores[0].float().cpu().numpy()

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """Image embeddings of an (H, W, 3) uint8 RGB frame, computed once per frame."""
        enc = self.processor(images=image, return_tensors="pt")
        return self.model.get_image_embeddings(enc["pixel_values"].to(self.device))

    def auto_masks(self, image: np.ndarray, emb: torch.Tensor, points_per_side: int = 16, iou_thresh: float = 0.88,
                   stability_thresh: float = 0.95, nms_iou: float = 0.7, chunk: int = 64) -> List[np.ndarray]:
        """SAM's automatic mask generation (single crop): a grid of point prompts, three masks each, kept when the
        predicted IoU and the stability score (IoU of the mask at logit thresholds +1 and -1) pass, then box NMS
        (OpenCV). Returns (H, W) bool masks, largest first (smaller masks are painted over larger ones)."""
        h, w = image.shape[:2]
        g = (np.arange(points_per_side) + 0.5) / points_per_side
        grid = [[[float(x * w), float(y * h)]] for y in g for x in g]
        masks, scores = [], []
        for i in range(0, len(grid), chunk):
            logits, iou = self._masks(image, emb, {"input_points": [grid[i:i + chunk]]}, multimask=True)
            hi, lo = (logits > 1.0).sum((-2, -1)), (logits > -1.0).sum((-2, -1))
            stab = np.where(lo > 0, hi / np.maximum(lo, 1), 0.0)
            keep = (iou > iou_thresh) & (stab > stability_thresh) & (hi > 0)
            for n, j in zip(*np.nonzero(keep)):
                masks.append(logits[n, j] > 0)
                scores.append(float(iou[n, j]))
        if not masks:
            return []
        boxes = [list(cv2.boundingRect(m.astype(np.uint8))) for m in masks]
        ranked = [float(v - min(scores)) for v in scores]  # OpenCV wants scores >= 0; the order is what counts
        keep = np.asarray(cv2.dnn.NMSBoxes(boxes, ranked, 0.0, nms_iou)).reshape(-1)
        kept = [masks[int(i)] for i in keep]
        return sorted(kept, key=lambda m: -int(m.sum()))

    def prompted_masks(self, image: np.ndarray, emb: torch.Tensor,
                       prompts: Sequence[Tuple[List[float], List[List[float]]]]) -> List[np.ndarray]:
        """One single-output mask per (box, points) prompt of :func:`thing_prompts`: (H, W) bool each."""
        if not prompts:
            return []
        boxes = [p[0] for p in prompts]
        points = [p[1] for p in prompts]
        labels = [[1] * len(p[1]) for p in prompts]
        logits, _ = self._masks(image, emb, {"input_boxes": [boxes], "input_points": [points],
                                             "input_labels": [labels]}, multimask=False)
        return [logits[i, 0] > 0 for i in range(len(prompts))]

    def psa(self, image: np.ndarray, labels: np.ndarray, stuff: Sequence[bool], ignore: int, purity: float = 0.2,
            min_pixels: int = 10, points_per_side: int = 16, iou_thresh: float = 0.88,
            stability_thresh: float = 0.95, keep_things: bool = False) -> Tuple[np.ndarray, int]:
        """PSA of one frame with SAM (as SeCo's code does it): (H, W) int64 aggregated labels and the number of SAM
        masks."""
        k = len(stuff)
        emb = self.embed(image)
        auto = self.auto_masks(image, emb, points_per_side, iou_thresh, stability_thresh)
        ent = local_entropy(labels, k, ignore)
        things = []
        for c in range(k):
            if stuff[c] or int((labels == c).sum()) <= min_pixels:
                continue
            pr = thing_prompts(labels, c, k, ignore, min_pixels, ent)
            things += [(c, m) for m in self.prompted_masks(image, emb, pr)]
        return psa_masks(auto, things, labels, stuff, ignore, purity, keep_things), len(auto) + len(things)
