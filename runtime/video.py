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

import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import cv2
import numpy as np

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        self.frames = 0
        self.size = None

    def _open(self, h: int, w: int) -> None:
        self.size = (h - h % 2, w - w % 2)
        if self.codec == "h264":
            import av
            from fractions import Fraction

            self._av = av.open(str(self.path), mode="w")
            self._stream = self._av.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height = self.size[1], self.size[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": self.preset}
        else:
            self._cv = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                       (self.size[1], self.size[0]))
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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

    def to_dict(self) -> dict:
        return {"frames": self.frames, "seconds": self.seconds, "fps": self.fps, "source_fps": self.source_fps,
                "codec": self.codec, "output": self.output, "stage_ms": self.stage_ms}


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
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    if max_frames:
        total = min(total, max_frames) if total else max_frames
    in_q: "queue.Queue" = queue.Queue(maxsize=queue_size)
    out_q: "queue.Queue" = queue.Queue(maxsize=queue_size)
    errors: list = []
    stop = threading.Event()
    if class_map_dir is not None:
        Path(class_map_dir).mkdir(parents=True, exist_ok=True)

    def reader() -> None:
        n = 0
        try:
            while not stop.is_set() and (not max_frames or n < max_frames):
                ok, bgr = cap.read()
                if not ok:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                t = time.perf_counter()
                x, boxes = predictor.preprocess([rgb])
                if not _put(in_q, (rgb, x, boxes[0], (time.perf_counter() - t) * 1e3), stop.is_set):
                    break
                n += 1
        except Exception as e:  # surfaced to the caller below
            name = f"camera {source}" if str(source).isdigit() else str(source)
            errors.append(_failure(e, f"{name}: reading the video failed at frame {n}"))
        finally:
            cap.release()
            _put(in_q, _END, stop.is_set)

    writer = VideoWriter(out_path, src_fps, codec, preset=preset)

    def write_loop() -> None:
        idx = 0
        try:
            while True:
                item = out_q.get()  # the calling thread always ends the queue with _END while this thread runs
                if item is _END:
                    break
                idx, frame, cm = item
                writer.write(predictor.overlay(frame, cm, alpha))
                if class_map_dir is not None:
                    f = Path(class_map_dir) / f"{idx:06d}.png"
                    if not cv2.imwrite(str(f), cm):
                        raise OSError(f"{f}: cannot write the class map")
                idx += 1
        except Exception as e:  # surfaced to the caller below
            errors.append(_failure(e, f"{out_path}: writing the video failed at frame {idx}"))
            stop.set()
        finally:
            try:
                writer.close()
            except Exception as e:  # flushing the encoder can fail too (full disk)
                if not errors:
                    errors.append(_failure(e, f"{out_path}: writing the video failed at the end ({idx} frames)"))
                stop.set()

    t0 = time.perf_counter()
    rt = threading.Thread(target=reader, daemon=True)
    wt = threading.Thread(target=write_loop, daemon=True)
    rt.start()
    wt.start()
    stage = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
    done = 0
    bs = max(1, min(batch_size, predictor.max_batch))
    ended = False
    failed = True  # an exception in this thread (not an interrupt) also removes the partial video

    def stopped() -> bool:  # the writer failed (it sets stop) or is gone: nothing will take frames any more
        return stop.is_set() or not wt.is_alive()

    try:
        while not ended and not stopped():
            batch = []
            while len(batch) < bs:
                item = _get(in_q, lambda: stopped() or not rt.is_alive())
                if item is _END:
                    ended = True
                    break
                batch.append(item)
            if not batch or stopped():
                break
            x = batch[0][1] if len(batch) == 1 else np.concatenate([b[1] for b in batch])
            preds = predictor.infer_prepared(x, [b[2] for b in batch], [b[0].shape[:2] for b in batch],
                                             sum(b[3] for b in batch) / len(batch))
            for (frame, *_), pred in zip(batch, preds):
                if not _put(out_q, (done, frame, pred.class_map), stopped):
                    break
                for k in stage:
                    stage[k] += pred.timings.get(k, 0.0)
                done += 1
            if progress:
                progress(done, total)
        failed = False
    except KeyboardInterrupt:
        failed = False
        raise
    finally:
        stop.set()
        rt.join()  # its queue puts give up within _POLL_S once stop is set
        _put(out_q, _END, lambda: not wt.is_alive())
        wt.join()
        if failed or errors:
            Path(out_path).unlink(missing_ok=True)
    if errors:
        raise errors[0]
    if done == 0:
        Path(out_path).unlink(missing_ok=True)
        raise ValueError(f"{source}: no decodable frame")
    secs = time.perf_counter() - t0
    return VideoReport(frames=done, seconds=secs, fps=done / secs if secs > 0 else 0.0, source_fps=src_fps,
                       codec=writer.codec, output=str(out_path),
                       stage_ms={k: v / done for k, v in stage.items()})
