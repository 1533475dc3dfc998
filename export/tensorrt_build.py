"""ONNX -> TensorRT engine with the TensorRT Python API (TensorRT 10 and 11), built on the GPU that will run it.

* TensorRT 11 networks are always strongly typed: there are no FP16/INT8 builder flags or calibrators; the precision
  comes from the ONNX graph (an FP16 graph or an INT8 Q/DQ graph from :mod:`segadapt.export.onnx_export`).
* TensorRT 10 (JetPack 6 ships 10.3): an FP32 graph can be built with the FP16 builder flag (weakly typed);
  precision-baked graphs are built strongly typed where the flag exists (10.12+ recommends it).
* Dynamic inputs get one optimisation profile (min/opt/max), a timing cache file is reused across builds, and the
  workspace is capped.

Engines are bound to a TensorRT version and a GPU model; the metadata beside the engine records both and the runtime
refuses a mismatch. Without TensorRT or a GPU, :func:`build_engine` raises :class:`TensorRTUnavailable` with the
reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Tuple

from segadapt.runtime.files import write_atomic
from segadapt.runtime.metadata import ModelMetadata, metadata_path


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU for it) is not available here; the message says what is missing."""


def tensorrt_status() -> Tuple[bool, str]:
    """(usable, reason): whether TensorRT imports and a builder can be created on a GPU here."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError for missing libnvinfer
        return False, f"TensorRT is not installed ({type(e).__name__}: {e})"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            return False, "TensorRT could not create a builder (no GPU or driver)"
    except Exception as e:  # TypeError "factory function returned nullptr" without a GPU
        return False, f"TensorRT could not create a builder (no GPU or driver?): {e}"
    return True, f"TensorRT {trt.__version__}"


def _shape(meta: ModelMetadata, b: int, hw: Tuple[int, int]) -> Tuple[int, ...]:
    return (b, hw[0], hw[1], 3) if meta.input_layout == "uint8_nhwc" else (b, 3, hw[0], hw[1])


def build_engine(onnx_path: str | Path, engine_path: str | Path, workspace_gb: float = 4.0, fp16_flag: bool = False,
                 timing_cache: Optional[str | Path] = None, log: Callable[[str], None] = print) -> ModelMetadata:
    """Build a TensorRT engine from one of our ONNX files and write ``<engine>.engine`` + ``<engine>.json``.

    Args:
        onnx_path: the ONNX file (its metadata JSON must be beside it).
        engine_path: output plan file (raw TensorRT plan, loadable by trtexec, Triton and DeepStream).
        workspace_gb: workspace memory pool limit in GiB.
        fp16_flag: TensorRT 10 only, for an FP32 graph: allow FP16 kernels (weak typing). Ignored on 11.
        timing_cache: file to load/save the timing cache (speeds up rebuilds).

    Returns:
        the engine's metadata (also written beside it).

    Raises:
        TensorRTUnavailable: TensorRT or a GPU is missing.
        RuntimeError: the ONNX parser or the builder failed (parser errors are listed).
    """
    ok, why = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = ModelMetadata.load(metadata_path(onnx_path))
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = major >= 11 or (meta.precision != "fp32" and hasattr(trt.NetworkDefinitionCreationFlag,
                                                                         "STRONGLY_TYPED"))
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errs))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    precision = meta.precision
    if major < 11 and fp16_flag and meta.precision == "fp32" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16"
    inp = network.get_input(0)
    if meta.dynamic:
        prof = builder.create_optimization_profile()
        prof.set_shape(inp.name, _shape(meta, 1, meta.min_size), _shape(meta, meta.batch, meta.input_size),
                       _shape(meta, meta.max_batch, meta.max_size))
        config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    write_atomic(engine_path, bytes(plan))
    if cache_path:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    from segadapt.runtime.backends import gpu_name

    d = meta.to_dict()
    d.update(format="engine", precision=precision, tensorrt_version=trt.__version__, gpu_name=gpu_name(),
             created=time.strftime("%Y-%m-%dT%H:%M:%S"), parity={})
    d["exporter"] = dict(d.get("exporter", {}), tensorrt=trt.__version__, source_onnx=str(onnx_path))
    emeta = ModelMetadata.from_dict(d)
    emeta.save(metadata_path(engine_path))
    log(f"built {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB) with TensorRT {trt.__version__} "
        f"in {time.time() - t0:.1f} s, precision {precision}")
    return emeta
