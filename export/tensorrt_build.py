"""ONNX -> TensorRT engine with the TensorRT Python API (TensorRT 10 and 11), built on the GPU that will run it.

* TensorRT 11 networks are always strongly typed: there are no FP16/INT8 builder flags or calibrators; the precision
  comes from the ONNX graph (an FP16 graph or an INT8 Q/DQ graph from :mod:`segadapt.export.onnx_export`).
* TensorRT 10 (JetPack 6 ships 10.3): an FP32 graph can be built with the FP16 builder flag (weakly typed);
  precision-baked graphs (FP16, INT8 Q/DQ) are built strongly typed (``STRONGLY_TYPED`` exists in every 10.x and is
  NVIDIA's advice for explicit quantization: "use explicit quantization with strong typing; precision-control build
  flags are not required and should not be specified"). Only where that flag is missing does an INT8 Q/DQ network
  get the weakly typed ``INT8`` builder flag, which Q/DQ processing needs there.
* INT8 engines are built only from the TensorRT form of the INT8 graph (signed int8, zero points 0, float biases;
  ``segadapt export --int8-backend tensorrt``, the default for ``--format engine``): the onnxruntime form (uint8
  asymmetric) is refused with that advice before TensorRT's parser sees it.
* Dynamic inputs get one optimisation profile (min/opt/max), a timing cache file is reused across builds, and the
  workspace is capped.

Engines are bound to a TensorRT version and a GPU model; the metadata file beside the engine (``<engine>.json``,
e.g. ``model.engine.json``: the ONNX file's ``model.json`` stays as it is) records both and the runtime refuses a
mismatch. Without TensorRT or a GPU, :func:`build_engine` raises :class:`TensorRTUnavailable` with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from segadapt.runtime.files import write_atomic
from segadapt.runtime.metadata import ModelMetadata, metadata_path
from segadapt.runtime.predictor import load_metadata


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


def network_mode(trt, precision: str, fp16_flag: bool) -> Tuple[int, List[str], str]:
    """How to create and configure the network for a graph of ``precision`` on this TensorRT.

    Args:
        trt: the ``tensorrt`` module.
        precision: the graph's precision (``fp32``, ``fp16``, ``int8``).
        fp16_flag: for an FP32 graph on TensorRT 10: allow FP16 kernels (weak typing).

    Returns:
        ``(creation_flags, builder_flags, precision)``: the bit mask for ``create_network``, names of
        ``trt.BuilderFlag`` members to set, and the engine's precision.
    """
    major = int(trt.__version__.split(".")[0])
    ncf = trt.NetworkDefinitionCreationFlag
    has_strong = hasattr(ncf, "STRONGLY_TYPED")
    flags = 0
    if major < 10 and hasattr(ncf, "EXPLICIT_BATCH"):  # TensorRT 8.x: ONNX networks need explicit batch
        flags |= 1 << int(ncf.EXPLICIT_BATCH)
    if has_strong and (major >= 11 or precision != "fp32"):
        return flags | (1 << int(ncf.STRONGLY_TYPED)), [], precision
    builder_flags: List[str] = []
    if precision == "int8":  # weakly typed Q/DQ network: explicit quantization needs the INT8 flag
        builder_flags.append("INT8")
    if (precision == "fp16" or fp16_flag) and major < 11:
        builder_flags.append("FP16")
    return flags, builder_flags, "fp16" if precision == "fp32" and "FP16" in builder_flags else precision


def check_int8_form(onnx_path: Path, meta: ModelMetadata) -> None:
    """Refuse an INT8 graph TensorRT's ONNX parser would reject, with the fix.

    Raises:
        RuntimeError: the onnxruntime form, or Q/DQ nodes TensorRT cannot take (see
            :func:`~segadapt.export.onnx_export.tensorrt_qdq_problems`).
    """
    if meta.precision != "int8":
        return
    fix = "re-export with segadapt export --int8 --int8-backend tensorrt (the default for --format engine)"
    if meta.quantization.get("scheme") == "onnxruntime":
        raise RuntimeError(f"{onnx_path}: this INT8 graph is in the onnxruntime form (uint8 asymmetric activations), "
                           f"which TensorRT's ONNX parser rejects: {fix}")
    import onnx

    from segadapt.export.onnx_export import tensorrt_qdq_problems

    problems = tensorrt_qdq_problems(onnx.load(str(onnx_path)))
    if problems:
        raise RuntimeError(f"{onnx_path}: {len(problems)} Q/DQ node(s) TensorRT cannot take ({'; '.join(problems[:3])}"
                           f"{'; ...' if len(problems) > 3 else ''}): {fix}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, workspace_gb: float = 4.0, fp16_flag: bool = False,
                 timing_cache: Optional[str | Path] = None, log: Callable[[str], None] = print) -> ModelMetadata:
    """Build a TensorRT engine from one of our ONNX files and write it with its own metadata file.

    Args:
        onnx_path: the ONNX file (metadata beside it as ``<name>.json`` or embedded in the graph). An INT8 graph must
            be the TensorRT form.
        engine_path: output plan file (raw TensorRT plan, loadable by trtexec, Triton and DeepStream); its metadata
            goes to ``metadata_path(engine_path)`` (``<engine>.engine.json``), never over the ONNX file's.
        workspace_gb: workspace memory pool limit in GiB.
        fp16_flag: TensorRT 10 only, for an FP32 graph: allow FP16 kernels (weak typing). Ignored on 11.
        timing_cache: file to load/save the timing cache (speeds up rebuilds).

    Returns:
        the engine's metadata (also written beside it).

    Raises:
        TensorRTUnavailable: TensorRT or a GPU is missing.
        RuntimeError: an INT8 graph not in the TensorRT form, or the ONNX parser or the builder failed (parser
            errors are listed).
    """
    ok, why = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = load_metadata(onnx_path)  # the sidecar, else the copy embedded in the graph
    check_int8_form(onnx_path, meta)
    creation, builder_flags, precision = network_mode(trt, meta.precision, fp16_flag)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errs))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if meta.dynamic:
        prof = builder.create_optimization_profile()
        prof.set_shape(network.get_input(0).name, _shape(meta, 1, meta.min_size),
                       _shape(meta, meta.batch, meta.input_size), _shape(meta, meta.max_batch, meta.max_size))
        config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    write_atomic(engine_path, bytes(plan))
    if cache_path:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    emeta = _engine_metadata(meta, trt.__version__, precision, onnx_path, creation, builder_flags)
    emeta.save(metadata_path(engine_path))
    log(f"built {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB) with TensorRT {trt.__version__} "
        f"in {time.time() - t0:.1f} s, precision {precision}")
    return emeta


def _engine_metadata(meta: ModelMetadata, version: str, precision: str, onnx_path: Path, creation: int,
                     builder_flags: List[str]) -> ModelMetadata:
    """The engine's metadata: the ONNX file's (classes, layout, quantization...) bound to this TensorRT and GPU."""
    from segadapt.runtime.backends import gpu_name

    d = meta.to_dict()
    d.update(format="engine", precision=precision, tensorrt_version=version, gpu_name=gpu_name(),
             created=time.strftime("%Y-%m-%dT%H:%M:%S"), parity={})
    d["exporter"] = dict(d.get("exporter", {}), tensorrt=version, source_onnx=str(onnx_path),
                         tensorrt_network_flags=creation, tensorrt_builder_flags=list(builder_flags))
    return ModelMetadata.from_dict(d)
