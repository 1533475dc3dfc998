"""What the demo accepts as an upload: caps on size, duration, frame count and resolution, and the same checks
(and messages) as the command line for corrupt files (:mod:`segadapt.runtime.inputs`).

An upload over a cap is refused with the cap named ("this demo takes clips up to 20 s"); a corrupt one gets the
command line's one-line message with the file's own name instead of the server's temporary path. Nothing here
imports gradio: the callbacks raise :class:`DemoError`, which the app turns into ``gr.Error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segadapt.runtime.inputs import InputError, VideoProbe, check_video, image_sizes


class DemoError(ValueError):
    """Bad input for the demo; shown to the user as a readable message."""


@dataclass(frozen=True)
class UploadCaps:
    """Limits on uploads (defaults suit a CPU server; each refusal names the limit).

    Attributes:
        image_mb: largest image file, MB.
        image_pixels: largest image, width x height in pixels (decoded size).
        video_mb: largest clip file, MB.
        video_seconds: longest clip, seconds (by the container's frame count and rate).
        video_frames: most frames in a clip.
        video_pixels: largest frame of a clip, width x height in pixels.
    """

    image_mb: float = 50.0
    image_pixels: int = 4096 * 4096
    video_mb: float = 200.0
    video_seconds: float = 20.0
    video_frames: int = 1200
    video_pixels: int = 1920 * 1088

    @property
    def upload_mb(self) -> float:
        """The largest file any upload may be (the web server's own limit, above the per-kind caps)."""
        return max(self.image_mb, self.video_mb)


def _short(e: Exception, path: Path) -> str:
    """The check's message with the server's temporary path replaced by the file's name."""
    return str(e).replace(str(path), path.name)


def read_image_upload(path: str | Path, caps: UploadCaps = UploadCaps()) -> np.ndarray:
    """Check and decode an uploaded image file into (H, W, 3) uint8 RGB (an alpha channel is dropped, grey is
    repeated into 3 channels).

    Raises:
        DemoError: over ``caps.image_mb`` or ``caps.image_pixels``, or not a decodable image (the command line's
            message, e.g. ``frame.png: empty file (0 bytes)``).
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise DemoError("The uploaded image could not be found on the server; upload it again.")
    size_mb = p.stat().st_size / 1e6
    if size_mb > caps.image_mb:
        raise DemoError(f"{p.name} is {size_mb:.0f} MB; this demo takes images up to {caps.image_mb:.0f} MB.")
    try:
        h, w = image_sizes([p], full=False)[p]  # header first: the pixel cap holds before anything is decoded
    except InputError as e:
        raise DemoError(_short(e, p)) from None
    if h * w > caps.image_pixels:
        raise DemoError(f"{p.name} is {w}x{h} pixels; this demo takes images up to {caps.image_pixels / 1e6:.1f} "
                        f"megapixels.")
    img = cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DemoError(f"{p.name}: cannot be decoded as an image (corrupt or unsupported format)")
    if img.dtype != np.uint8:
        img = (img / 257).astype(np.uint8) if img.dtype == np.uint16 else np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(img, code)


def check_video_upload(path: str | Path, caps: UploadCaps = UploadCaps()) -> VideoProbe:
    """Check an uploaded clip against the caps and for damage (the command line's check); returns its probe.

    Raises:
        DemoError: over ``caps.video_mb``, ``caps.video_seconds``, ``caps.video_frames`` or ``caps.video_pixels``;
            empty, not a video, or truncated (``clip.mp4: truncated or damaged: the container lists 221 frames,
            only 65 are in the file``).
    """
    p = Path(path)
    if not p.is_file():
        raise DemoError("The uploaded video could not be found on the server; upload it again.")
    size_mb = p.stat().st_size / 1e6
    if size_mb > caps.video_mb:
        raise DemoError(f"{p.name} is {size_mb:.0f} MB; this demo takes clips up to {caps.video_mb:.0f} MB.")
    try:
        v = check_video(p, "")
    except InputError as e:
        raise DemoError(_short(e, p)) from None
    n = v.listed or v.present
    if v.seconds > caps.video_seconds:
        raise DemoError(f"{p.name} is {v.seconds:.1f} s long; this demo takes clips up to "
                        f"{caps.video_seconds:.0f} s. Cut it shorter and upload it again.")
    if n > caps.video_frames:
        raise DemoError(f"{p.name} has {n} frames; this demo takes clips of up to {caps.video_frames} frames.")
    if v.width * v.height > caps.video_pixels:
        raise DemoError(f"{p.name} is {v.width}x{v.height}; this demo takes frames up to "
                        f"{caps.video_pixels / 1e6:.1f} megapixels (1920x1080).")
    return v
