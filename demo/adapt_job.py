"""One adaptation from the browser, run as child processes (no torch in the demo process).

:func:`prepare_footage` checks an upload against named caps (:class:`FootageCaps`) and writes up to
``keep_frames`` evenly spaced frames into a folder; :class:`AdaptJob` runs ``python -m segadapt adapt`` on that folder,
then ``python -m segadapt export`` of the adapted checkpoint with the served model's input and output (so that the new
file can replace it under a running runtime, see :mod:`segadapt.runtime.hot_swap`), each in its own process group,
and reports progress from the run's ``coverage.jsonl`` (one JSON line per step: step, share of pixels kept as
pseudo-labels, losses, coverage per class); :func:`read_selection` reads the verdict of a finished run (whether the
model it picked is expected to beat the source model). :meth:`AdaptJob.cancel` ends the child's whole process
group. A crash of a child is a failed job, never a crash of the demo.

Plain Python (numpy, OpenCV, subprocess): the Gradio tab in :mod:`segadapt.demo.adapt_tab` drives it, tests can too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import cv2

from segadapt.runtime.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from segadapt.runtime.metadata import ModelMetadata

#: modules the child processes need: the ``[adapt]`` extra (torch...) and the ``[export]`` extra (onnx...)
ADAPT_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnxslim")
INSTALL_HINT = "pip install 'segadapt[export]'  (the [export] extra includes [adapt]: torch, transformers, onnx)"


class FootageError(ValueError):
    """An upload the Adapt tab refuses; the message names the cap or the problem (shown to the user)."""


@dataclass
class FootageCaps:
    """Limits on an upload for adaptation; an upload over a cap is refused with the cap's name in the message.

    Attributes:
        max_mb: total upload size in MB (10^6 bytes).
        max_seconds: clip duration in seconds.
        max_frames: frames in the upload (a clip's frame count, or the number of images).
        keep_frames: at most this many frames, evenly spaced, are handed to the adaptation (not a refusal).
        max_width: frames wider than this are downscaled (pixels; adaptation resizes to the model size anyway).
    """

    max_mb: float = 200.0
    max_seconds: float = 120.0
    max_frames: int = 3000
    keep_frames: int = 200
    max_width: int = 640


@dataclass
class Budget:
    """How much adaptation to run: ``steps`` self-training steps (capped by ``minutes`` of wall clock, 0 = no cap),
    ``batch_size`` frames per step, on ``device`` (``cpu``, ``auto``, ``cuda``)."""

    steps: int = 40
    minutes: float = 3.0
    batch_size: int = 2
    device: str = "cpu"


#: the tab's budget presets (label -> budget); "CPU" runs in about a minute on 2 cores at CamVid's small sizes
PRESETS: Dict[str, Budget] = {
    "CPU (quick)": Budget(steps=40, minutes=3.0, batch_size=2, device="cpu"),
    "GPU": Budget(steps=1000, minutes=10.0, batch_size=8, device="auto"),
}


def missing_adapt_modules() -> List[str]:
    """The modules of :data:`ADAPT_MODULES` this Python cannot import (looked up, not imported)."""
    return [m for m in ADAPT_MODULES if importlib.util.find_spec(m) is None]


@dataclass
class Footage:
    """Frames ready for adaptation: ``folder`` holds ``frames`` images (``000000.jpg``...); ``note`` says what was
    taken from the upload."""

    folder: Path
    frames: int
    note: str

    def files(self) -> List[Path]:
        return sorted(self.folder.glob("*.jpg"))


def prepare_footage(paths: Sequence[str], out_dir: str | Path, caps: FootageCaps = FootageCaps()) -> Footage:
    """Check an upload (one video file, or image files) against ``caps`` and write its frames for adaptation.

    Args:
        paths: uploaded file paths: one clip (``.mp4``, ``.mov``...) or one or more images.
        out_dir: the job folder; frames go to ``<out_dir>/frames``.

    Returns:
        a :class:`Footage` with at most ``caps.keep_frames`` evenly spaced frames (JPEG, RGB content, at most
        ``caps.max_width`` wide).

    Raises:
        FootageError: nothing uploaded, a mix of kinds, an unreadable file, or an upload over a cap (the message
            names the cap, e.g. ``max_seconds``).
    """
    files = [Path(p) for p in (paths or []) if p]
    if not files:
        raise FootageError("No footage: upload a clip or some frames first.")
    mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
    if mb > caps.max_mb:
        raise FootageError(f"The upload is {mb:.0f} MB; the cap is {caps.max_mb:.0f} MB (max_mb).")
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    other = [f.name for f in files if f not in videos and f not in images]
    if other:
        raise FootageError(f"Not a clip or an image: {', '.join(other)} (clips: {', '.join(VIDEO_SUFFIXES)}; "
                           f"images: {', '.join(IMAGE_SUFFIXES)}).")
    if videos and (images or len(videos) > 1):
        raise FootageError("Upload one clip, or a set of frames (images), not both or several clips.")
    folder = Path(out_dir) / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    if videos:
        return _clip_frames(videos[0], folder, caps)
    if len(images) > caps.max_frames:
        raise FootageError(f"{len(images)} frames uploaded; the cap is {caps.max_frames} (max_frames).")
    pick = _spaced(len(images), caps.keep_frames)
    for i, k in enumerate(pick):
        bgr = cv2.imread(str(images[k]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FootageError(f"{images[k].name}: cannot read as an image.")
        _write_frame(folder / f"{i:06d}.jpg", bgr, caps.max_width)
    return Footage(folder, len(pick), f"{len(pick)} of {len(images)} uploaded frames")


def _spaced(n: int, k: int) -> List[int]:
    """``min(n, k)`` evenly spaced indices into ``range(n)``."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) if k > 1 else 0 for i in range(k)]


def _write_frame(path: Path, bgr, max_width: int) -> None:
    h, w = bgr.shape[:2]
    if w > max_width:
        bgr = cv2.resize(bgr, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f"{path}: cannot write the frame")


def _clip_frames(video: Path, folder: Path, caps: FootageCaps) -> Footage:
    """Frames of one clip (checked against the duration and frame-count caps before decoding it all)."""
    cap = cv2.VideoCapture(str(video))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap.isOpened() else 0
        fps = (cap.get(cv2.CAP_PROP_FPS) or 25.0) if n else 25.0
        if n <= 0:
            raise FootageError(f"{video.name}: no video frames this demo can decode (empty or not a video).")
        if n / fps > caps.max_seconds:
            raise FootageError(f"The clip is {n / fps:.1f} s long; the cap is {caps.max_seconds:.0f} s "
                               f"(max_seconds).")
        if n > caps.max_frames:
            raise FootageError(f"The clip has {n} frames; the cap is {caps.max_frames} (max_frames).")
        want = set(_spaced(n, caps.keep_frames))
        kept = 0
        for i in range(n):
            ok, bgr = cap.read()
            if not ok:
                break
            if i in want:
                _write_frame(folder / f"{kept:06d}.jpg", bgr, caps.max_width)
                kept += 1
    finally:
        cap.release()
    if kept == 0:
        raise FootageError(f"{video.name}: no frame could be decoded.")
    return Footage(folder, kept, f"{kept} frames of a {n / fps:.1f} s clip ({n} frames)")


@dataclass
class JobStatus:
    """A snapshot of an :class:`AdaptJob`.

    Attributes:
        stage: ``starting``, ``adapting``, ``exporting``, ``done``, ``failed`` or ``cancelled``.
        step, steps: self-training steps done and planned.
        kept: share of pixels kept as pseudo-labels at the last logged step, in [0, 1] (None before the first).
        losses: the last step's losses (``loss_pl``, ``loss_<term>`` of each loss term...).
        coverage: the last step's share of pseudo-labelled pixels per class name, in [0, 1].
        seconds: wall time since the start.
        message: one line for the user (the error of a failed stage, with its log file).
        onnx: the exported model when done.
    """

    stage: str = "starting"
    step: int = 0
    steps: int = 0
    kept: Optional[float] = None
    losses: Dict[str, float] = field(default_factory=dict)
    coverage: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    onnx: Optional[Path] = None

    @property
    def finished(self) -> bool:
        return self.stage in ("done", "failed", "cancelled")


class AdaptJob:
    """Adapt a checkpoint to prepared footage and export it like the served model, in child processes.

    Args:
        checkpoint: the source model (segadapt checkpoint directory) the served model was exported from.
        footage: frames from :func:`prepare_footage`.
        work_dir: the job folder (``adapt/`` run, ``adapt.log``, ``export.log``).
        like: metadata of the served model: the export takes its input size, layout, output kind and class dtype.
        out_dir, name: the new model is written to ``<out_dir>/<name>.onnx`` (+ ``<name>.json``).
        budget: steps, minutes, batch size and device.
        python: the interpreter of the children (default: this one).
    """

    def __init__(self, checkpoint: str | Path, footage: Footage, work_dir: str | Path, like: ModelMetadata,
                 out_dir: str | Path, name: str, budget: Budget, python: str = sys.executable):
        self.checkpoint, self.footage, self.like, self.budget = Path(checkpoint), footage, like, budget
        self.work = Path(work_dir)
        self.out_dir, self.name, self.python = Path(out_dir), name, python
        self.run_dir = self.work / "adapt"
        self.status = JobStatus(steps=budget.steps)
        self._proc: Optional[subprocess.Popen] = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    # -- commands ------------------------------------------------------------------------------------------------
    def adapt_command(self) -> List[str]:
        """``python -m segadapt adapt ...``: the budget, one progress line per step, no debug grids, no workers."""
        b = self.budget
        cmd = [self.python, "-m", "segadapt", "adapt", "--checkpoint", str(self.checkpoint),
               "--target", str(self.footage.folder), "--out", str(self.run_dir), "--steps", str(b.steps),
               "--batch-size", str(b.batch_size), "--max-minutes", str(b.minutes), "--device", b.device,
               "--log-every", "1", "--debug-every", "0", "--save-every", str(b.steps), "--num-workers", "0"]
        if not self.like.dynamic:
            cmd += ["--size", *map(str, self.like.input_size)]
        return cmd

    def export_command(self) -> List[str]:
        """``python -m segadapt export ...`` of the adapted checkpoint with the served model's input and output."""
        m = self.like
        cmd = [self.python, "-m", "segadapt", "export", "--checkpoint", str(self.run_dir / "adapted"),
               "--out", str(self.out_dir), "--name", self.name, "--imgsz", *map(str, m.input_size),
               "--input-layout", m.input_layout, "--output", m.output_kind, "--batch", str(m.batch),
               "--parity-data", str(self.footage.folder), "--parity-frames", "2"]
        if m.output_kind == "class_map":
            cmd += ["--class-dtype", m.output_dtype]
        if m.dynamic:
            cmd += ["--dynamic", "--min-size", *map(str, m.min_size), "--max-size", *map(str, m.max_size),
                    "--max-batch", str(m.max_batch)]
        return cmd

    # -- running -------------------------------------------------------------------------------------------------
    def _spawn(self, cmd: List[str], log: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:  # the child keeps its own descriptor
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # its own process group: cancel ends all of it

    def run(self, poll_s: float = 0.5) -> Iterator[JobStatus]:
        """Run adapt, then export; yield a :class:`JobStatus` every ``poll_s`` seconds and a last one when finished.
        Closing the iterator (a client that went away) cancels the job."""
        self.work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        try:
            for stage, cmd, log in (("adapting", self.adapt_command(), self.work / "adapt.log"),
                                    ("exporting", self.export_command(), self.work / "export.log")):
                with self._lock:
                    if self._cancelled.is_set():
                        break
                    self.status.stage = stage
                    self._proc = self._spawn(cmd, log)
                while self._proc.poll() is None:
                    self._read_progress()
                    self.status.seconds = time.time() - t0
                    yield self.status
                    time.sleep(poll_s)
                self._read_progress()
                if self._cancelled.is_set():
                    break
                if self._proc.returncode != 0:
                    self.status.stage = "failed"
                    self.status.message = (f"segadapt {stage[:-3]} failed (exit {self._proc.returncode}): "
                                           f"{_last_error(log)} (log: {log})")
                    break
            if self._cancelled.is_set():
                self.status.stage = "cancelled"
                self.status.message = (f"Cancelled at step {self.status.step} of {self.status.steps}; "
                                       "the adaptation process was stopped.")
            elif self.status.stage != "failed":
                self.status.stage = "done"
                self.status.onnx = self.out_dir / f"{self.name}.onnx"
            self.status.seconds = time.time() - t0
            yield self.status
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self.cancel()

    def cancel(self, wait_s: float = 5.0) -> None:
        """Stop the job: SIGTERM to the running child's process group, SIGKILL after ``wait_s`` seconds."""
        with self._lock:
            self._cancelled.set()
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def _read_progress(self) -> None:
        """Update the status from ``coverage.jsonl`` (the last complete line)."""
        path = self.run_dir / "coverage.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            s = self.status
            s.step, s.kept = int(rec.get("step", 0)), rec.get("kept")
            s.losses = {k: float(v) for k, v in rec.items() if k.startswith("loss")}
            s.coverage = dict(rec.get("coverage", {}))
            return


def read_selection(run_dir: str | Path) -> dict:
    """The label-free selection an adaptation run recorded: ``summary.json``'s ``selection`` in ``run_dir``
    (``rule``, ``picked``, ``verdict`` of ``better`` / ``no better`` / ``uncertain``, ``margin``, ``reason``,
    ``candidates``).

    Returns:
        that dict, or {} when the run recorded no verdict (older runs, ``--select last``) or the file is missing or
        unreadable. Never raises.
    """
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    sel = summary.get("selection") if isinstance(summary, dict) else None
    return sel if isinstance(sel, dict) and sel.get("verdict") else {}


def _last_error(log: Path) -> str:
    """The last ``error: ...`` line of a child's log (the CLI's one-line errors), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]
