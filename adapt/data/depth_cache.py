"""Per-frame depth computed once, stored on disk, read by the dataset.

Stereo matching and depth models are slow, and a CUDA depth model crashes inside forked DataLoader workers. So the
depth of every target frame is computed ONCE in the main process, before the DataLoader starts
(:meth:`DepthCache.precompute`, with a progress bar), and stored as one ``.npz`` per frame (``depth`` (H, W)
float16 in [0, 1], ``valid`` (H, W) bool). The dataset then gets a :class:`CachedDepth` reader, which holds no
provider at all: nothing but ``np.load`` runs in the workers. A later run with the same frames and provider
settings reuses the files.

A cache file is keyed by the image's absolute path, its size and modification time, and the provider's settings
(:func:`provider_settings`), so an edited frame or a changed setting gets a new file. (Files read by the provider
itself, such as a ``files`` provider's depth maps or a ``stereo`` provider's right views, are not part of the key:
clear the folder after changing them.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segadapt.adapt.data.datasets import ImageFolder, read_image
from segadapt.runtime.files import write_atomic

CACHE_VERSION = 1  # bump when the stored format or the providers' normalisation changes


def provider_settings(provider: object) -> dict:
    """The settings that determine a provider's output: its class name and its public scalar attributes (dataclass
    fields, or plain attributes of other providers), without the device it runs on."""
    if dataclasses.is_dataclass(provider):
        attrs = {f.name: getattr(provider, f.name) for f in dataclasses.fields(provider)}
    else:
        attrs = dict(vars(provider))
    simple = (str, int, float, bool, tuple, list)
    keep = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()
            if not k.startswith("_") and k != "device" and isinstance(v, simple)}
    return {"provider": type(provider).__name__, "version": CACHE_VERSION, **keep}


class CachedDepth:
    """A depth provider that only reads the cache: ``(image_path, image (H, W, 3)) -> (depth (H, W) float32 in
    [0, 1], valid (H, W) bool)``. Safe to use in DataLoader workers (no model, no matcher).

    Args:
        cache_dir: the cache folder.
        settings: the provider settings the files were keyed with (:func:`provider_settings`).

    Raises (on call):
        FileNotFoundError: the frame was not precomputed (the message names the cache file and the frame).
        ValueError: a cache file that cannot be read or whose size differs from the image.
    """

    def __init__(self, cache_dir: str | Path, settings: dict):
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self._settings_json = json.dumps(settings, sort_keys=True)

    def path_for(self, image_path: str | Path) -> Path:
        """The cache file of ``image_path`` (which must exist): ``<stem>-<16 hex digits>.npz``."""
        p = Path(image_path).resolve()
        st = p.stat()
        key = json.dumps([str(p), st.st_size, st.st_mtime_ns, self._settings_json])
        return self.cache_dir / f"{p.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"

    def __call__(self, image_path: str | Path, image: np.ndarray):
        path = self.path_for(image_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no cached depth for {image_path} (run the precompute pass first)")
        try:
            with np.load(path, allow_pickle=False) as z:
                depth, valid = z["depth"].astype(np.float32), z["valid"].astype(bool)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: unreadable depth cache file ({e}); delete it to recompute") from None
        if depth.shape != image.shape[:2] or valid.shape != depth.shape:
            raise ValueError(f"{path}: cached depth {depth.shape} does not match {image_path} {image.shape[:2]}")
        return depth, valid


class DepthCache(CachedDepth):
    """The cache with the provider that fills it (main process only).

    Args:
        provider: a depth provider (``segadapt.adapt.data.depth``).
        cache_dir: the cache folder (created when needed).
    """

    def __init__(self, provider: Callable, cache_dir: str | Path):
        super().__init__(cache_dir, provider_settings(provider))
        self.provider = provider

    def store(self, image_path: str | Path, depth: np.ndarray, valid: np.ndarray) -> Path:
        """Write one frame's depth atomically; returns the file."""
        buf = io.BytesIO()
        np.savez_compressed(buf, depth=np.where(valid, depth, 0).astype(np.float16), valid=valid.astype(bool))
        path = self.path_for(image_path)
        write_atomic(path, buf.getvalue(), what="depth cache")
        return path

    def precompute(self, files: Iterable[Path], log: Callable[[str], None] | None = None,
                   progress: bool = True) -> int:
        """Compute and store the depth of every frame not yet cached; returns how many were computed.

        Raises:
            whatever the provider raises for a frame (missing right view, unreadable map: named in the message).
        """
        files = list(files)
        todo = [f for f in files if not self.path_for(f).is_file()]
        if log is not None:
            log(f"depth cache {self.cache_dir}: {len(files) - len(todo)} of {len(files)} frames cached, "
                f"computing {len(todo)}")
        for f in tqdm(todo, desc="depth", unit="frame", disable=not progress or not todo, dynamic_ncols=True):
            depth, valid = self.provider(f, read_image(f))
            self.store(f, depth, valid)
        return len(todo)

    def reader(self) -> CachedDepth:
        """A reader of this cache without the provider (what the dataset and its workers get)."""
        return CachedDepth(self.cache_dir, self.settings)


def prepare_depth_cache(provider: Callable, target: str | Path, cache_dir: str, out: Path,
                        log: Callable[[str], None] | None = None) -> CachedDepth:
    """Compute the depth of every target frame once (main process, progress bar) and return the cache reader the
    datasets use instead of ``provider``.

    Args:
        provider: a depth provider (``segadapt.adapt.data.depth``).
        target: the target image folder.
        cache_dir: the cache folder; empty = ``<out>/depth_cache``.
        out: the run directory.

    Raises:
        FileNotFoundError / ValueError: no target images, or what the provider raises for a frame.
    """
    cache = DepthCache(provider, Path(cache_dir) if cache_dir else Path(out) / "depth_cache")
    cache.precompute(ImageFolder(target).files, log)
    return cache.reader()
