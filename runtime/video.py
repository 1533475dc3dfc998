"""Video in, overlay video out: decoding, inference and encoding overlap in a bounded pipeline.

A reader thread decodes frames (OpenCV) and preprocesses them (resize to the model size) into a bounded queue, the
calling thread batches them through the :class:`~segadapt.runtime.predictor.Predictor`'s backend, and a writer
thread blends overlays and encodes them. For the best throughput on a busy CPU, build the predictor with
``spin=False``. The queues are bounded, so memory stays flat however long the video. Output is H.264 (``yuv420p``,
playable in browsers) through PyAV's libx264 when PyAV is installed, otherwise MPEG-4 part 2 through OpenCV with a
warning (pip's OpenCV cannot write H.264).

Every queue operation waits with a timeout and gives up when the thread on the other side has stopped, so a failing
reader or writer (a corrupt stream, a full disk) ends the run with one error instead of blocking it forever.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import cv2
import numpy as np

from segadapt.runtime.files import free_bytes, temp_path, write_error
from segadapt.runtime.predictor import Predictor

_END = object()
_POLL_S = 0.1  # how often a blocked queue operation checks whether the other side has stopped


def _put(q: "queue.Queue", item, give_up: Callable[[], bool]) -> bool:
    """Put ``item``, waiting while the queue is full; False (item dropped) once ``give_up()`` is true."""
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            if give_up():
                return False


def _get(q: "queue.Queue", give_up: Callable[[], bool]):
    """Get an item, waiting while the queue is empty; ``_END`` once it is empty and ``give_up()`` is true."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if give_up():
                try:
                    return q.get_nowait()  # put just before the producer stopped
                except queue.Empty:
                    return _END


def _failure(e: BaseException, what: str) -> Exception:
    """One error for a failed stage, ``<what>: <cause>``: an OSError (same errno) for an OSError, a ValueError for a
    ValueError, else a RuntimeError; the cause is chained."""
    msg = f"{what}: {str(e) or type(e).__name__}"
    if isinstance(e, OSError):
        err: Exception = OSError(msg)
        err.errno = e.errno
    elif isinstance(e, ValueError):
        err = ValueError(msg)
    else:
        err = RuntimeError(msg)
    err.__cause__ = e
    return err


class VideoWriter:
    """Write RGB frames to a video file.

    Args:
        path: output file (``.mp4``).
        fps: frames per second.
        codec: ``h264`` (PyAV/libx264, browser-playable) or ``mp4v`` (OpenCV). ``auto``: h264 when PyAV is
            installed, else mp4v with a warning.
        crf: x264 constant rate factor (quality; lower is better, 18-28 usual).
        preset: x264 speed preset. ``ultrafast`` (default) leaves the most CPU to inference: a 960x540 frame took
            4.1 ms to encode with it and 8.0 ms with ``superfast`` on a 2-core CPU (measured); files are larger.

    Frames must all have the same size; odd sizes are cropped by one pixel for yuv420p.

    Raises:
        RuntimeError: the file cannot be opened for writing.
    """

    def __init__(self, path: Union[str, Path], fps: float, codec: str = "auto", crf: int = 23,
                 preset: str = "ultrafast"):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise (write_error(self.path, e, what="video") or e) from None
        self.tmp = temp_path(self.path)  # renamed to ``path`` by commit(); a failed video never replaces one
        self.expected_frames: Optional[int] = None  # for the space estimate of a failed write
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.crf = crf
        self.preset = preset
        if codec == "auto":
            try:
                import av  # noqa: F401

                codec = "h264"
            except ImportError:
                warnings.warn("PyAV is not installed: writing MPEG-4 part 2 (mp4v), which browsers do not play; "
                              "pip install av for H.264")
                codec = "mp4v"
        self.codec = codec
        self._av = None
        self._cv = None
        self._cv_used = False
        self.frames = 0
        self.size = None

    def _open(self, h: int, w: int) -> None:
        self.size = (h - h % 2, w - w % 2)
        if self.codec == "h264":
            import av
            from fractions import Fraction

            self._av = av.open(str(self.tmp), mode="w")
            self._stream = self._av.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height = self.size[1], self.size[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": self.preset}
        else:
            self._cv = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                       (self.size[1], self.size[0]))
            self._cv_used = True
            if not self._cv.isOpened():
                raise RuntimeError(f"{self.path}: cannot open for writing with codec {self.codec}")

    def write(self, rgb: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if self.size is None:
            self._open(*rgb.shape[:2])
        h, w = self.size
        rgb = rgb[:h, :w]
        if self._av is not None:
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for pkt in self._stream.encode(frame):
                self._av.mux(pkt)
        else:
            self._cv.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Flush and close the file (closed even when flushing fails, e.g. on a full disk; the error is raised)."""
        if self._av is not None:
            container, self._av = self._av, None
            try:
                for pkt in self._stream.encode():
                    container.mux(pkt)
            finally:
                container.close()
        if self._cv is not None:
            self._cv.release()
            self._cv = None

    def needed_bytes(self) -> int:
        """Estimated bytes of the whole video: written so far, scaled to ``expected_frames`` when known."""
        size = self.tmp.stat().st_size if self.tmp.exists() else 0
        if self.frames and self.expected_frames and self.expected_frames > self.frames:
            size = int(size * self.expected_frames / self.frames)
            if self.size is not None:  # encoders buffer frames: at least ~1/30 of the raw frames (x264 ultrafast)
                size = max(size, self.expected_frames * self.size[0] * self.size[1] * 3 // 30)
        return size

    def error(self, e: BaseException, where: str) -> Exception:
        """The error to report for a failed write: one line naming the video and the space needed on a full disk,
        an I/O error or a read-only folder (:func:`~segadapt.runtime.files.write_error`), else ``<where>: <cause>``."""
        return write_error(self.path, e, self.needed_bytes() or None, "video") or _failure(e, where)

    def commit(self) -> None:
        """Close the file and rename it to ``path`` (replacing an older video only now, when this one is whole).

        Raises:
            ArtefactWriteError: the file system is full (OpenCV drops frames silently there) or the rename failed.
        """
        try:
            self.close()
            if not self.tmp.exists():
                return  # no frame was written: nothing to publish
            free = free_bytes(self.tmp)
            if self._cv_used and free is not None and free < 1 << 16:
                raise OSError(errno.ENOSPC, "No space left on device (the encoder may have dropped frames)")
            os.replace(self.tmp, self.path)
        except BaseException as e:
            err = self.error(e, f"{self.path}: writing the video failed")
            self.discard()
            raise err from None

    def discard(self) -> None:
        """Close the file (ignoring errors) and remove it; ``path`` keeps what it held before."""
        try:
            self.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.commit()  # an interrupted video keeps the frames done
            return
        needed = self.needed_bytes()
        self.discard()
        err = write_error(self.path, exc, needed or None, "video") if isinstance(exc, Exception) else None
        if err is not None:  # a full disk or read-only folder: one line naming the video and the space needed
            raise err from None


@dataclass
class VideoReport:
    """What :func:`segment_video` did: frames, wall time, throughput and mean per-stage times (ms/frame)."""

    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    source_fps: float = 0.0
    codec: str = ""
    output: str = ""
    stage_ms: dict = field(default_factory=dict)
    backend: str = ""  # the backend and precision that ran it, e.g. "openvino 2026.4.1 [cpu, bf16]"

    def to_dict(self) -> dict:
        return {"frames": self.frames, "seconds": self.seconds, "fps": self.fps, "source_fps": self.source_fps,
                "codec": self.codec, "output": self.output, "stage_ms": self.stage_ms, "backend": self.backend}


def open_capture(source: Union[str, int, Path]) -> cv2.VideoCapture:
    """Open a video file or a camera index (an int, or a string of digits).

    Raises:
        ValueError: the source cannot be opened (the message names it).
    """
    src = int(source) if isinstance(source, int) or (isinstance(source, str) and source.isdigit()) else str(source)
    cap = cv2.VideoCapture(src)
    if not cap.isOpened():
        kind = "camera" if isinstance(src, int) else "video file"
        raise ValueError(f"{source}: cannot open as a {kind}")
    return cap


def segment_video(predictor: Predictor, source: Union[str, int, Path], out_path: Union[str, Path],
                  alpha: float = 0.5, batch_size: int = 1, class_map_dir: Optional[Union[str, Path]] = None,
                  max_frames: Optional[int] = None, queue_size: int = 16, codec: str = "auto",
                  preset: str = "ultrafast", progress: Optional[Callable[[int, int], None]] = None) -> VideoReport:
    """Segment a video file or camera and write the overlay video (and optionally the class maps as PNGs).

    Args:
        predictor: the model.
        source: video file or camera index.
        out_path: output video (H.264 .mp4 when PyAV is installed).
        alpha: overlay opacity in [0, 1].
        batch_size: frames per inference call (capped by the model's batch).
        class_map_dir: if set, write ``<frame index>.png`` single-channel class maps there.
        max_frames: stop after this many frames (needed for cameras, which never end).
        queue_size: bound of the decode and encode queues (frames in flight).
        codec, preset: output codec and x264 preset, see :class:`VideoWriter`.
        progress: callback ``(frames_done, total_or_0)``.

    Returns:
        a :class:`VideoReport`.

    Raises:
        ValueError: the source cannot be opened or holds no frame.
        OSError: reading the source or writing the output failed, e.g. ``<out_path>: writing the video failed at
            frame 12: [Errno 28] No space left on device`` (same errno as the cause; a ValueError or RuntimeError
            of the same form for other causes).

    When reading, inference or writing fails, the partial output video is removed (it may lack its index and not
    play, and on a full disk it holds the space); class maps already written are kept. An interrupt
    (KeyboardInterrupt) keeps the video of the frames done, closed properly.
    """
    cap = open_capture(source)
    try:
        writer = VideoWriter(out_path, cap.get(cv2.CAP_PROP_FPS) or 25.0, codec, preset=preset)
        if class_map_dir is not None:
            Path(class_map_dir).mkdir(parents=True, exist_ok=True)
    except BaseException:  # e.g. the output folder cannot be made: the capture (a camera) must not stay open
        cap.release()
        raise
    return _VideoJob(predictor, source, cap, writer, alpha, batch_size, class_map_dir, max_frames, queue_size,
                     progress).run()


class _VideoJob:
    """One run of :func:`segment_video`: a reader thread (decode + preprocess), the calling thread (inference) and a
    writer thread (overlay + encode + class maps), joined by bounded queues. Any stage that fails sets ``stop``;
    every blocked queue operation gives up within ``_POLL_S`` once the other side has stopped, so a dead stage ends
    the run with its error instead of a hang."""

    def __init__(self, predictor: Predictor, source, cap: cv2.VideoCapture, writer: VideoWriter, alpha: float,
                 batch_size: int, class_map_dir, max_frames: Optional[int], queue_size: int,
                 progress: Optional[Callable[[int, int], None]]):
        self.predictor, self.source, self.cap, self.writer = predictor, source, cap, writer
        self.alpha, self.class_map_dir, self.max_frames, self.progress = alpha, class_map_dir, max_frames, progress
        self.batch_size = max(1, min(batch_size, predictor.max_batch))
        self.src_fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.total = (min(total, max_frames) if total else max_frames) if max_frames else total
        self.listed = total  # frames the container lists (0: unknown, e.g. a camera)
        writer.expected_frames = self.total or None
        self.in_q: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self.out_q: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self.errors: list = []
        self.stop = threading.Event()
        self.stage = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
        self.done = 0
        self.rt = threading.Thread(target=self.read, daemon=True)
        self.wt = threading.Thread(target=self.write, daemon=True)

    def read(self) -> None:
        """Reader thread: decode, convert to RGB, preprocess, queue; ends the queue with ``_END``."""
        n = 0
        try:
            while not self.stop.is_set() and (not self.max_frames or n < self.max_frames):
                ok, bgr = self.cap.read()
                if not ok:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                t = time.perf_counter()
                x, boxes = self.predictor.preprocess([rgb])
                if not _put(self.in_q, (rgb, x, boxes[0], (time.perf_counter() - t) * 1e3), self.stop.is_set):
                    break
                n += 1
        except Exception as e:  # surfaced to the caller by run()
            name = f"camera {self.source}" if str(self.source).isdigit() else str(self.source)
            self.errors.append(_failure(e, f"{name}: reading the video failed at frame {n}"))
        finally:
            self.cap.release()
            _put(self.in_q, _END, self.stop.is_set)

    def write(self) -> None:
        """Writer thread: overlay and encode each (index, frame, class map) until ``_END``; close the file."""
        idx, out_path = 0, self.writer.path
        try:
            while True:
                item = self.out_q.get()  # run() always ends the queue with _END while this thread runs
                if item is _END:
                    break
                idx, frame, cm = item
                self.writer.write(self.predictor.overlay(frame, cm, self.alpha))
                if self.class_map_dir is not None:
                    f = Path(self.class_map_dir) / f"{idx:06d}.png"
                    if not cv2.imwrite(str(f), cm):
                        raise OSError(f"{f}: cannot write the class map")
                idx += 1
        except Exception as e:  # surfaced to the caller by run()
            self.errors.append(self.writer.error(e, f"{out_path}: writing the video failed at frame {idx}"))
            self.stop.set()
        finally:
            try:
                self.writer.close()
            except Exception as e:  # flushing the encoder can fail too (full disk)
                if not self.errors:
                    self.errors.append(self.writer.error(e, f"{out_path}: writing the video failed at the end "
                                                                f"({idx} frames)"))
                self.stop.set()

    def stopped(self) -> bool:
        """The writer failed (it sets ``stop``) or is gone: nothing will take frames any more."""
        return self.stop.is_set() or not self.wt.is_alive()

    def infer_all(self) -> None:
        """Calling thread: batch preprocessed frames through the backend and hand the class maps to the writer."""
        ended = False
        while not ended and not self.stopped():
            batch = []
            while len(batch) < self.batch_size:
                item = _get(self.in_q, lambda: self.stopped() or not self.rt.is_alive())
                if item is _END:
                    ended = True
                    break
                batch.append(item)
            if not batch or self.stopped():
                break
            x = batch[0][1] if len(batch) == 1 else np.concatenate([b[1] for b in batch])
            preds = self.predictor.infer_prepared(x, [b[2] for b in batch], [b[0].shape[:2] for b in batch],
                                                  sum(b[3] for b in batch) / len(batch))
            for (frame, *_), pred in zip(batch, preds):
                if not _put(self.out_q, (self.done, frame, pred.class_map), self.stopped):
                    break
                for k in self.stage:
                    self.stage[k] += pred.timings.get(k, 0.0)
                self.done += 1
            if self.progress:
                self.progress(self.done, self.total)

    def run(self) -> VideoReport:
        """Start both threads, infer, join everything, remove a partial video after a failure; the report."""
        out_path = self.writer.path
        t0 = time.perf_counter()
        self.rt.start()
        self.wt.start()
        failed = True  # an exception in this thread (not an interrupt) also removes the partial video
        try:
            self.infer_all()
            failed = False
        except KeyboardInterrupt:
            failed = False
            raise
        finally:
            self.stop.set()
            self.rt.join()  # its queue puts give up within _POLL_S once stop is set
            _put(self.out_q, _END, lambda: not self.wt.is_alive())
            self.wt.join()
            if failed or self.errors or self.done == 0:
                self.writer.discard()  # the video that was there before, if any, stays
            else:
                self.writer.commit()  # renamed over out_path only now that it is whole
        if self.errors:
            raise self.errors[0]
        if self.done == 0:
            raise ValueError(f"{self.source}: no decodable frame")
        if self.listed > 0 and self.done < self.total:  # the data ended before the container's own frame count
            warnings.warn(f"{self.source}: decoded {self.done} of the {self.total} frames the container lists "
                          f"(truncated or damaged file); {out_path} holds those {self.done}", stacklevel=2)
        secs = time.perf_counter() - t0
        return VideoReport(frames=self.done, seconds=secs, fps=self.done / secs if secs > 0 else 0.0,
                           source_fps=self.src_fps, codec=self.writer.codec, output=str(out_path),
                           stage_ms={k: v / self.done for k, v in self.stage.items()},
                           backend=self.predictor.backend.describe())
