"""Inference backends behind one small interface: ONNX Runtime, TensorRT and OpenVINO (:mod:`segadapt.runtime.
openvino_backend`), no torch.

``Backend.infer(x)`` takes the graph's input batch as a numpy array (uint8 (B, H, W, 3) or float32 (B, 3, H, W), as
the metadata says) and returns the graph's output as a numpy array.
"""

from __future__ import annotations

import abc
import importlib.util
import queue
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from segadapt.runtime.metadata import ModelMetadata

ORT_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
ORT_PREFERENCE = ("tensorrt", "cuda", "cpu")


class BackendError(RuntimeError):
    """A model file or backend cannot be used; the message says which file and why."""


class Backend(abc.ABC):
    """A loaded model that maps an input batch to an output batch."""

    name: str = "backend"
    metadata: ModelMetadata
    selection: str = ""  # which backend open_backend chose and why (logged by predict)

    @abc.abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the model on one batch (see the module docstring for layouts)."""

    @property
    def device(self) -> str:
        return "cpu"

    def describe(self) -> str:
        return self.name


def available_ort_providers() -> List[str]:
    """Short names (``tensorrt``, ``cuda``, ``cpu``) of the execution providers compiled into onnxruntime.

    Compiled-in does not mean usable (a missing CUDA library only shows when a session is created).
    """
    import onnxruntime as ort

    inv = {v: k for k, v in ORT_PROVIDER_NAMES.items()}
    return [inv[p] for p in ort.get_available_providers() if p in inv]


class OrtBackend(Backend):
    """ONNX Runtime backend.

    Args:
        path: the ``.onnx`` file.
        metadata: its metadata.
        providers: short provider names in order of preference (``tensorrt``, ``cuda``, ``cpu``). None = every
            available one in the order TensorRT, CUDA, CPU. A requested provider that is not available, or that
            onnxruntime silently drops when creating the session (a missing CUDA/TensorRT library), is an error.
        threads: intra-op threads for the CPU provider (0 = onnxruntime's default).
        spin: let idle intra-op threads spin-wait for work (onnxruntime's default: lowest latency when the model has
            the CPU to itself). Turn it off when other threads share the CPU, as in the video pipeline: spinning
            threads take cycles from decoding and encoding (DeepLabV3-MobileNetV2 video on 2 cores: 69 % -> 75 % of
            the backend-only throughput, measured).
        provider_options: per-provider option dicts keyed by short name (e.g. TensorRT profile shapes).

    Raises:
        BackendError: onnxruntime missing, unknown or unavailable provider, or a file onnxruntime cannot load.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, metadata: ModelMetadata, providers: Optional[Sequence[str]] = None,
                 threads: int = 0, provider_options: Optional[dict] = None, spin: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu")
        self.path = Path(path)
        self.metadata = metadata
        avail = available_ort_providers()
        if providers is None:
            want = [p for p in ORT_PREFERENCE if p in avail]
            explicit = False
        else:
            want = [p.lower() for p in providers]
            explicit = True
            for p in want:
                if p not in ORT_PROVIDER_NAMES:
                    raise BackendError(f"unknown execution provider {p!r}; choose from {list(ORT_PROVIDER_NAMES)}")
                if p not in avail:
                    raise BackendError(f"execution provider {p!r} requested but this onnxruntime has only {avail}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads > 0:
            so.intra_op_num_threads = threads
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts = provider_options or {}
        plist = [(ORT_PROVIDER_NAMES[p], opts.get(p, {})) for p in want]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=plist)
        except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail...)
            raise BackendError(f"{self.path}: onnxruntime cannot load this model: {e}") from None
        active = self.session.get_providers()
        missing = [p for p in want if ORT_PROVIDER_NAMES[p] not in active]
        if explicit and missing:
            raise BackendError(f"{self.path}: execution provider(s) {missing} could not be created (missing CUDA/"
                               f"TensorRT libraries?); active providers are {active}. Refusing to fall back silently.")
        self.providers = [k for k, v in ORT_PROVIDER_NAMES.items() if v in active]
        self.input_name = self.session.get_inputs()[0].name
        if self.input_name != metadata.input_name:
            raise BackendError(f"{self.path}: graph input is {self.input_name!r} but the metadata says "
                               f"{metadata.input_name!r}: model and metadata files do not belong together")

    @property
    def device(self) -> str:
        return "cpu" if self.providers[:1] == ["cpu"] else "cuda"

    def describe(self) -> str:
        return f"onnxruntime [{', '.join(self.providers)}]"

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]



def _trt_dtype_to_np(trt, dt) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8,
             trt.uint8: np.uint8, trt.bool: np.bool_}
    if hasattr(trt, "int64"):
        table[trt.int64] = np.int64
    return np.dtype(table[dt])


class _ExecState:
    """What one TensorRT request runs with: an execution context, its CUDA stream, its device buffers (sized for
    the largest input of its optimisation profile) and that profile's index."""

    def __init__(self, context, stream, d_in, d_out, max_shape: tuple, profile: int):
        self.context, self.stream, self.d_in, self.d_out = context, stream, d_in, d_out
        self.max_shape, self.profile = max_shape, profile


class TrtBackend(Backend):
    """TensorRT backend: deserialise a plan, preallocate device buffers, ``execute_async_v3`` on a CUDA stream.

    Works with TensorRT 10 (JetPack 6) and 11. Device memory and copies use cuda-python (``cuda.bindings.runtime``,
    or the older ``cuda.cudart``), never torch.

    Concurrency (the demo serves requests from several threads): an execution context is not thread-safe, so no two
    requests ever share one. Each :meth:`infer` takes an execution state (context + its own CUDA stream + its own
    device input/output buffers) from a pool, runs, and puts it back; states are created lazily, at most
    ``max_contexts`` of them, and a request that finds none free waits for one. A pool rather than one context per
    thread (``threading.local``): web servers run handlers on pools of dozens of threads (Gradio/AnyIO: up to 40), and
    each context holds its own activation memory for the profile's largest shape, so per-thread contexts would grow
    GPU memory with the number of threads that ever called; the pool bounds it. TensorRT also requires contexts in
    concurrent use of a dynamic-shape engine to use different optimisation profiles, so for a dynamic engine the
    pool holds at most one state per profile (state i uses profile i; our engines have one profile: requests to a
    dynamic engine run one at a time, like a lock). A static engine runs up to ``max_contexts`` requests at once.

    Args:
        path: the ``.engine``/``.plan`` file (a raw TensorRT plan).
        metadata: its metadata; its ``tensorrt_version`` and ``gpu_name`` must match this machine.
        device_id: the CUDA device (made current in every thread that runs a request).
        max_contexts: most execution states (contexts) alive at once, >= 1.

    Raises:
        BackendError: TensorRT or cuda-python missing, no GPU, version/GPU mismatch ("rebuild the engine"), or a
            plan TensorRT cannot deserialise.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, metadata: ModelMetadata, device_id: int = 0, max_contexts: int = 2):
        self.path = Path(path)
        self.metadata = metadata
        self._states: List[_ExecState] = []  # before anything can fail: __del__ frees what exists
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendError(f"{self.path}: TensorRT is not installed ({e}); on Jetson it comes with JetPack, "
                               f"elsewhere pip install 'segadapt[tensorrt]'") from None
        self.cudart = _import_cudart()
        self.trt = trt
        if metadata.tensorrt_version and metadata.tensorrt_version != trt.__version__:
            raise BackendError(f"{self.path}: engine was built with TensorRT {metadata.tensorrt_version}, this machine "
                               f"has {trt.__version__}; rebuild it here with segadapt export --format engine")
        gpu = gpu_name(self.cudart, device_id)
        if metadata.gpu_name and gpu and metadata.gpu_name != gpu:
            raise BackendError(f"{self.path}: engine was built for {metadata.gpu_name}, this GPU is {gpu}; engines "
                               f"are bound to one GPU model: rebuild it here")
        self.device_id = device_id
        _check(self.cudart.cudaSetDevice(device_id))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT could not deserialise this engine (corrupt, or built by "
                               f"another TensorRT version)")
        self.engine = engine
        self._find_io(engine)
        self.dynamic = -1 in tuple(engine.get_tensor_shape(self.input_name))
        limit = max(1, int(max_contexts))
        self.max_contexts = min(limit, max(1, int(engine.num_optimization_profiles))) if self.dynamic else limit
        self._lock = threading.Lock()
        self._idle: "queue.LifoQueue[_ExecState]" = queue.LifoQueue()
        self._idle.put(self._new_state())  # the first one now: a broken engine fails at load, not at first request
        self.max_shape = self._states[0].max_shape

    def _find_io(self, engine) -> None:
        """Input/output tensor names and dtypes. Raises BackendError: not one input, or a name the metadata lacks."""
        trt = self.trt
        self.inputs, self.outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        if len(self.inputs) != 1:
            raise BackendError(f"{self.path}: expected one input tensor, found {self.inputs}")
        self.input_name, self.output_name = self.inputs[0], self.outputs[0]
        if self.input_name != self.metadata.input_name:
            raise BackendError(f"{self.path}: engine input is {self.input_name!r} but the metadata says "
                               f"{self.metadata.input_name!r}")
        self.in_dtype = _trt_dtype_to_np(trt, engine.get_tensor_dtype(self.input_name))
        self.out_dtype = _trt_dtype_to_np(trt, engine.get_tensor_dtype(self.output_name))

    def _new_state(self) -> _ExecState:
        """Create execution state number ``len(self._states)`` (context, stream, device buffers for its profile's
        largest shape) and record it; what was allocated before a failure is freed.

        Raises:
            BackendError: TensorRT or CUDA refused (out of GPU memory, a profile it does not take).
        """
        cud, profile = self.cudart, len(self._states)
        context = self.engine.create_execution_context()
        if context is None:
            raise BackendError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        stream = _check(cud.cudaStreamCreate())
        allocated = []
        try:
            if self.dynamic:
                if profile > 0 and not context.set_optimization_profile_async(profile, int(stream)):
                    raise BackendError(f"{self.path}: TensorRT refused optimisation profile {profile}")
                max_shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, profile)[2])
            else:
                max_shape = tuple(self.engine.get_tensor_shape(self.input_name))
            context.set_input_shape(self.input_name, max_shape)
            max_out = tuple(context.get_tensor_shape(self.output_name))
            allocated.append(_check(cud.cudaMalloc(int(np.prod(max_shape)) * self.in_dtype.itemsize)))
            allocated.append(_check(cud.cudaMalloc(int(np.prod(max_out)) * self.out_dtype.itemsize)))
        except BaseException:
            for ptr in allocated:
                cud.cudaFree(ptr)
            cud.cudaStreamDestroy(stream)
            raise
        state = _ExecState(context, stream, allocated[0], allocated[1], max_shape, profile)
        self._states.append(state)
        return state

    def _acquire(self) -> _ExecState:
        """A free execution state: an idle one, a new one while fewer than ``max_contexts`` exist, else the next one
        another request puts back (blocks). If a new one cannot be made (GPU memory), the pool stops growing and the
        request waits for an existing one instead of failing."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if len(self._states) < self.max_contexts:
                try:
                    return self._new_state()
                except BackendError:
                    if not self._states:
                        raise
                    self.max_contexts = len(self._states)
        return self._idle.get()

    @property
    def device(self) -> str:
        return "cuda"

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__}"

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (thread-safe; see the class docstring).

        Args:
            x: (B, H, W, 3) uint8 or (B, 3, H, W) float32 as the metadata says, within the engine's shapes.

        Returns:
            the output tensor, a new numpy array of the engine's output dtype.

        Raises:
            BackendError: a shape beyond the engine's maximum, or a failed CUDA call or execution.
        """
        state = self._acquire()
        try:
            return self._run(state, x)
        finally:
            self._idle.put(state)

    def _run(self, st: _ExecState, x: np.ndarray) -> np.ndarray:
        cud = self.cudart
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        if x.ndim != len(st.max_shape) or any(a > b for a, b in zip(x.shape, st.max_shape)):
            raise BackendError(f"{self.path}: input shape {x.shape} exceeds the engine's maximum {st.max_shape}")
        _check(cud.cudaSetDevice(self.device_id))  # the current device is per thread in the CUDA runtime
        st.context.set_input_shape(self.input_name, x.shape)
        out = np.empty(tuple(st.context.get_tensor_shape(self.output_name)), self.out_dtype)
        h2d = cud.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cud.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cud.cudaMemcpyAsync(st.d_in, x.ctypes.data, x.nbytes, h2d, st.stream))
        st.context.set_tensor_address(self.input_name, int(st.d_in))
        st.context.set_tensor_address(self.output_name, int(st.d_out))
        if not st.context.execute_async_v3(int(st.stream)):
            raise BackendError(f"{self.path}: TensorRT execution failed")
        _check(cud.cudaMemcpyAsync(out.ctypes.data, st.d_out, out.nbytes, d2h, st.stream))
        _check(cud.cudaStreamSynchronize(st.stream))
        return out

    def __del__(self):
        for st in getattr(self, "_states", []):
            try:
                self.cudart.cudaFree(st.d_in)
                self.cudart.cudaFree(st.d_out)
                self.cudart.cudaStreamDestroy(st.stream)
            except Exception:  # interpreter shutdown: nothing left to free
                pass


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError("cuda-python is not installed (pip install cuda-python); the TensorRT backend uses "
                               "it for device memory instead of torch") from None
    return cudart


def _check(ret):
    """Unpack a cuda-python return tuple ``(err, *values)``; raise BackendError on a CUDA error."""
    err, *vals = ret if isinstance(ret, tuple) else (ret,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return vals[0] if len(vals) == 1 else (tuple(vals) if vals else None)


def gpu_name(cudart=None, device_id: int = 0) -> Optional[str]:
    """Name of CUDA device ``device_id`` (None without cuda-python or a GPU)."""
    try:
        cudart = cudart or _import_cudart()
        prop = _check(cudart.cudaGetDeviceProperties(device_id))
        name = prop.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:  # no driver / no device: report unknown
        return None


BACKEND_CHOICES = ("auto", "onnxruntime", "openvino", "tensorrt")
_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def choose_backend(path: str | Path, metadata: ModelMetadata, backend: str = "auto",
                   providers: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """Which backend runs a model file, and why (the reason is what ``predict`` logs).

    By file: ``.engine``/``.plan``/``.trt`` -> ``tensorrt``, ``.xml`` (OpenVINO IR) -> ``openvino``, ``.onnx`` -> the
    ``backend`` asked for. ``auto`` on an ``.onnx`` file picks the fastest one installed for the device: ONNX Runtime
    when ONNX Runtime providers were named or it has a GPU provider (CUDA/TensorRT), or when the graph is an INT8 Q/DQ
    graph made for ONNX Runtime or TensorRT (``metadata.quantization.scheme``); else OpenVINO when it is installed and
    the CPU has bf16 (OpenVINO then runs bf16), or when it is the only runtime installed; else ONNX Runtime
    (on a CPU without bf16, OpenVINO f32 was 13 % faster at batch 1 but 19 % slower at batch 8 than ONNX Runtime
    FP32: docs/results.md).

    Returns:
        ``(name, reason)``, name one of ``onnxruntime``, ``openvino``, ``tensorrt``.

    Raises:
        BackendError: an unknown choice or file type, or a file the chosen backend cannot run.
    """
    from segadapt.runtime.openvino_backend import openvino_installed

    if backend not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
    p = Path(path)
    suffix = p.suffix.lower()
    by_file = {".xml": "openvino", **{s: "tensorrt" for s in _ENGINE_SUFFIXES}}.get(suffix)
    if suffix != ".onnx" and by_file is None:
        raise BackendError(f"{p}: unknown model file type {suffix!r} (expected .onnx, .xml, .engine or .plan)")
    if by_file is not None:
        if backend not in ("auto", by_file):
            raise BackendError(f"{p}: a {suffix} file runs on {by_file} only, not on --backend {backend}")
        return by_file, f"{suffix} file"
    if backend == "tensorrt":
        raise BackendError(f"{p}: --backend tensorrt runs TensorRT engines (.engine/.plan; segadapt export --format "
                           f"engine); for ONNX Runtime's TensorRT provider use --backend onnxruntime --providers "
                           f"tensorrt")
    if backend != "auto":
        return backend, f"--backend {backend}"
    if providers:
        return "onnxruntime", "ONNX Runtime providers were named"
    scheme = (metadata.quantization or {}).get("scheme")
    if scheme in ("onnxruntime", "tensorrt"):
        return "onnxruntime", f"INT8 graph in the {scheme} form"
    ort_ok = importlib.util.find_spec("onnxruntime") is not None
    if ort_ok:
        gpu = [q for q in available_ort_providers() if q != "cpu"]
        if gpu:
            return "onnxruntime", f"ONNX Runtime has GPU provider(s) {', '.join(gpu)}"
    if openvino_installed():
        from segadapt.runtime.openvino_backend import cpu_supports_bf16

        if cpu_supports_bf16() or not ort_ok:
            return "openvino", ("CPU with bf16, OpenVINO installed" if ort_ok else "CPU, only OpenVINO installed")
        return "onnxruntime", "CPU without bf16: OpenVINO f32 is no faster than ONNX Runtime (docs/results.md)"
    if ort_ok:
        return "onnxruntime", "CPU, OpenVINO not installed"
    raise BackendError(f"{p}: neither onnxruntime nor openvino is installed: pip install 'segadapt[ort]' or "
                       f"'segadapt[openvino]'")


def open_backend(path: str | Path, metadata: ModelMetadata, providers: Optional[Sequence[str]] = None,
                 threads: int = 0, spin: bool = True, backend: str = "auto", precision: str = "auto") -> Backend:
    """Open a model file on the backend :func:`choose_backend` picks (``backend``: ``auto``, ``onnxruntime``,
    ``openvino``, ``tensorrt``); the returned backend's ``selection`` says which and why.

    ``.onnx`` -> ONNX Runtime or OpenVINO, ``.xml`` -> OpenVINO, ``.engine``/``.plan``/``.trt`` -> TensorRT
    (thread-safe, up to 2 concurrent requests on a static engine, see :class:`TrtBackend`).
    ``threads``: intra-op threads of ONNX Runtime or OpenVINO; ``spin``: see :class:`OrtBackend` (for OpenVINO,
    False turns thread pinning off).
    ``precision``: OpenVINO's inference precision (``auto``, ``f32``, ``bf16``); with ``backend="auto"`` it selects
    OpenVINO when that is installed; anything but ``auto`` on another backend is an error (their precision is baked
    into the file).

    Raises:
        BackendError: unknown file type or backend, or a backend that cannot load the file.
    """
    kind, why = choose_backend(path, metadata, backend, providers)
    if precision != "auto" and backend == "auto" and kind == "onnxruntime" and not providers:
        from segadapt.runtime.openvino_backend import openvino_installed

        if openvino_installed() and Path(path).suffix.lower() == ".onnx":
            kind, why = "openvino", f"--precision {precision} asks for OpenVINO"
    if precision != "auto" and kind != "openvino":
        raise BackendError(f"{path}: --precision {precision} applies to OpenVINO only; {kind} runs the precision "
                           f"baked into the file ({metadata.precision})")
    if kind == "openvino":
        from segadapt.runtime.openvino_backend import OpenVinoBackend

        b: Backend = OpenVinoBackend(path, metadata, precision=precision, threads=threads, pin=spin)
    elif kind == "tensorrt":
        b = TrtBackend(path, metadata)
    else:
        b = OrtBackend(path, metadata, providers, threads, spin=spin)
    b.selection = f"{kind} ({'--backend auto: ' if backend == 'auto' else ''}{why})"
    return b
