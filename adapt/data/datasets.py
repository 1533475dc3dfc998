"""Datasets over image folders and video files.

Layout of a split directory (as in ``$SEGADAPT_DATA/camvid-day2dusk``)::

    <split>/images/<name>.png|jpg      RGB frames
    <split>/labels/<name>.png          optional; single channel, value = class id, ignore index for void
    classes.json                       in the split directory or one of its parents

Target footage for adaptation is read with :class:`ImageFolder` or, for video files and folders of videos decoded
on demand, :class:`~segadapt.adapt.data.footage.VideoFootage`; neither has a label field at all: the adaptation
entry point cannot read target labels by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segadapt.runtime.classes import ClassInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class Sample:
    """One frame moving through the joint transforms (numpy, before conversion to tensors).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: (H, W) int64 class ids (ignore index for void) or None.
        depth: (H, W) float32 normalised depth in [0, 1] (0 where invalid) or None.
        depth_valid: (H, W) bool validity mask of ``depth`` or None.
        name: identifier (file stem or ``video#frame``).
        valid: (H, W) bool, True on real image pixels and False on padding added by
            :class:`~segadapt.adapt.data.transforms.RandomCrop`; None = every pixel is real. Padded pixels are
            never pseudo-labelled, never in a loss and never in a statistic.
        fixed_pseudo_label: (H, W) int64 fixed pseudo-labels of SeCo's offline pass
            (:mod:`segadapt.adapt.methods.seco.labels`),
            ignore index where unlabelled (and on crop padding), or None. Made by the model, never a target label.
    """

    image: np.ndarray
    label: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None
    depth_valid: Optional[np.ndarray] = None
    name: str = ""
    valid: Optional[np.ndarray] = None
    fixed_pseudo_label: Optional[np.ndarray] = None  # (H, W) int64 SeCo labels (never a target label), see below

    def to_tensors(self) -> dict:
        """Convert to a dict of tensors: ``image`` (3, H, W) uint8, ``valid`` (H, W) bool (always present: all True
        when the sample has no ``valid`` mask), ``label`` (H, W) int64, ``depth`` (1, H, W) float32, ``depth_valid``
        (1, H, W) bool; the absent optional fields are left out."""
        out = {"image": torch.from_numpy(np.ascontiguousarray(self.image.transpose(2, 0, 1))), "name": self.name}
        valid = self.valid if self.valid is not None else np.ones(self.image.shape[:2], bool)
        out["valid"] = torch.from_numpy(np.ascontiguousarray(valid, bool))
        if self.label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(self.label)).long()
        if self.fixed_pseudo_label is not None:
            out["fixed_pseudo_label"] = torch.from_numpy(np.ascontiguousarray(self.fixed_pseudo_label)).long()
        if self.depth is not None:
            out["depth"] = torch.from_numpy(np.ascontiguousarray(self.depth, np.float32))[None]
            valid = self.depth_valid if self.depth_valid is not None else np.ones_like(self.depth, bool)
            out["depth_valid"] = torch.from_numpy(np.ascontiguousarray(valid))[None]
        return out


def find_images(directory: str | Path) -> List[Path]:
    """Sorted image files (png/jpg/jpeg/bmp) directly in ``directory``.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it holds no image file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such image directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB.

    Raises:
        ValueError: the file is missing or cannot be decoded as an image (the message names it).
    """
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot read as an image (missing, corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """Read a single-channel label PNG as (H, W) int64 class ids and validate its values.

    Raises:
        ValueError: unreadable file, more than one channel, or a value that is neither a class id in
            ``[0, num_classes)`` nor ``ignore_index`` (the message names the file and the values).
    """
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"{path}: cannot read label image")
    if lab.ndim != 2:
        raise ValueError(f"{path}: label must be single-channel class ids, got shape {lab.shape}")
    lab = lab.astype(np.int64)
    bad = (lab >= num_classes) & (lab != ignore_index) | (lab < 0)
    if bad.any():
        vals = sorted(set(np.unique(lab[bad]).tolist()))[:10]
        raise ValueError(
            f"{path}: label values {vals} are outside the class range [0, {num_classes}) "
            f"and are not the ignore index {ignore_index}"
        )
    return lab


def find_classes_json(directory: str | Path) -> Path:
    """Find ``classes.json`` in ``directory`` or its parents (up to 3 levels).

    Raises:
        FileNotFoundError: none found.
    """
    d = Path(directory).resolve()
    for p in [d, *list(d.parents)[:3]]:
        if (p / "classes.json").is_file():
            return p / "classes.json"
    raise FileNotFoundError(f"no classes.json in {directory} or its parents")


def _image_dir(split_dir: Path) -> Path:
    return split_dir / "images" if (split_dir / "images").is_dir() else split_dir


class ImageFolder(Dataset):
    """Unlabelled frames of a split directory (``<split>/images``) or of a plain folder of images.

    This class has no label field and never opens a file under ``labels/``: it is the target dataset of the
    source-free adaptation.

    Args:
        root: the split directory or a folder of images.
        transform: callable ``Sample -> Sample`` (joint transforms) or None.
        depth_provider: callable ``(image_path, image) -> (depth (H, W) float32 in [0, 1], valid (H, W) bool)``
            or None.

    Items: dict with ``image`` (3, H, W) uint8, ``valid`` (H, W) bool (False on crop padding), ``name`` and, with a
    depth provider, ``depth`` (1, H, W) float32 and ``depth_valid`` (1, H, W) bool.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, depth_provider: Callable | None = None):
        self.root = Path(root)
        self.files = find_images(_image_dir(self.root))
        self.transform = transform
        self.depth_provider = depth_provider

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Sample:
        path = self.files[i]
        img = read_image(path)
        s = Sample(image=img, name=path.stem)
        if self.depth_provider is not None:
            s.depth, s.depth_valid = self.depth_provider(path, img)
        return s

    def __getitem__(self, i: int) -> dict:
        s = self.load(i)
        if self.transform is not None:
            s = self.transform(s)
        return s.to_tensors()


class LabeledImageFolder(Dataset):
    """Frames with labels: ``<split>/images/<name>.*`` paired with ``<split>/labels/<name>.png``.

    Args:
        root: the split directory.
        classes: the label set; by default read from ``classes.json`` in ``root`` or its parents.
        transform: callable ``Sample -> Sample`` or None.
        image_dir, label_dir: other folders than ``root/images`` and ``root/labels`` (e.g. KITTI's ``image_2`` and
            ``label_camvid11``).

    Items: dict with ``image`` (3, H, W) uint8, ``label`` (H, W) int64 (ignore index for void), ``valid`` (H, W) bool
    (False on crop padding) and ``name``.

    Raises:
        FileNotFoundError: no ``labels/`` directory, or an image without its label file (named in the message).
    """

    def __init__(self, root: str | Path, classes: ClassInfo | None = None, transform: Callable | None = None,
                 image_dir: str | Path | None = None, label_dir: str | Path | None = None):
        self.root = Path(root)
        self.files = find_images(Path(image_dir) if image_dir else _image_dir(self.root))
        self.classes = classes or ClassInfo.load(find_classes_json(self.root))
        label_dir = Path(label_dir) if label_dir else self.root / "labels"
        self.labels = []
        for f in self.files:
            lp = label_dir / (f.stem + ".png")
            if not lp.is_file():
                raise FileNotFoundError(f"{lp}: label missing for image {f}")
            self.labels.append(lp)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Sample:
        img = read_image(self.files[i])
        lab = read_label(self.labels[i], self.classes.num_classes, self.classes.ignore_index)
        if lab.shape != img.shape[:2]:
            raise ValueError(f"{self.labels[i]}: label size {lab.shape} differs from image size {img.shape[:2]}")
        return Sample(image=img, label=lab, name=self.files[i].stem)

    def __getitem__(self, i: int) -> dict:
        s = self.load(i)
        if self.transform is not None:
            s = self.transform(s)
        return s.to_tensors()


def read_fixed_pseudo_label(directory: str | Path, name: str, hw: Tuple[int, int]) -> np.ndarray:
    """Read ``<directory>/<name>.png`` (SeCo's fixed pseudo-labels, single channel) as (H, W) int64 at the frame's
    size ``hw`` (nearest neighbour; the pass writes them at the training size).

    Raises:
        ValueError: the file is missing or not a single-channel image (the message names it).
    """
    path = Path(directory) / f"{name}.png"
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None or lab.ndim != 2:
        raise ValueError(f"{path}: missing or not a single-channel label image; delete {directory} to rebuild it")
    if lab.shape != tuple(hw):
        lab = cv2.resize(lab, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return lab.astype(np.int64)


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video file by its suffix (mp4, avi, mov, mkv, webm, m4v)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def collate(items: Sequence[dict]) -> dict:
    """Stack dataset items into a batch: tensors are stacked on a new dim 0, names become a list."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else list(vals)
    return out
