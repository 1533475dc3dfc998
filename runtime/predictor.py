"""``Predictor``: frames in, class maps out, with per-stage timings (numpy + OpenCV + a backend; no torch)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from segadapt.runtime.backends import Backend, BackendError, open_backend
from segadapt.runtime.classes import overlay
from segadapt.runtime.metadata import ModelMetadata, metadata_path


@dataclass
class Prediction:
    """Result for one frame.

    Attributes:
        class_map: (H, W) uint8 (or int32 beyond 256 classes) class ids at the frame's own resolution.
        timings: milliseconds per stage for the batch this frame was in (``preprocess``, ``infer``,
            ``postprocess``), divided by the batch size.
    """

    class_map: np.ndarray
    timings: Dict[str, float] = field(default_factory=dict)


def load_metadata(model_path: str | Path) -> ModelMetadata:
    """Metadata of a model file: the ``.json`` beside it, or (ONNX only) the copy embedded in the graph.

    Raises:
        FileNotFoundError: the model file does not exist.
        BackendError: no metadata found, or it is invalid (the message names the file).
    """
    p = Path(model_path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: model file not found")
    mp = metadata_path(p)
    if mp.is_file():
        try:
            return ModelMetadata.load(mp)
        except ValueError as e:
            raise BackendError(str(e)) from None
    if p.suffix.lower() == ".onnx":
        embedded = _embedded_metadata(p)
        if embedded is not None:
            return ModelMetadata.from_dict(json.loads(embedded), str(p))
    raise BackendError(f"{p}: no metadata file {mp.name} beside it (export writes one); cannot tell the input "
                       f"layout, size and classes")


def _embedded_metadata(p: Path) -> Optional[str]:
    """The ``segadapt`` entry of an ONNX file's ``metadata_props`` (None if absent), read with the ``onnx`` package
    when installed, else with onnxruntime (the runtime-only install has no ``onnx``).

    Raises:
        BackendError: the file is not a readable ONNX model.
    """
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            props = {e.key: e.value for e in onnx.load(str(p), load_external_data=False).metadata_props}
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            props = sess.get_modelmeta().custom_metadata_map
    except ImportError:
        return None
    except Exception as e:  # onnx raises DecodeError, onnxruntime InvalidProtobuf etc. for corrupt files
        raise BackendError(f"{p}: not a readable ONNX model: {e}") from None
    return props.get("segadapt")


class Predictor:
    """Segment frames with an exported model.

    Args:
        model_path: ``.onnx`` (ONNX Runtime or OpenVINO), ``.xml`` (OpenVINO IR) or ``.engine``/``.plan`` (TensorRT)
            with its metadata beside it.
        providers: ONNX Runtime execution providers in order of preference (``tensorrt``, ``cuda``, ``cpu``);
            None = every available one. Ignored for engines.
        threads: ONNX Runtime intra-op / OpenVINO inference threads (0 = default).
        spin: ONNX Runtime's idle threads spin-wait (default); False when other threads share the CPU (video).
        size: (H, W) to run the model at; must equal the graph's size for static graphs, default = metadata size.
        letterbox: keep the aspect ratio (pad) instead of stretching frames to the model size.
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt`` (see
            :func:`~segadapt.runtime.backends.choose_backend`; ``self.backend.selection`` says which and why), or an
            opened :class:`Backend`.
        precision: OpenVINO's inference precision: ``auto`` (bf16 where the CPU has it, else f32), ``f32``, ``bf16``.
        watch: hot swap: look at the model file at most every ``watch`` seconds (0 = before every batch) and switch
            to a new complete, compatible version of it (same classes and input); None = never. See
            :mod:`segadapt.runtime.hot_swap`; ``self.watcher`` is its :class:`ModelWatcher`.

    Frames are (H, W, 3) uint8 RGB numpy arrays of any size.

    Raises:
        FileNotFoundError / BackendError: missing, corrupt or mismatched model/metadata files.
        ValueError: a size a static graph cannot take, or outside a dynamic graph's bounds.
    """

    def __init__(self, model_path: str | Path, providers: Optional[Sequence[str]] = None, threads: int = 0,
                 size: Optional[Tuple[int, int]] = None, letterbox: bool = False,
                 backend: Union[str, Backend, None] = None, spin: bool = True, watch: Optional[float] = None,
                 precision: str = "auto"):
        self.model_path = Path(model_path)
        self.metadata = load_metadata(self.model_path)
        kind = backend if isinstance(backend, str) else "auto"
        self._backend_args = (providers, threads, spin, kind, precision)
        self.backend = backend if isinstance(backend, Backend) else open_backend(self.model_path, self.metadata,
                                                                                  *self._backend_args)
        m = self.metadata
        self.size = tuple(size) if size else tuple(m.input_size)
        if not m.dynamic and self.size != tuple(m.input_size):
            raise ValueError(f"{self.model_path}: static graph takes {m.input_size[0]}x{m.input_size[1]}, "
                             f"not {self.size[0]}x{self.size[1]} (export with --dynamic for other sizes)")
        if m.dynamic and not (m.min_size[0] <= self.size[0] <= m.max_size[0] and
                              m.min_size[1] <= self.size[1] <= m.max_size[1]):
            raise ValueError(f"{self.model_path}: size {self.size} is outside the graph's range "
                             f"{m.min_size}..{m.max_size}")
        self.letterbox = letterbox
        self.max_batch = m.max_batch if m.dynamic else m.batch
        self.classes = m.class_info
        self._mean = np.asarray(m.mean, np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(m.std, np.float32) * 255.0)
        self.watcher = None
        if watch is not None:
            from segadapt.runtime.hot_swap import ModelWatcher

            self.watcher = ModelWatcher(self, interval_s=watch)

    def open_backend_like(self, path: str | Path, metadata: ModelMetadata) -> Backend:
        """A backend for another model file, opened with this predictor's backend choice, providers, threads, spin
        and precision settings."""
        return open_backend(path, metadata, *self._backend_args)

    # -- stages ----------------------------------------------------------------------------------------------
    def _fit(self, frame: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
        """Resize (or letterbox) one frame to the model size; returns it and the valid box (y, x, h, w)."""
        H, W = self.size
        fh, fw = frame.shape[:2]
        if not self.letterbox:
            interp = cv2.INTER_AREA if fh > H and fw > W else cv2.INTER_LINEAR
            return cv2.resize(frame, (W, H), interpolation=interp), (0, 0, H, W)
        s = min(H / fh, W / fw)
        nh, nw = max(1, round(fh * s)), max(1, round(fw * s))
        y, x = (H - nh) // 2, (W - nw) // 2
        canvas = np.empty((H, W, 3), np.uint8)
        canvas[:] = np.round(self._mean).astype(np.uint8)  # pad with the mean colour: 0 after normalisation
        canvas[y:y + nh, x:x + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else
                                                cv2.INTER_LINEAR)
        return canvas, (y, x, nh, nw)

    def preprocess(self, frames: Sequence[np.ndarray]) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
        """Frames -> the graph's input batch (uint8 NHWC or normalised float32 NCHW) and the valid boxes."""
        fitted, boxes = [], []
        for f in frames:
            if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise ValueError(f"frames must be (H, W, 3) uint8 RGB, got {f.shape} {f.dtype}")
            a, b = self._fit(f)
            fitted.append(a)
            boxes.append(b)
        x = np.stack(fitted)
        if self.metadata.input_layout == "float_nchw":
            x = ((x.astype(np.float32) - self._mean) * self._inv_std).transpose(0, 3, 1, 2)
            x = np.ascontiguousarray(x)
        return x, boxes

    def postprocess(self, out: np.ndarray, boxes, frame_shapes) -> List[np.ndarray]:
        """Graph output -> one class map per frame at the frame's resolution (crop the letterbox, resize)."""
        maps = []
        H, W = self.size
        for i, (y, x, h, w) in enumerate(boxes):
            fh, fw = frame_shapes[i]
            if self.metadata.output_kind == "class_map":
                cm = out[i][y:y + h, x:x + w]
                cm = cv2.resize(cm.astype(np.uint8 if cm.dtype == np.uint8 else np.int32), (fw, fh),
                                interpolation=cv2.INTER_NEAREST) if cm.shape != (fh, fw) else cm
            else:  # logits (K, h', w') at the model's stride: crop, upsample bilinearly per class, argmax
                lg = out[i].astype(np.float32)
                sy, sx = lg.shape[1] / H, lg.shape[2] / W
                lg = lg[:, int(y * sy):max(int(y * sy) + 1, round((y + h) * sy)),
                        int(x * sx):max(int(x * sx) + 1, round((x + w) * sx))]
                up = _resize_channels(lg, fh, fw)
                cm = up.argmax(0).astype(np.uint8 if self.metadata.num_classes <= 256 else np.int32)
            maps.append(cm)
        return maps

    # -- public API ------------------------------------------------------------------------------------------
    def predict_batch(self, frames: Sequence[np.ndarray]) -> List[Prediction]:
        """Segment a list of frames, in chunks of at most the graph's batch size."""
        results: List[Prediction] = []
        step = max(1, self.max_batch)
        for s in range(0, len(frames), step):
            chunk = list(frames[s:s + step])
            t0 = time.perf_counter()
            x, boxes = self.preprocess(chunk)
            pre_ms = (time.perf_counter() - t0) * 1e3 / len(chunk)
            results += self.infer_prepared(x, boxes, [f.shape[:2] for f in chunk], pre_ms)
        return results

    def infer_prepared(self, x: np.ndarray, boxes: Sequence[Tuple[int, int, int, int]],
                       frame_shapes: Sequence[Tuple[int, int]], preprocess_ms: float = 0.0) -> List[Prediction]:
        """Inference and postprocessing of a batch made by :meth:`preprocess` (at most ``max_batch`` frames).

        Pipelines call this when frames were preprocessed elsewhere (the video reader thread does it).

        Args:
            x: the graph's input batch, (B, H, W, 3) uint8 or (B, 3, H, W) float32 as the metadata's layout says.
            boxes: B valid boxes (y, x, h, w) in model pixels, as returned by :meth:`preprocess`.
            frame_shapes: B (height, width) of the original frames, in pixels: class maps come back at that size.
            preprocess_ms: preprocessing time per frame in ms, copied into the timings.

        Returns:
            B :class:`Prediction` (class map (height, width) uint8/int32, per-stage timings in ms per frame).
        """
        n = x.shape[0]
        if not self.metadata.dynamic and n < self.metadata.batch:  # pad a static batch
            x = np.concatenate([x, np.repeat(x[-1:], self.metadata.batch - n, 0)])
        if self.watcher is not None:
            self.watcher.poll()  # may swap the backend (same classes and input), never mid-batch
        backend = self.backend  # read once: the whole batch comes from one model
        t1 = time.perf_counter()
        out = backend.infer(x)
        t2 = time.perf_counter()
        maps = self.postprocess(out, boxes, frame_shapes)
        t3 = time.perf_counter()
        tm = {"preprocess": preprocess_ms, "infer": (t2 - t1) * 1e3 / n, "postprocess": (t3 - t2) * 1e3 / n}
        return [Prediction(cm, dict(tm)) for cm in maps]

    def predict(self, frame: np.ndarray) -> Prediction:
        """Segment one (H, W, 3) uint8 RGB frame."""
        return self.predict_batch([frame])[0]

    def stream(self, frames: Iterable[np.ndarray], batch_size: int = 1) -> Iterator[Tuple[np.ndarray, Prediction]]:
        """Generator over ``(frame, prediction)``: results are yielded as they are made, nothing accumulates."""
        buf: List[np.ndarray] = []
        for f in frames:
            buf.append(f)
            if len(buf) >= batch_size:
                yield from zip(buf, self.predict_batch(buf))
                buf = []
        if buf:
            yield from zip(buf, self.predict_batch(buf))

    def warmup(self, n: int = 2) -> None:
        """Run ``n`` dummy batches (first runs allocate memory and pick kernels)."""
        dummy = np.zeros((*self.size, 3), np.uint8)
        for _ in range(n):
            self.predict(dummy)

    def overlay(self, frame: np.ndarray, class_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Colourised class map blended over the frame, (H, W, 3) uint8 RGB."""
        return overlay(frame, class_map, self.classes.palette, alpha)

    def class_shares(self, class_map: np.ndarray) -> Dict[str, float]:
        """Fraction of the frame's pixels per class name (classes present only), largest first."""
        counts = np.bincount(class_map.reshape(-1).astype(np.int64), minlength=self.metadata.num_classes)
        total = counts.sum()
        shares = {self.metadata.classes[i]: float(c / total) for i, c in enumerate(counts[: self.metadata.num_classes])
                  if c > 0}
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def _resize_channels(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (K, h', w') float32 to (K, h, w); OpenCV takes at most 512 channels at once."""
    k = x.shape[0]
    parts = []
    for s in range(0, k, 512):
        part = x[s:s + 512].transpose(1, 2, 0)
        r = cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR)
        parts.append(r[..., None] if r.ndim == 2 else r)
    return np.concatenate(parts, axis=2).transpose(2, 0, 1)
