"""Small file helpers shared by the runtime, export and checkpoints: atomic writes, JSON objects with clear errors,
and image-file listing (torch-free: ``segadapt predict`` and the demo use these without the ``adapt`` extra)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List

#: Image file suffixes the runtime reads (OpenCV decodes them all).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Video file suffixes ``segadapt predict`` treats as video (decoded by OpenCV's FFmpeg backend).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def read_json_object(path: str | Path, what: str) -> dict:
    """Read a JSON file that must hold an object.

    Args:
        path: the file.
        what: what the file is, for messages (e.g. "model metadata").

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a JSON object (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return d


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically: a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def list_images(source: str | Path) -> List[Path]:
    """The image files to segment for ``source``: the file itself, or the sorted images of a folder (of its
    ``images/`` sub-folder when it has one, as a dataset split does).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: the folder holds no image file (the message names it and the suffixes looked for).
    """
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such image or folder")
    d = p / "images" if (p / "images").is_dir() else p
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
