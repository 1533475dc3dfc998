"""Hot swap: a :class:`~segadapt.runtime.predictor.Predictor` that picks up a new model file without a restart.

:class:`ModelWatcher` watches the predictor's model file and its metadata file beside it (``stat``: inode,
modification time and size, polled at most every ``interval_s`` seconds, from the thread that runs the batches: no
extra thread, no polling while nothing is segmented). When either changes, the new pair is loaded and checked
*before* anything is switched; the predictor keeps serving its current model while that happens and whenever the new
file is refused:

- a file that does not load (half-written, truncated, another TensorRT version) is refused;
- an ONNX file whose embedded metadata disagrees with the ``.json`` beside it is refused (the model was replaced but
  its metadata not yet, or the other way round: the state between the two renames of an export);
- a file that changed while it was being loaded is ignored until it stops changing;
- a model with other classes, or another input (layout, size, batch, normalisation) or output kind, is refused:
  frames already preprocessed for the current model, and every class id a caller stores, stay valid.

Each refusal is one warning line, logged once per file version. A swap replaces ``predictor.backend`` (and
``predictor.metadata``) by assignment; :meth:`Predictor.infer_prepared` reads the backend once per batch, so each
frame's result comes from exactly one model, and no frame is dropped. The swap is logged with both models' SHA-256
prefixes and, when the new model's metadata records one (``adaptation``), the verdict and validator margin of the
adaptation that made it (``adaptation verdict: no better (margin -0.8)``). The batch that notices a new file waits
for it to load (tens of milliseconds for a small ONNX model on a CPU, longer for a TensorRT engine): the next frame
after the file appeared is segmented by the new model.
:meth:`ModelWatcher.install` serves another model file at once (checked first, then copied over the watched files);
:func:`keep_copy` keeps the files it would replace beside them, so that they can be installed back.

Writers should write model files atomically (``segadapt export`` does: a temporary file, then a rename); a file
copied in place with ``cp`` is refused while half-written and taken once complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from segadapt.runtime.metadata import ModelMetadata, metadata_path, verdict_line

if TYPE_CHECKING:  # pragma: no cover
    from segadapt.runtime.backends import Backend
    from segadapt.runtime.predictor import Predictor

LOG = logging.getLogger(__name__)

#: metadata fields that must be equal for a swap: what the preprocessing, the batch padding and the postprocessing
#: of the serving predictor depend on (classes are compared separately, for a clearer message).
INTERFACE_FIELDS = ("input_layout", "input_size", "dynamic", "batch", "max_batch", "mean", "std", "output_kind")

Signature = Tuple[Tuple[int, int, int], Tuple[int, int, int]]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _stat(p: Path) -> Tuple[int, int, int]:
    """(inode, mtime in ns, size in bytes) of a file; (-1, -1, -1) when it does not exist (now)."""
    try:
        st = p.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return (-1, -1, -1)


@dataclass
class SwapEvent:
    """One decision of the watcher about a new version of the model file.

    Attributes:
        swapped: True when the predictor now serves the new model, False when it was refused.
        message: the one-line log message (names the file, both SHA-256 prefixes or the reason for refusing; for a
            swap to a model made by ``segadapt adapt`` with selection, its verdict and margin).
        old_sha256, new_sha256: hex digests of the model files (new: "" when the file could not be read).
        time: ``time.time()`` of the decision.
    """

    swapped: bool
    message: str
    old_sha256: str
    new_sha256: str
    time: float


def interface_mismatch(old: ModelMetadata, new: ModelMetadata) -> str:
    """Why ``new`` cannot replace ``old`` under a running predictor ("" when it can).

    Classes must be the same names in the same order (a different class count or order would change every stored
    class id); the input (layout, size, batch, normalisation) and output kind must be equal.
    """
    if list(old.classes) != list(new.classes):
        def names(m: ModelMetadata) -> str:
            return ", ".join(m.classes[:6]) + (", ..." if m.num_classes > 6 else "")

        return f"it has {new.num_classes} classes ({names(new)}), the served model {old.num_classes} ({names(old)})"
    diffs = [f"{k} {getattr(new, k)} (served: {getattr(old, k)})" for k in INTERFACE_FIELDS
             if getattr(new, k) != getattr(old, k)]
    if old.dynamic and (old.min_size, old.max_size) != (new.min_size, new.max_size):
        diffs.append(f"size range {new.min_size}..{new.max_size} (served: {old.min_size}..{old.max_size})")
    return "its input/output differ: " + ", ".join(diffs) if diffs else ""


class ModelWatcher:
    """Swap a :class:`Predictor`'s model when its file is replaced by a complete, valid, compatible one.

    Args:
        predictor: the predictor to keep up to date (its ``model_path`` is watched, with the metadata file beside it).
        interval_s: look at the files at most this often (seconds; 0 = before every batch). A look is two ``stat``
            calls.
        open_backend: ``(path, metadata) -> Backend``, how to load a new model (default: the predictor's
            :func:`~segadapt.runtime.backends.open_backend` with the providers, threads and spin it was made with).
        on_event: called with every :class:`SwapEvent` (after it is logged).

    Thread-safe: when two threads poll at once, one checks the files and the other goes on with the current model.
    """

    def __init__(self, predictor: "Predictor", interval_s: float = 0.5,
                 open_backend: Optional[Callable[[Path, ModelMetadata], "Backend"]] = None,
                 on_event: Optional[Callable[[SwapEvent], None]] = None):
        self.predictor = predictor
        self.path = Path(predictor.model_path)
        self.meta_path = metadata_path(self.path)
        self.interval_s = max(0.0, float(interval_s))
        self._open = open_backend or predictor.open_backend_like
        self.on_event = on_event
        self.sha256 = file_sha256(self.path)
        self._seen: Signature = self._signature()
        self._next = 0.0
        self._lock = threading.Lock()
        self.events: List[SwapEvent] = []
        self.swaps = 0

    def _signature(self) -> Signature:
        return _stat(self.path), _stat(self.meta_path)

    def poll(self) -> Optional[SwapEvent]:
        """Look at the files (at most every ``interval_s``) and swap or refuse a new version; None when nothing
        changed, the look was skipped, or another thread is looking. Never raises for a bad model file."""
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next = now + self.interval_s
            sig = self._signature()
            if sig == self._seen:
                return None
            if sig[0][2] < 0:  # the model file is gone for now (being replaced): keep serving, look again
                return None
            ev = self._try(sig)
            if ev is None:  # changed while loading: look again next time
                return None
            self._seen = sig
            self._emit(ev)
            return ev
        finally:
            self._lock.release()

    def _try(self, sig: Signature) -> Optional[SwapEvent]:
        """Load and check the files with signature ``sig``; swap when they pass. None when they changed meanwhile."""
        backend, meta, new_sha, reason = self._load(self.path)
        if self._signature() != sig:
            return None
        return self._decide(backend, meta, new_sha, reason, self.path)

    def _load(self, path: Path):
        """``(backend, metadata, sha256, "")`` of a loadable, compatible model file, else ``(None, None, sha256 or
        "", reason)``."""
        from segadapt.runtime.predictor import load_metadata

        new_sha = ""
        try:
            new_sha = file_sha256(path)
            meta = load_metadata(path)
            backend = self._open(path, meta)
            reason = _embedded_disagrees(backend, meta) or interface_mismatch(self.predictor.metadata, meta)
        except Exception as e:  # any load failure is a refusal: the served model must keep running
            return None, None, new_sha, f"{type(e).__name__}: {e}".replace("\n", " ")
        return (None, None, new_sha, reason) if reason else (backend, meta, new_sha, "")

    def _decide(self, backend, meta, new_sha: str, reason: str, path: Path) -> SwapEvent:
        """Swap to ``backend`` (when ``reason`` is empty) or refuse; the event."""
        old_sha, p = self.sha256, self.predictor
        if reason:
            msg = (f"{path}: new model file (sha256 {new_sha[:12] or '?'}) refused: {reason}; still serving "
                   f"sha256 {old_sha[:12]}")
            return SwapEvent(False, msg, old_sha, new_sha, time.time())
        p.backend = backend  # one assignment: a batch uses either the old backend or this one
        p.metadata = meta
        self.sha256 = new_sha
        self.swaps += 1
        verdict = verdict_line(meta.adaptation)  # what the adaptation that made it expects of it, when recorded
        msg = (f"{self.path}: swapped model sha256 {old_sha[:12]} -> {new_sha[:12]} ({meta.precision}, "
               f"{backend.describe()})" + (f"; {verdict}" if verdict else ""))
        return SwapEvent(True, msg, old_sha, new_sha, time.time())

    def install(self, model: str | Path) -> SwapEvent:
        """Serve another model file now: check it, then copy it and its metadata over the watched files (each
        atomically: a temporary file in the same folder, then a rename) and swap. A refused file is not copied.

        Raises:
            OSError: the files cannot be copied (the current model keeps serving).
        """
        src = Path(model)
        with self._lock:  # no poll sees the state between the two renames
            backend, meta, new_sha, reason = self._load(src)
            if not reason:
                for a, b in ((src, self.path), (metadata_path(src), self.meta_path)):
                    tmp = b.with_name(f".{b.name}.installing")
                    shutil.copyfile(a, tmp)
                    os.replace(tmp, b)
                self._seen = self._signature()
            ev = self._decide(backend, meta, new_sha, reason, src)
        self._emit(ev)
        return ev

    def _emit(self, ev: SwapEvent) -> None:
        (LOG.info if ev.swapped else LOG.warning)(ev.message)
        self.events.append(ev)
        del self.events[:-50]
        if self.on_event is not None:
            self.on_event(ev)


def keep_copy(model: str | Path, tag: str = "previous") -> Path:
    """Copy a model file and its metadata file beside them before they are replaced, so the model is not lost.

    ``dir/m.onnx`` (+ ``dir/m.json``) -> ``dir/m.<tag>-<YYYYmmdd-HHMMSS>.onnx`` (+ its :func:`metadata_path`), a
    ``-2``, ``-3``... suffix when that name is taken. Each file is written atomically (a temporary file in the same
    folder, then a rename), the metadata first, so the copy never exists without it; a model without a metadata file
    (ONNX with embedded metadata) is copied alone. The copy can be served again with :meth:`ModelWatcher.install`.

    Returns:
        the path of the model's copy.

    Raises:
        FileNotFoundError: ``model`` does not exist.
        OSError: the copy cannot be written (e.g. a read-only folder or a full disk); nothing is left behind.
    """
    from segadapt.runtime.files import atomic_output

    src = Path(model)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: model file not found")
    stem, n = f"{src.stem}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    dst = src.with_name(stem + src.suffix)
    while dst.exists() or metadata_path(dst).exists():
        n += 1
        dst = src.with_name(f"{stem}-{n}{src.suffix}")
    pairs = [(metadata_path(src), metadata_path(dst))] if metadata_path(src).is_file() else []
    done: List[Path] = []
    try:
        for a, b in pairs + [(src, dst)]:
            with atomic_output(b, needed=a.stat().st_size, what="copy of the served model") as tmp:
                shutil.copyfile(a, tmp)
            done.append(b)
    except BaseException:
        for b in done:
            b.unlink(missing_ok=True)
        raise
    return dst


def _embedded_disagrees(backend, meta: ModelMetadata) -> str:
    """For ONNX Runtime backends: "" when the metadata embedded in the graph (if any) equals ``meta`` (the file
    beside it), else the reason (the two were written by different exports: one of the files is not replaced yet)."""
    session = getattr(backend, "session", None)
    if session is None:
        return ""
    import json

    embedded = session.get_modelmeta().custom_metadata_map.get("segadapt")
    if embedded is None:
        return ""
    try:
        other = ModelMetadata.from_dict(json.loads(embedded))
    except ValueError as e:
        return f"its embedded metadata is invalid: {e}"
    if other.to_dict() != meta.to_dict():
        return (f"the metadata embedded in the graph (created {other.created or '?'}) differs from "
                f"{metadata_path(backend.path).name} (created {meta.created or '?'}): model and metadata file are "
                f"from different exports (one is not written yet?)")
    return ""

