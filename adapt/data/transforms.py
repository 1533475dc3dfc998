"""Joint geometric transforms: image, label, depth (with its validity mask) and the image validity mask move together.

Images are resized bilinearly (area when shrinking); labels, depth and validity masks with nearest neighbour so
that no class id or depth value is invented across a boundary. The image validity mask ``Sample.valid`` is False
on the padding that :class:`RandomCrop` adds (padded pixels are never pseudo-labelled). Photometric
augmentation acts on the image only and lives in :mod:`adapt.augment` (batched, on the training device).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Sequence, Tuple

import cv2
import numpy as np

from segadapt.adapt.data.datasets import Sample

_PIXEL_FIELDS = ("label", "depth", "depth_valid", "valid",  # (H, W) arrays that follow the image's geometry
                 "fixed_pseudo_label")


def _resize_sample(s: Sample, h: int, w: int) -> Sample:
    ih, iw = s.image.shape[:2]
    if (ih, iw) == (h, w):
        return s
    interp = cv2.INTER_AREA if h < ih and w < iw else cv2.INTER_LINEAR
    out = replace(s, image=cv2.resize(s.image, (w, h), interpolation=interp))
    if s.label is not None:
        out.label = cv2.resize(s.label.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    if s.depth is not None:
        out.depth = cv2.resize(s.depth.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    if s.depth_valid is not None:
        out.depth_valid = cv2.resize(s.depth_valid.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    if s.valid is not None:
        out.valid = cv2.resize(s.valid.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    if s.fixed_pseudo_label is not None:
        out.fixed_pseudo_label = cv2.resize(s.fixed_pseudo_label.astype(np.int32), (w, h),
                                            interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return out


class Compose:
    """Apply transforms ``Sample -> Sample`` in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, s: Sample) -> Sample:
        for t in self.transforms:
            s = t(s)
        return s


class Resize:
    """Resize to a fixed (H, W) in pixels."""

    def __init__(self, size: Tuple[int, int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, s: Sample) -> Sample:
        return _resize_sample(s, *self.size)


class RandomScale:
    """Rescale by a factor drawn uniformly from ``[min_scale, max_scale]`` (both sides by the same factor)."""

    def __init__(self, min_scale: float = 0.75, max_scale: float = 1.5):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = min_scale, max_scale

    def __call__(self, s: Sample) -> Sample:
        f = random.uniform(self.min_scale, self.max_scale)
        h, w = s.image.shape[:2]
        return _resize_sample(s, max(1, round(h * f)), max(1, round(w * f)))


class RandomCrop:
    """Crop a random (H, W) window; pads first when the frame is smaller.

    Padding (bottom and right): image 0, label ``ignore_index``, depth 0 with ``depth_valid`` False, and the image
    validity mask ``valid`` False (created all True first when the sample has none).
    """

    def __init__(self, size: Tuple[int, int], ignore_index: int = 255):
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index = ignore_index

    def __call__(self, s: Sample) -> Sample:
        ch, cw = self.size
        h, w = s.image.shape[:2]
        ph, pw = max(0, ch - h), max(0, cw - w)
        if ph or pw:
            s = replace(s, image=np.pad(s.image, ((0, ph), (0, pw), (0, 0))))
            if s.label is not None:
                s.label = np.pad(s.label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
            if s.fixed_pseudo_label is not None:
                s.fixed_pseudo_label = np.pad(s.fixed_pseudo_label, ((0, ph), (0, pw)),
                                              constant_values=self.ignore_index)
            if s.depth is not None:
                s.depth = np.pad(s.depth, ((0, ph), (0, pw)))
            valid = s.depth_valid if s.depth_valid is not None else (np.ones((h, w), bool) if s.depth is not None else None)
            if valid is not None:
                s.depth_valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
            real = s.valid if s.valid is not None else np.ones((h, w), bool)
            s.valid = np.pad(real, ((0, ph), (0, pw)), constant_values=False)
            h, w = s.image.shape[:2]
        y = random.randint(0, h - ch)
        x = random.randint(0, w - cw)
        sl = (slice(y, y + ch), slice(x, x + cw))
        out = replace(s, image=s.image[sl])
        for k in _PIXEL_FIELDS:
            v = getattr(s, k)
            if v is not None:
                setattr(out, k, v[sl])
        return out


class RandomHFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, s: Sample) -> Sample:
        if random.random() >= self.p:
            return s
        out = replace(s, image=s.image[:, ::-1])
        for k in _PIXEL_FIELDS:
            v = getattr(s, k)
            if v is not None:
                setattr(out, k, v[:, ::-1])
        return out


def train_transform(crop: Tuple[int, int], base_size: Tuple[int, int] | None, scale: Tuple[float, float],
                    ignore_index: int, flip: bool = True) -> Compose:
    """The geometric training pipeline: optional resize to ``base_size`` (H, W), random scale, random crop, flip."""
    ts: list = []
    if base_size is not None:
        ts.append(Resize(base_size))
    if scale != (1.0, 1.0):
        ts.append(RandomScale(*scale))
    ts.append(RandomCrop(crop, ignore_index))
    if flip:
        ts.append(RandomHFlip(0.5))
    return Compose(ts)
