"""OpenVINO CPU backend (no torch): the exported ONNX graph, or an OpenVINO IR (``.xml`` + ``.bin``), compiled for
the CPU with the precision the CPU runs fastest.

OpenVINO reads the exported ``.onnx`` directly (same input contract as ONNX Runtime: uint8 (B, H, W, 3) or float32
(B, 3, H, W) in, as the metadata says; class map or logits out), dynamic batch, height and width included. The
compiled model is cached (OpenVINO's ``CACHE_DIR``, keyed by the model file, its contents and the settings), so a
second start skips compilation.

Precision (OpenVINO's ``INFERENCE_PRECISION_HINT``): ``auto`` runs bf16 where the CPU has bf16 arithmetic (the CPU
device lists ``BF16`` in its ``OPTIMIZATION_CAPABILITIES``: AVX512-BF16 or AMX) and f32 elsewhere; ``f32`` asks for
f32 (bit-for-bit the classes of ONNX Runtime's FP32 on the test models); ``bf16`` asks for bf16 and is an error on a
CPU without it (OpenVINO would silently run f32). The precision in use is what :meth:`OpenVinoBackend.describe`
reports (predict's log, ``bench``, the video report).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
from pathlib import Path
from typing import List, Optional

import numpy as np

from segadapt.runtime.backends import Backend, BackendError
from segadapt.runtime.metadata import ModelMetadata

OV_PRECISIONS = ("auto", "f32", "bf16")
CACHE_ENV = "SEGADAPT_OPENVINO_CACHE"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (found without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def default_cache_dir() -> Optional[Path]:
    """Where compiled models are cached: ``$SEGADAPT_OPENVINO_CACHE`` (empty or ``none``: no cache), else
    ``$XDG_CACHE_HOME/segadapt/openvino`` (``~/.cache/segadapt/openvino``)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segadapt" / "openvino"


def cpu_capabilities(core=None) -> List[str]:
    """The CPU device's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``['FP32', 'BF16', 'INT8', ...]``).

    Raises:
        BackendError: openvino is not installed.
    """
    if core is None:
        core = shared_core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_supports_bf16(core=None) -> bool:
    """Whether this CPU runs bf16 arithmetic natively (OpenVINO lists ``BF16`` in its capabilities)."""
    return "BF16" in cpu_capabilities(core)


_CORE = []


def shared_core():
    """The process's one ``openvino.Core`` (OpenVINO's advice: one Core per application). A Core made per backend
    and per capability query, and destroyed with them, preceded SIGSEGVs of the test process."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendError("OpenVINO is not installed: pip install 'segadapt[openvino]'") from None
    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


def _precision_name(t) -> str:
    """OpenVINO element type -> its short name (``f32``, ``bf16``, ``f16``)."""
    return t.get_type_name() if hasattr(t, "get_type_name") else str(t)


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU.

    Args:
        path: the ``.onnx`` file (read directly) or an OpenVINO IR ``.xml`` (its ``.bin`` beside it).
        metadata: its metadata (input name and layout are checked against the graph).
        precision: ``auto`` (bf16 where the CPU supports it, else f32), ``f32`` or ``bf16`` (see the module
            docstring). INT8 IRs keep their quantised ops in int8; the precision applies to the rest.
        threads: OpenVINO's inference threads (``INFERENCE_NUM_THREADS``; 0 = all cores).
        cache_dir: where compiled models are cached; None = :func:`default_cache_dir`, ``""`` = no cache.
        max_requests: most inference requests in flight at once (the demo serves several threads; each request
            holds its own activation memory).
        pin: pin inference threads to cores (OpenVINO's ``ENABLE_CPU_PINNING``, its default). Off when other threads
            share the CPU, as in the video pipeline (the analogue of ONNX Runtime's ``spin=False``): on this 2-core
            machine under load, a pinned run of the test model took 75 ms and an unpinned one 41 ms (measured once,
            busy machine).

    Raises:
        BackendError: openvino missing, unknown precision, bf16 requested on a CPU without it, a file OpenVINO
            cannot read, or a graph input that the metadata does not name.
    """

    name = "openvino"

    def __init__(self, path: str | Path, metadata: ModelMetadata, precision: str = "auto", threads: int = 0,
                 cache_dir: Optional[str | Path] = None, max_requests: int = 4, pin: bool = True):
        self.path = Path(path)
        self.metadata = metadata
        if precision not in OV_PRECISIONS:
            raise BackendError(f"OpenVINO precision must be one of {OV_PRECISIONS}, got {precision!r}")
        core = shared_core()
        import openvino as ov

        self.version = ov.get_version().split("-")[0]
        bf16 = cpu_supports_bf16(core)
        if precision == "bf16" and not bf16:
            raise BackendError(f"{self.path}: bf16 requested but this CPU has no bf16 arithmetic (OpenVINO's CPU "
                               f"capabilities: {', '.join(cpu_capabilities(core))}); use --precision f32 or auto")
        want = "bf16" if precision == "bf16" or (precision == "auto" and bf16) else "f32"
        config = {"INFERENCE_PRECISION_HINT": want, "PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if not pin:
            config["ENABLE_CPU_PINNING"] = False
        cache = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache)
            except OSError:  # a read-only home: run without the cache rather than fail
                cache = None
        self.cache_dir = cache
        try:  # a path (not a read model): OpenVINO keys the cache by the file and skips reading it on a hit
            self.compiled = core.compile_model(str(self.path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError / its own exception types for unreadable files
            raise BackendError(f"{self.path}: OpenVINO cannot load this model: {str(e).splitlines()[0]}") from None
        names = self.compiled.inputs[0].get_names()
        if metadata.input_name not in names:
            raise BackendError(f"{self.path}: graph input is {sorted(names)} but the metadata says "
                               f"{metadata.input_name!r}: model and metadata files do not belong together")
        self.precision = _precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.requested_precision = precision
        self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE")) if cache else False
        self.max_requests = max(1, int(max_requests))
        self._lock = threading.Lock()
        self._idle: "queue.LifoQueue" = queue.LifoQueue()
        self._made = 1
        self._idle.put(self.compiled.create_infer_request())

    def describe(self) -> str:
        q = "int8 + " if self.metadata.precision == "int8" else ""
        return f"openvino {self.version} [cpu, {q}{self.precision}]"

    def _acquire(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self.max_requests:
                self._made += 1
                return self.compiled.create_infer_request()
        return self._idle.get()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (thread-safe: each call runs on an inference request of its own from a small pool).

        Args:
            x: (B, H, W, 3) uint8 or (B, 3, H, W) float32 as the metadata says, within the graph's shapes.

        Returns:
            the graph's output, a new numpy array ((B, H, W) uint8/int32 class map or (B, K, h, w) float32 logits).
        """
        req = self._acquire()
        try:
            res = req.infer({0: np.ascontiguousarray(x)}, share_inputs=True, share_outputs=False)
            return res[0]
        finally:
            self._idle.put(req)
