"""Checks of input and output paths before any model loads (torch-free: ``predict`` and the demo use them too).

Each check raises :class:`InputError` (a ``ValueError``) with one line that names the file (and the flag it came
from) and the problem, so the command line prints it as ``error: ...`` with exit status 2. Problems that do not stop
a run (a renamed class) are returned or logged as warnings instead.

- Images: a zero-byte, truncated or undecodable file. Small sets (up to :data:`FULL_DECODE_BYTES` in all) are
  decoded in full with OpenCV; larger ones are checked at header level (Pillow reads the size without decoding, and
  the file's last bytes must hold the format's end marker: PNG ``IEND``, JPEG ``FFD9``).
- Videos: a file that does not open, holds no video stream, or is truncated (PyAV counts the packets present
  against the frames its container lists, without decoding).
- Models: a metadata file beside an ONNX graph that disagrees with the copy inside the graph, or logits whose class
  count differs from the metadata's.
- Outputs: a file where a folder is needed (and the other way round), a folder that cannot be written (probed with a
  temporary file, so a read-only mount is found even when running as root), too little free space for what will be
  written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from segadapt.runtime.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES

LOG = logging.getLogger("segadapt")

#: image sets up to this many bytes are decoded in full; larger ones get the header + end-marker check
FULL_DECODE_BYTES = 64 * 2**20
_END_MARKERS = {".png": b"IEND", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


class InputError(ValueError):
    """A bad input or output path or value, found before any work: one line naming the file or flag."""


def _with_flag(msg: str, flag: str) -> str:
    return f"{msg} ({flag})" if flag else msg


def mb(n: float) -> str:
    """Bytes as a short human figure (``12.3 MB``, ``4.1 GB``)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# -- images ----------------------------------------------------------------------------------------------------

def _header_size(path: Path) -> Tuple[int, int]:
    """(H, W) from the file's header (Pillow, no decoding), then a check of the format's end marker.

    Raises:
        ValueError: unreadable header or missing end marker (truncated file).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError("not a readable image (unknown format or damaged header)") from None
    marker = _END_MARKERS.get(path.suffix.lower())
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))  # room for trailing metadata after the marker
            if marker not in f.read():
                raise ValueError("truncated (no end-of-image marker)")
    return h, w


def _decoded_size(path: Path) -> Tuple[int, int]:
    """(H, W) of the fully decoded image (OpenCV). Raises ValueError when it does not decode."""
    import cv2
    import numpy as np

    data = np.fromfile(str(path), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ValueError("cannot be decoded as an image (corrupt or unsupported format)")
    return int(img.shape[0]), int(img.shape[1])


def image_sizes(files: Sequence[Path], flag: str = "", full: Optional[bool] = None) -> Dict[Path, Tuple[int, int]]:
    """Check that every image file decodes; returns ``{file: (H, W)}`` in pixels.

    Args:
        files: image files.
        flag: the option the files came from (named in the message).
        full: decode every file (True), check headers and end markers only (False), or decide by the total size
            (None: full up to :data:`FULL_DECODE_BYTES`). Without Pillow every file is decoded (OpenCV).

    Raises:
        InputError: the first bad file with its problem, and how many more are bad.
    """
    files = [Path(f) for f in files]
    sizes = {f: f.stat().st_size if f.is_file() else -1 for f in files}
    if full is None:
        full = sum(max(0, s) for s in sizes.values()) <= FULL_DECODE_BYTES
    if not full:
        try:
            import PIL  # noqa: F401
        except ImportError:
            full = True
    out: Dict[Path, Tuple[int, int]] = {}
    bad: List[str] = []
    for f in files:
        if sizes[f] < 0:
            bad.append(f"{f}: missing")
        elif sizes[f] == 0:
            bad.append(f"{f}: empty file (0 bytes)")
        else:
            try:
                out[f] = _decoded_size(f) if full else _header_size(f)
            except ValueError as e:
                bad.append(f"{f}: {e}")
    if bad:
        more = f"; {len(bad) - 1} more bad image(s) in that folder" if len(bad) > 1 else ""
        raise InputError(_with_flag(bad[0] + more, flag))
    return out


def folder_images(folder: str | Path, flag: str, what: str = "image folder") -> List[Path]:
    """The sorted image files of a folder (of its ``images/`` sub-folder when it has one).

    Raises:
        InputError: no such folder, a file where a folder is needed, or no image in it.
    """
    p = Path(folder)
    if not p.exists():
        raise InputError(_with_flag(f"{p}: no such {what}", flag))
    if not p.is_dir():
        raise InputError(_with_flag(f"{p}: is a file, a folder ({what}) is needed", flag))
    d = p / "images" if (p / "images").is_dir() else p
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(_with_flag(f"{d}: no image files ({', '.join(IMAGE_SUFFIXES)})", flag))
    return files


# -- videos ----------------------------------------------------------------------------------------------------

@dataclass
class VideoProbe:
    """What a video file's container says and holds: ``listed`` frames (0 if the container does not say),
    ``present`` frames (packets with data), ``fps``, ``width``/``height`` in pixels, ``seconds``."""

    listed: int
    present: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return (self.listed or self.present) / self.fps if self.fps > 0 else 0.0


def probe_video(path: str | Path) -> VideoProbe:
    """Read a video's container (PyAV; packets are counted, not decoded: about 0.03 s for a 9 s 960x540 clip).

    Raises:
        InputError: empty file, not a video, no video stream.
    """
    import av

    p = Path(path)
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file (0 bytes)")
    level = av.logging.get_level()
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own "partial file" lines: the message below says it
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise InputError(f"{p}: holds no video stream")
            vs = c.streams.video[0]
            fps = float(vs.average_rate or vs.guessed_rate or 0.0)
            n = 0
            try:
                for pkt in c.demux(vs):
                    n += pkt.size > 0
            except av.error.FFmpegError:
                pass  # damaged data: what was read so far is what is there
            return VideoProbe(int(vs.frames or 0), n, fps, int(vs.codec_context.width or 0),
                              int(vs.codec_context.height or 0))
    except av.error.FFmpegError as e:
        raise InputError(f"{p}: not a readable video ({e.strerror or type(e).__name__})") from None
    finally:
        av.logging.set_level(level)


def check_video(path: str | Path, flag: str, max_frames: int = 0) -> VideoProbe:
    """A video file that exists, opens and holds every frame its container lists (or the first ``max_frames``).

    Raises:
        InputError: missing, empty, not a video, no frame, or truncated: ``clip.mp4: truncated: the container lists
            221 frames, only 65 are in the file (--source)``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(_with_flag(f"{p}: no such video file", flag))
    try:
        v = probe_video(p)
    except InputError as e:
        raise InputError(_with_flag(str(e), flag)) from None
    if v.present == 0:
        raise InputError(_with_flag(f"{p}: no video frame in the file", flag))
    need = min(v.listed, max_frames) if max_frames and v.listed else v.listed
    if need and v.present < need:
        raise InputError(_with_flag(f"{p}: truncated or damaged: the container lists {v.listed} frames, only "
                                    f"{v.present} are in the file", flag))
    return v


def is_video_path(path: str | Path) -> bool:
    """Whether ``path`` names a video file by its suffix."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# -- exported models -------------------------------------------------------------------------------------------

def _logits_classes(model_path: Path) -> Optional[int]:
    """Class count of an ONNX graph's logits output (B, K, h, w) from its declared shape, None if not declared."""
    try:
        import onnx
    except ImportError:
        return None
    g = onnx.load(str(model_path), load_external_data=False).graph
    dims = g.output[0].type.tensor_type.shape.dim if g.output else []
    return int(dims[1].dim_value) if len(dims) == 4 and dims[1].HasField("dim_value") else None


def check_model_file(model_path: str | Path, flag: str = "--model"):
    """An exported model whose metadata agrees with itself: sidecar vs the copy inside an ONNX graph, and the
    logits' class count; returns its :class:`~segadapt.runtime.metadata.ModelMetadata` (nothing is loaded into a
    backend).

    A class count that differs is an error (overlays would be drawn with the wrong legend); the same count with other
    names is a warning (a renamed class).

    Raises:
        InputError: missing or empty file, corrupt graph or metadata, or disagreeing class counts.
    """
    from segadapt.runtime.backends import BackendError
    from segadapt.runtime.metadata import ModelMetadata, metadata_path
    from segadapt.runtime.predictor import _embedded_metadata, load_metadata

    p = Path(model_path)
    if not p.exists():
        raise InputError(_with_flag(f"{p}: model file not found", flag))
    if not p.is_file() or p.stat().st_size == 0:
        what = "empty file (0 bytes)" if p.is_file() else "is a folder, not a model file"
        raise InputError(_with_flag(f"{p}: {what}", flag))
    try:
        meta = load_metadata(p)
        side = metadata_path(p)
        emb = _embedded_metadata(p) if p.suffix.lower() == ".onnx" and side.is_file() else None
    except (BackendError, ValueError, OSError) as e:
        raise InputError(_with_flag(str(e), flag)) from None
    if emb is not None:
        inner = ModelMetadata.from_dict(json.loads(emb), str(p))
        if inner.num_classes != meta.num_classes:
            raise InputError(_with_flag(f"{side}: names {meta.num_classes} classes, the graph {p.name} was exported "
                                        f"with {inner.num_classes} ({', '.join(inner.classes)}); delete or fix the "
                                        f"metadata file", flag))
        if list(inner.classes) != list(meta.classes):
            LOG.warning(f"warning: {side}: class names differ from the graph's own metadata "
                        f"({_renamed(inner.classes, meta.classes)}); the metadata file's names are shown")
    if meta.output_kind == "logits" and p.suffix.lower() == ".onnx":
        k = _logits_classes(p)
        if k is not None and k != meta.num_classes:
            raise InputError(_with_flag(f"{p}: the graph outputs {k} class logits, its metadata names "
                                        f"{meta.num_classes} classes", flag))
    return meta


def _renamed(a: Sequence[str], b: Sequence[str]) -> str:
    pairs = [f"{x!r} -> {y!r}" for x, y in zip(a, b) if x != y]
    return ", ".join(pairs[:3]) + (" ..." if len(pairs) > 3 else "")


def compare_classes(a: Sequence[str], a_name: str, b: Sequence[str], b_name: str, flag: str = "") -> None:
    """Two label sets must have the same class count (else :class:`InputError` naming both and ``flag``); differing
    names with the same count are logged as a warning."""
    if len(a) != len(b):
        raise InputError(_with_flag(f"{a_name} has {len(a)} classes, {b_name} has {len(b)}", flag))
    if list(a) != list(b):
        LOG.warning(f"warning: class names of {a_name} and {b_name} differ ({_renamed(a, b)}); ids are used as "
                    f"they are")


# -- outputs ---------------------------------------------------------------------------------------------------

def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(d: Path, what: Path, flag: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".segadapt-write-test-", dir=str(d))
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(_with_flag(f"{what}: cannot write there ({e.strerror or e})", flag)) from None


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A folder the command will write into: not an existing file, and writable (or creatable: its nearest existing
    parent is a writable folder). Nothing is created.

    Raises:
        InputError: naming the path and ``flag``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(_with_flag(f"{p}: is a file, an output folder is needed", flag))
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise InputError(_with_flag(f"{p}: cannot be created, {anc} is a file", flag))
    _probe_writable(anc, p, flag)
    return p


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file the command will write: not an existing folder, in a writable (or creatable) folder.

    Raises:
        InputError: naming the path and ``flag``.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(_with_flag(f"{p}: is a folder, an output file name is needed", flag))
    check_output_dir(p.parent if str(p.parent) else Path("."), flag)
    return p


def check_free_space(path: str | Path, need_bytes: float, flag: str, what: str = "the outputs") -> None:
    """Enough free space on the disk that will hold ``path`` for ``need_bytes`` (an estimate; 10 % is added).

    Raises:
        InputError: ``runs/x: needs about 52.0 MB free for the checkpoints, 3.1 MB free on that disk (--out)``.
    """
    free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    need = need_bytes * 1.1
    if free < need:
        raise InputError(_with_flag(f"{path}: needs about {mb(need)} free for {what}, {mb(free)} free on that disk",
                                    flag))
