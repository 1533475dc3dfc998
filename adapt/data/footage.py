"""Footage at scale: frames of long videos and of many video files, read on demand in flat memory.

:class:`VideoFootage` is a map-style dataset over one video file, a folder of videos or a list of both. It never
decodes a video into memory: an index of ``(video, timestamp)`` pairs is built from each container's metadata
(frame count, duration, average frame rate: nothing is decoded; one packet scan, still without decoding, when the
metadata does not say), thinned by ``stride`` (every n-th frame) and ``budget`` (at most that many frames per video,
spread evenly over it), and sharded between data-parallel ranks (``rank``/``world_size``: disjoint contiguous
ranges). Item ``i`` is decoded when asked for: PyAV seeks to the keyframe at or before its timestamp and decodes
forward to it (or simply decodes forward when the previous request of that worker was a little earlier in the same
video, as a sequential pass is). Each process keeps a small LRU of open containers (``max_open``), so memory does
not grow with the number or the length of the videos, and random access (the shuffled order of
:func:`~segadapt.adapt.data.sampling.resumable_loader`) works.

Options, off by default [our design, not from a paper; the defaults are untuned]:

* ``skip_duplicates``: drop a candidate frame whose 32-pixel-wide grayscale thumbnail differs from the last kept
  frame's by less than this mean absolute difference (fraction of the 0-255 range; e.g. 0.01): a parked camera then
  contributes its distinct moments only. The thumbnails need decoded pixels, so this option costs one sequential
  (threaded) decode pass over each video when the dataset is built; with ``cache_dir`` the resulting index is stored
  and reused.
* ``cache_dir``: decoded frames are stored at the output size (``size``) as PNG files, one folder per video file
  (keyed by its path, size and modification time, and the output size) and read from there on later requests. This
  pays when the same frames are read many times in random order (self-training epochs), at about 0.1 MB of disk per
  frame at 240x320 (0.2 MB at 360x480; a dash-cam frame). Entries are written under a temporary name and renamed (no fsync: a damaged entry fails to
  decode and is decoded again from the video).

Frames come out as :class:`~segadapt.adapt.data.datasets.Sample` (``image`` (H, W, 3) uint8 RGB, ``name``
``<video stem>#<frame number, 6 digits>``) and items, after the joint transform, as the dict of
:meth:`Sample.to_tensors` (``image`` (3, H, W) uint8, ``valid`` (H, W) bool, ``name``): the same as the
image-folder target dataset.
There is no label field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from torch.utils.data import Dataset

from segadapt.adapt.data.datasets import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Sample

PathLike = str | os.PathLike
THUMB_WIDTH = 32  # pixels; the duplicate test's grayscale thumbnail keeps the video's aspect
# Decoders a forked process (a DataLoader worker) inherited from its parent. They are never used and never freed
# there: freeing FFmpeg's codec state waits on locks that the parent's threads held at the fork (a deadlock).
_INHERITED: list = []
# (video key, stride, threshold) -> the kept (frame numbers, pts) of the near-duplicate pass, for this process
_DISTINCT: dict = {}


def find_videos(folder: PathLike) -> List[Path]:
    """Sorted video files (mp4, avi, mov, mkv, webm, m4v) directly in ``folder``.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: it holds no video file (the message names the folder and the suffixes).
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder of videos")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files


def is_video_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder that holds video files and no image (neither directly nor in ``images/``)."""
    d = Path(path)
    if not d.is_dir():
        return False
    img_dir = d / "images" if (d / "images").is_dir() else d
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in img_dir.iterdir()):
        return False
    return any(f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES for f in d.iterdir())


def expand_sources(source: PathLike | Sequence[PathLike]) -> List[Path]:
    """The video files of a video file, a folder of videos, or a list of both (in the order given).

    Raises:
        FileNotFoundError / ValueError: a missing path, a folder without videos, or a file that is not a video by
            its suffix (named).
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("no footage given (empty list of videos)")
    out: List[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out.extend(find_videos(p))
        elif not p.exists():
            raise FileNotFoundError(f"{p}: no such video file or folder")
        elif p.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{p}: not a video file by its suffix ({', '.join(VIDEO_SUFFIXES)})")
        else:
            out.append(p)
    return out


@contextlib.contextmanager
def _quiet_ffmpeg() -> Iterator[None]:
    """Silence FFmpeg's own log lines (our errors name the file and the problem in one line)."""
    import av

    level = av.logging.get_level()
    av.logging.set_level(av.logging.PANIC)
    try:
        yield
    finally:
        av.logging.set_level(level)


@dataclass(frozen=True)
class VideoMeta:
    """What indexing needs of one video: ``frames`` (count), ``rate`` (average frames/s), ``time_base`` (seconds
    per pts unit), ``start`` (pts of the first frame), and ``pts`` (int64 timestamps of every frame when they came
    from a packet scan, else None: frame ``k`` is then at ``start + k / rate`` seconds)."""

    path: Path
    frames: int
    rate: Fraction
    time_base: Fraction
    start: int
    pts: Optional[np.ndarray] = None

    def frame_pts(self, k: np.ndarray) -> np.ndarray:
        """(n,) int64 timestamps (pts units) of frame numbers ``k``."""
        k = np.asarray(k, np.int64)
        if self.pts is not None:
            return self.pts[k]
        per_frame = 1 / (self.rate * self.time_base)  # pts units per frame (exact fraction)
        num, den = per_frame.numerator, per_frame.denominator
        return self.start + (k * num + den // 2) // den  # rounded to the nearest pts unit

    @property
    def half_frame(self) -> float:
        """Half a frame interval in pts units: how far a decoded frame may sit before its timestamp."""
        return float(1 / (2 * self.rate * self.time_base))


def _scan_pts(container, stream) -> np.ndarray:
    """Sorted pts of the stream's packets that hold data (demuxing only, nothing is decoded)."""
    pts = [pkt.pts for pkt in container.demux(stream) if pkt.size > 0 and pkt.pts is not None]
    return np.array(sorted(pts), np.int64)


def probe_video(path: PathLike, scan: bool = False) -> VideoMeta:
    """Index one video from its container: frame count from the stream's metadata, else from its duration and
    average rate; a packet scan (no decoding) when neither is known, or when ``scan`` asks for one (timestamps
    of the packets themselves, for variable frame rates).

    Raises:
        ValueError: missing or empty file, not a video, no video stream, or no frame (one line naming the file).
    """
    import av

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such video file")
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file (0 bytes), not a video")
    try:
        with _quiet_ffmpeg(), av.open(str(p)) as c:
            if not c.streams.video:
                raise ValueError(f"{p}: holds no video stream")
            vs = c.streams.video[0]
            tb = Fraction(vs.time_base) if vs.time_base else Fraction(1, 1_000_000)
            rate = Fraction(vs.average_rate or vs.guessed_rate or 0)
            start = int(vs.start_time or 0)
            n = int(vs.frames or 0)
            if not n and rate and vs.duration:
                n = int(round(vs.duration * tb * rate))
            elif not n and rate and c.duration:
                n = int(round(Fraction(c.duration, 1_000_000) * rate))
            pts = None
            if scan or not n or not rate:
                pts = _scan_pts(c, vs)
                n = len(pts)
                rate = rate or (Fraction(n - 1) / ((pts[-1] - pts[0]) * tb) if n > 1 and pts[-1] > pts[0] else
                                Fraction(25))
    except av.error.FFmpegError as e:
        raise ValueError(f"{p}: not a readable video ({e.strerror or type(e).__name__})") from None
    if n < 1:
        raise ValueError(f"{p}: no video frame in the file")
    return VideoMeta(p, n, rate, tb, start, pts)


def spread(n: int, budget: int) -> np.ndarray:
    """(min(n, budget),) int64 indices into ``range(n)`` spread evenly, the first one 0; ``budget`` 0 = all."""
    if not budget or budget >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(budget, dtype=np.int64) * n) // budget


def shard(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The ``[lo, hi)`` range of ``n`` items that rank ``rank`` of ``world_size`` reads: contiguous, disjoint,
    covering ``range(n)``, sizes differing by at most one.

    Raises:
        ValueError: ``world_size`` < 1, ``rank`` outside ``[0, world_size)``, or fewer items than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if n < world_size:
        raise ValueError(f"the footage has {n} frames to read, fewer than the {world_size} ranks")
    return rank * n // world_size, (rank + 1) * n // world_size


def thumbnail(frame) -> np.ndarray:
    """(h, 32) float32 grayscale thumbnail in [0, 1] of a PyAV frame (h keeps the aspect, >= 1)."""
    h = max(1, round(THUMB_WIDTH * frame.height / max(1, frame.width)))
    g = frame.reformat(width=THUMB_WIDTH, height=h, format="gray", interpolation="AREA").to_ndarray()
    return g.astype(np.float32) / 255.0


def distinct_frames(meta: VideoMeta, stride: int, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """Frames of every ``stride``-th candidate that are not near-duplicates of the last kept one.

    One sequential, threaded decode pass over the video; a candidate is kept when the mean absolute difference of
    its thumbnail (:func:`thumbnail`) from the last kept frame's is at least ``threshold`` (fraction of the 0-255
    range). The first frame is always kept.

    Returns:
        (frame numbers (n,) int64, pts (n,) int64) of the kept frames, in decode (presentation) order.

    Raises:
        ValueError: the video cannot be decoded (one line naming the file).
    """
    import av

    frames, pts, last = [], [], None
    k = -1
    try:
        with _quiet_ffmpeg(), av.open(str(meta.path)) as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            for f in c.decode(vs):
                k += 1
                if k % stride or f.pts is None:
                    continue
                th = thumbnail(f)
                if last is None or float(np.abs(th - last).mean()) >= threshold:
                    frames.append(k)
                    pts.append(f.pts)
                    last = th
    except av.error.FFmpegError as e:
        if not frames:
            raise ValueError(f"{meta.path}: cannot decode ({e.strerror or type(e).__name__})") from None
    if not frames:
        raise ValueError(f"{meta.path}: no decodable frame in the video")
    return np.array(frames, np.int64), np.array(pts, np.int64)


def _video_key(path: Path) -> str:
    """A folder name for a video file's cache entries: stem + hash of (resolved path, size, modification time)."""
    st = path.stat()
    h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{h}"


def _write_replace(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name in the same folder, then rename it to ``path`` (no fsync)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Decoder:
    """One open video file: its container and where decoding stands (the last decoded frame).

    ``frame_at(pts)`` returns the first frame whose timestamp is at least ``pts`` minus half a frame interval: the
    decoder decodes forward from where it stands when that is at most ``forward`` pts units ahead, and otherwise
    seeks to the keyframe at or before ``pts`` first (seeking further back, up to the file's start, when a container
    without a precise index lands after it).
    """

    def __init__(self, meta: VideoMeta, threads: int):
        import av

        self.meta = meta
        with _quiet_ffmpeg():
            self.container = av.open(str(meta.path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "SLICE"
        self.stream.codec_context.thread_count = threads
        self.frames = None  # the decode iterator since the last seek
        self.last = None  # the last decoded frame
        self.decoded = self.seeks = 0

    def close(self) -> None:
        """Close the container (the decoder's buffers go with it)."""
        self.frames = self.last = None
        self.container.close()

    def _next(self):
        """The next decoded frame with a timestamp (kept as ``last``), None at the end of the stream."""
        for f in self.frames:
            if f.pts is not None:
                self.decoded += 1
                self.last = f
                return f
        self.frames = self.last = None
        return None

    def _seek_before(self, target: int, half: float) -> None:
        """Seek so that the first decoded frame is at or before ``target`` (or is the file's first frame)."""
        one_s = max(1, int(1 / self.meta.time_base))
        back = 0
        for attempt in range(6):
            at = self.meta.start if attempt == 5 else max(self.meta.start, target - back)
            self.container.seek(int(at), stream=self.stream, backward=True, any_frame=False)
            self.seeks += 1
            self.frames = self.container.decode(self.stream)
            f = self._next()
            if f is None or f.pts <= target + half or at <= self.meta.start:
                return
            back = one_s << attempt

    def frame_at(self, target: int, forward: int):
        """The PyAV frame at timestamp ``target`` (pts units).

        Raises:
            ValueError: the stream ends before ``target`` or cannot be decoded there (one line naming the file and
                the time).
        """
        import av

        half = self.meta.half_frame
        last = self.last
        try:
            if last is not None and target - half <= last.pts <= target + half:
                return last
            if last is None or last.pts > target or target - last.pts > forward:
                self._seek_before(target, half)
            f = self.last
            while f is not None and f.pts < target - half:
                f = self._next()
        except av.error.FFmpegError as e:
            self.frames = self.last = None
            raise ValueError(f"{self.meta.path}: cannot decode at {float(target * self.meta.time_base):.3f} s "
                             f"({e.strerror or type(e).__name__})") from None
        if f is None:
            raise ValueError(f"{self.meta.path}: no frame at {float(target * self.meta.time_base):.3f} s: the video "
                             f"ends earlier than its container says (truncated or damaged?)")
        return f


class VideoFootage(Dataset):
    """Frames of one video, a folder of videos or a list of both, decoded on demand (see the module docstring).

    Args:
        source: a video file, a folder of video files, or a list of files and folders.
        stride: candidate frames are every ``stride``-th frame of each video (>= 1).
        budget: at most this many frames per video, spread evenly over its candidates (0 = all).
        size: (H, W) in pixels to resize decoded frames to (swscale area filter), or None for the video's size.
        transform: joint transform ``Sample -> Sample`` (the training transform) or None.
        skip_duplicates: near-duplicate threshold in [0, 1) (0 = off; see the module docstring; costs one
            decode pass per video when the dataset is built).
        cache_dir: folder for the per-video cache of decoded frames (and of the duplicate index), or None.
        rank, world_size: this process reads the rank-th of ``world_size`` disjoint contiguous ranges of the
            frames (data-parallel training; the ranges' lengths differ by at most one).
        max_open: open containers kept per process (LRU; each holds its demuxer index and decoder buffers).
        decode_threads: decoder threads per open container (slice threading).
        forward_s: decode forward instead of seeking when the next request is at most this many seconds after
            the last decoded frame of that video.

    Items: dict with ``image`` (3, H, W) uint8, ``valid`` (H, W) bool (False on crop padding) and ``name``
    ``<stem>#<frame number>``. ``stats`` counts, in this
    process, ``decoded`` frames, ``seeks``, ``cache_hits`` and ``cache_writes``.

    Raises:
        ValueError / FileNotFoundError: bad arguments, or a missing, unreadable or empty video (one line naming the
            file), when the dataset is built; ValueError from ``__getitem__`` when a frame cannot be decoded.
    """

    def __init__(self, source: PathLike | Sequence[PathLike], stride: int = 1, budget: int = 0,
                 size: Tuple[int, int] | None = None, transform: Callable | None = None,
                 skip_duplicates: float = 0.0, cache_dir: PathLike | None = None, rank: int = 0,
                 world_size: int = 1, max_open: int = 4, decode_threads: int = 1, forward_s: float = 1.0):
        if stride < 1 or budget < 0 or max_open < 1 or decode_threads < 0 or forward_s < 0:
            raise ValueError(f"need stride >= 1, budget >= 0, max_open >= 1, decode_threads >= 0, forward_s >= 0; "
                             f"got {stride}, {budget}, {max_open}, {decode_threads}, {forward_s}")
        if not 0.0 <= skip_duplicates < 1.0:
            raise ValueError(f"skip_duplicates must be in [0, 1), got {skip_duplicates}")
        self.stride, self.budget, self.skip_duplicates = stride, budget, float(skip_duplicates)
        self.size = (int(size[0]), int(size[1])) if size else None
        self.transform, self.max_open = transform, max_open
        self.decode_threads, self.forward_s = decode_threads, forward_s
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.stats: Counter = Counter()
        self._open: "OrderedDict[int, _Decoder]" = OrderedDict()
        self._pid = os.getpid()
        self._cache_ok = True
        self._keys: dict = {}  # video id -> cache folder name
        self.metas = [probe_video(p) for p in expand_sources(source)]
        video, frame, pts = self._index()
        lo, hi = shard(len(frame), rank, world_size)
        self._video, self._frame, self._pts = video[lo:hi], frame[lo:hi], pts[lo:hi]

    # -- index ------------------------------------------------------------------------------------------------
    def _index(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(video ids int32, frame numbers int64, pts int64) of every kept frame of every video, in order."""
        vids, frames, ptss = [], [], []
        for v, meta in enumerate(self.metas):
            if self.skip_duplicates:
                f, p = self._distinct(meta)
            else:
                f = np.arange(0, meta.frames, self.stride, dtype=np.int64)
                p = meta.frame_pts(f)
            keep = spread(len(f), self.budget)
            frames.append(f[keep])
            ptss.append(p[keep])
            vids.append(np.full(len(keep), v, np.int32))
        return np.concatenate(vids), np.concatenate(frames), np.concatenate(ptss)

    def _distinct(self, meta: VideoMeta) -> Tuple[np.ndarray, np.ndarray]:
        """:func:`distinct_frames` of one video: remembered in this process (a run builds its target dataset more
        than once), and read from / stored in the cache folder when there is one."""
        key = _video_key(meta.path)
        memo = (key, self.stride, self.skip_duplicates)
        if memo in _DISTINCT:
            return _DISTINCT[memo]
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / key / f"distinct-s{self.stride}-t{self.skip_duplicates!r}.json"
            try:
                d = json.loads(path.read_text())
                return np.array(d["frames"], np.int64), np.array(d["pts"], np.int64)
            except (OSError, ValueError, KeyError):
                pass
        f, p = _DISTINCT[memo] = distinct_frames(meta, self.stride, self.skip_duplicates)
        if path is not None:
            self._cache_write(path, json.dumps({"frames": f.tolist(), "pts": p.tolist()}).encode())
        return f, p

    def __len__(self) -> int:
        return len(self._frame)

    def frame_ids(self) -> List[Tuple[str, int]]:
        """``(video path, frame number)`` of every item, in item order."""
        return [(str(self.metas[v].path), int(k)) for v, k in zip(self._video, self._frame, strict=True)]

    # -- decoding ---------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # open containers stay in the process that opened them
        return state

    def _decoder(self, v: int) -> _Decoder:
        """The open decoder of video ``v`` (LRU of at most ``max_open``; a forked worker starts its own)."""
        if self._pid != os.getpid():  # inherited across fork: not ours to use, and not ours to free
            _INHERITED.append(self._open)
            self._open, self._pid = OrderedDict(), os.getpid()
        dec = self._open.get(v)
        if dec is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            dec = self._open[v] = _Decoder(self.metas[v], self.decode_threads)
        self._open.move_to_end(v)
        return dec

    def close(self) -> None:
        """Close the open containers of this process."""
        if self._pid != os.getpid():
            _INHERITED.append(self._open)  # see _INHERITED
            self._open, self._pid = OrderedDict(), os.getpid()
            return
        for dec in self._open.values():
            dec.close()
        self._open.clear()

    def _decode(self, v: int, pts: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB frame of video ``v`` at ``pts``, at ``size`` when set."""
        dec = self._decoder(v)
        d0, s0 = dec.decoded, dec.seeks
        forward = int(self.forward_s / dec.meta.time_base)
        f = dec.frame_at(pts, forward)
        self.stats["decoded"] += dec.decoded - d0
        self.stats["seeks"] += dec.seeks - s0
        if self.size is None:
            return f.to_ndarray(format="rgb24")
        h, w = self.size
        return f.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()

    # -- cache ------------------------------------------------------------------------------------------------
    def _cache_path(self, v: int, k: int) -> Optional[Path]:
        if self.cache_dir is None or not self._cache_ok:
            return None
        sub = f"{self.size[0]}x{self.size[1]}" if self.size else "full"
        if v not in self._keys:
            self._keys[v] = _video_key(self.metas[v].path)
        return self.cache_dir / self._keys[v] / sub / f"{k:07d}.png"

    def _cache_write(self, path: Path, data: bytes) -> None:
        """Store a cache entry; on a write error warn once and stop caching in this process."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_replace(path, data)
            self.stats["cache_writes"] += 1
        except OSError as e:
            self._cache_ok = False
            warnings.warn(f"{path}: cannot write the footage cache ({e.strerror or e}); caching stops", stacklevel=2)

    def load(self, i: int) -> Sample:
        """Frame ``i`` as a :class:`Sample` (``image`` (H, W, 3) uint8 RGB), from the cache or decoded.

        Raises:
            IndexError: ``i`` out of range. ValueError: the frame cannot be decoded (names the file).
        """
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        v, k, pts = int(self._video[i]), int(self._frame[i]), int(self._pts[i])
        cp = self._cache_path(v, k)
        img = None
        if cp is not None and cp.is_file():
            bgr = cv2.imread(str(cp), cv2.IMREAD_COLOR)
            if bgr is not None:
                self.stats["cache_hits"] += 1
                img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if img is None:
            img = self._decode(v, pts)
            if cp is not None:
                ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if ok:
                    self._cache_write(cp, png.tobytes())
        return Sample(image=img, name=f"{self.metas[v].path.stem}#{k:06d}")

    def __getitem__(self, i: int) -> dict:
        s = self.load(i)
        if self.transform is not None:
            s = self.transform(s)
        return s.to_tensors()


__all__ = ["VideoFootage", "VideoMeta", "probe_video", "find_videos", "is_video_folder", "expand_sources", "spread",
           "shard", "distinct_frames", "thumbnail"]
