"""Inference and adaptation sizes at the target's aspect ratio (``--keep-aspect SHORT``), torch-free.

A model trained at 120x160 on CamVid (4:3) meets KITTI frames of 3.3:1; stretched to 120x160 they lose most of
their width. ``--keep-aspect 120`` keeps the short side at 120 pixels and sets the long side from the frames' median
aspect, rounded to a multiple of the model's stride (KITTI 187x621 -> 120x400 for a stride-16 model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

from segadapt.runtime.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES, list_images


def size_multiple(arch: str, output_stride: int) -> int:
    """What the sides of an input should be a multiple of: the network's coarsest feature stride.

    DeepLabV3-MobileNetV2 downsamples to 1/``output_stride`` (8, 16 or 32) and dilates below that; SegFormer's
    last encoder stage is at 1/32 (its logits are at 1/4).
    """
    return 32 if arch == "segformer" else int(output_stride)


def frames_aspect(source: str | Path, max_frames: int = 64) -> float:
    """Median width / height of a folder of images (``<dir>/images`` or ``<dir>``, image headers of up to
    ``max_frames`` files spread over the folder) or of a video file (of the first video of a folder of videos).

    Raises:
        FileNotFoundError: no such folder or file.
        ValueError: no image files, or a frame / video that cannot be read (named).
    """
    p = Path(source)
    img_dir = p / "images" if (p / "images").is_dir() else p
    if p.is_dir() and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in img_dir.iterdir()):
        videos = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        p = videos[0] if videos else p
    if p.suffix.lower() in VIDEO_SUFFIXES:
        import cv2

        cap = cv2.VideoCapture(str(p))
        w, h = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        cap.release()
        if not (w > 0 and h > 0):
            raise ValueError(f"{p}: cannot read the video's frame size")
        return w / h
    from PIL import Image

    files = list_images(p)
    step = max(1, len(files) // max_frames)
    ratios = []
    for f in files[::step][:max_frames]:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except OSError as e:
            raise ValueError(f"{f}: cannot read the image ({e})") from None
        ratios.append(w / h)
    ratios.sort()
    return ratios[len(ratios) // 2]


def keep_aspect_size(short: int, aspect: float, multiple: int) -> Tuple[int, int]:
    """(H, W) with the short side ``short`` pixels and the long side ``short * aspect`` (or ``/ aspect``) rounded
    to the nearest multiple of ``multiple`` (at least one multiple).

    Args:
        short: short side in pixels (>= 1), kept as given.
        aspect: width / height of the frames (> 0).
        multiple: the long side's rounding step in pixels (>= 1).
    """
    if short < 1 or aspect <= 0 or multiple < 1:
        raise ValueError(f"keep_aspect_size needs short >= 1, aspect > 0, multiple >= 1; got {short}, {aspect}, "
                         f"{multiple}")
    long_ = short * (aspect if aspect >= 1 else 1 / aspect)
    long_ = max(multiple, int(round(long_ / multiple)) * multiple)
    return (short, long_) if aspect >= 1 else (long_, short)


def resolve_size(size: Sequence[int], keep_aspect: int, frames: str | Path, default: Sequence[int], arch: str,
                 output_stride: int) -> Tuple[int, int]:
    """The (H, W) to run at: ``size`` when set (not 0 0), else ``keep_aspect`` from the frames' aspect, else
    ``default`` (the checkpoint's input size).

    Raises:
        ValueError: both ``size`` and ``keep_aspect`` are set; unreadable frames (from :func:`frames_aspect`).
    """
    if size and all(size) and keep_aspect:
        raise ValueError("--size and --keep-aspect exclude each other; give one")
    if size and all(size):
        return int(size[0]), int(size[1])
    if keep_aspect:
        return keep_aspect_size(keep_aspect, frames_aspect(frames), size_multiple(arch, output_stride))
    return int(default[0]), int(default[1])
