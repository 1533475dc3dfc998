"""Real frames for parity checks, calibration and benchmarks (OpenCV only: usable in torch-free processes)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np

from segadapt.runtime.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from segadapt.runtime.inputs import probe_video



def _video_frames(path: Path, n: int, size: Tuple[int, int]) -> List[np.ndarray]:
    """Up to ``n`` frames of a video, evenly spaced over it, (H, W, 3) uint8 RGB (PyAV: packets counted first, then
    one decoding pass that keeps only the chosen frames, so a long video costs no memory)."""
    import av

    total = probe_video(path).present  # packets with data, counted without decoding
    if total == 0:
        raise ValueError(f"{path}: no video frame")
    keep = set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist())
    out = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in keep:
                out.append(cv2.resize(f.to_ndarray(format="rgb24"), (size[1], size[0]), interpolation=cv2.INTER_AREA))
            if i >= max(keep):
                break
    if not out:
        raise ValueError(f"{path}: no decodable video frame")
    return out


def load_frames(folder: str | Path, n: int, size: Tuple[int, int]) -> List[np.ndarray]:
    """Up to ``n`` frames from a folder (or a split directory with ``images/``) or a video file, evenly spaced,
    resized to (H, W), as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: no such folder or file. ValueError: no readable image or frame in it (the message names it).
        segadapt.runtime.inputs.InputError: a video file that is empty or not a video.
    """
    d = Path(folder)
    if d.is_file() and d.suffix.lower() in VIDEO_SUFFIXES:
        return _video_frames(d, n, size)
    if (d / "images").is_dir():
        d = d / "images"
    if not d.is_dir():
        raise FileNotFoundError(f"{folder}: no such frame folder")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no image files")
    idx = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    out = []
    for i in dict.fromkeys(idx.tolist()):
        bgr = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{files[i]}: cannot read as an image")
        out.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size[1], size[0]), interpolation=cv2.INTER_AREA))
    return out
