"""Checkpoint -> ONNX (FP32, optionally FP16 and INT8 QDQ), with metadata and a parity report.

* FP32: ``torch.onnx.export`` (dynamo exporter, ``dynamic_shapes`` for dynamic axes, example batch >= 2 when the
  batch is dynamic, single file), simplified with onnxslim, checked with ``onnx.checker``.
* FP16: onnxconverter-common's ``convert_float_to_float16`` with FP32 inputs/outputs kept and numerically sensitive
  ops (normalisation, softmax, reductions, resize) blocked from conversion.
* INT8: explicit Q/DQ quantisation with onnxruntime's static quantisation (QDQ format, symmetric int8 weights),
  calibrated on target frames, in the form of the backend that will run it (:data:`INT8_SCHEMES`):
  ``onnxruntime`` (uint8 asymmetric activations, what ONNX Runtime's CPU kernels run fastest; per-tensor weights)
  or ``tensorrt`` (int8 symmetric activations, every zero point 0: the only form TensorRT's ONNX parser accepts;
  with the options NVIDIA's ModelOpt passes to the same onnxruntime quantiser for TensorRT: Q/DQ on the inputs of
  quantised ops only, float biases, per-channel weights on the output-channel axis; the weights are stored as int8
  behind a DequantizeLinear, which TensorRT takes as pre-quantised weights).

Precision is baked into the graph, so each variant can be checked with ONNX Runtime on any machine, and TensorRT
(strongly typed) builds it as it is. The TensorRT form is checked the way TensorRT computes it: ONNX Runtime with
graph optimisations off, each Q/DQ applied as written and the convolutions in float32. With optimisations on, ONNX
Runtime fuses DQ -> Conv -> Q into its own int8 QLinearConv, whose kernel saturates on CPUs without VNNI: on this
AVX2 machine that alone turned 98.96 % agreement into 95.30 % on the test model (measured), an artefact TensorRT
does not have.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch

from segadapt.adapt.models.checkpoint import checkpoint_hash, is_checkpoint, load_segmenter
from segadapt.export.config import ExportConfig
from segadapt.export.frames import load_frames
from segadapt.export.wrapper import ExportWrapper
from segadapt.runtime.files import write_atomic, write_error
from segadapt.runtime.metadata import ModelMetadata, metadata_path, selection_record

# Kept in FP32 in the FP16 graph: normalisation statistics, softmax and resizing lose accuracy or overflow in FP16.
FP16_BLOCK_LIST = ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Resize", "Erf", "ArgMax",
                   "BatchNormalization", "InstanceNormalization", "Range", "Upsample"]
# (never "Cast": blocking Cast makes onnxconverter-common wrap Casts in Casts forever)
# Quantised in the onnxruntime-form INT8 graph (the input normalisation excepted, see _preprocessing_nodes).
INT8_OP_TYPES = ["Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Relu", "Clip", "AveragePool", "GlobalAveragePool"]
# Quantised in the TensorRT-form graph: the inputs of weighted ops, residual adds and pools (TensorRT's Q/DQ placement
# advice: quantise weighted ops' inputs and residual inputs; a subset of ModelOpt's INT8 op list). On the test model
# (8 held-out calibration frames) Conv/MatMul/Gemm alone, with Add, and with Add, pools and Concat agreed 98.97, 98.96
# and 98.95 % with PyTorch (measured): the extra ops cost no accuracy and let TensorRT stay INT8 across residual adds.
TRT_INT8_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool", "GlobalAveragePool"]
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Scheme:
    """How an INT8 Q/DQ graph is laid out for one backend.

    Attributes:
        name: ``onnxruntime`` or ``tensorrt`` (recorded in the metadata's ``quantization.scheme``).
        activation_type: ``uint8`` or ``int8`` (activation QuantizeLinear/DequantizeLinear zero-point dtype).
        activation_symmetric: zero point 0 (int8) instead of a calibrated zero point.
        op_types: op types whose inputs are quantised.
        inputs_only: Q/DQ on the inputs of quantised ops only (TensorRT chooses the output precision itself).
        quantize_bias: int32 biases (ONNX Runtime's QLinearConv wants them; TensorRT has no int32 dequantisation).
        per_channel: one weight scale per output channel (else one per tensor).
    """

    name: str
    activation_type: str
    activation_symmetric: bool
    op_types: Tuple[str, ...]
    inputs_only: bool
    quantize_bias: bool
    per_channel: bool = True

    def describe(self, calibration: str, frames: int, data: str) -> dict:
        """The metadata's ``quantization`` record (see :class:`~segadapt.runtime.metadata.ModelMetadata`)."""
        return {"scheme": self.name, "format": "QDQ", "activation_type": self.activation_type, "weight_type": "int8",
                "activation_symmetric": self.activation_symmetric, "weight_symmetric": True,
                "per_channel": self.per_channel,
                "op_types": list(self.op_types), "bias": "int32" if self.quantize_bias else "float32",
                "calibration_method": calibration, "calibration_frames": int(frames), "calibration_data": data}


# onnxruntime form: per-tensor weights. On a trained DeepLabV3-MobileNetV2 at 360x480 (benchmarks/int8_settings.py,
# 31 dusk frames calibrate, 31 scored, AVX2 without VNNI) they agreed 98.22 % with PyTorch vs 98.01 % per channel:
# ONNX Runtime's u8s8 kernels saturate there on full-range per-channel weights (98.26 % with the Q/DQ applied as
# written), not on per-tensor ones (98.22 % both ways). Percentile calibration: 98.35 %; reduce_range: 97.27 %.
INT8_SCHEMES: Dict[str, Int8Scheme] = {
    "onnxruntime": Int8Scheme("onnxruntime", "uint8", False, tuple(INT8_OP_TYPES), False, True, per_channel=False),
    "tensorrt": Int8Scheme("tensorrt", "int8", True, tuple(TRT_INT8_OP_TYPES), True, False),
}


def resolve_int8_backend(cfg: ExportConfig) -> str:
    """The INT8 form ``cfg`` asks for: ``auto`` -> ``tensorrt`` for ``engine``/``triton`` formats (a Triton
    repository is written with GPU instances), ``onnxruntime`` otherwise.

    Raises:
        ValueError: an unknown form or calibration method, or an ``onnxruntime``-form INT8 graph for a TensorRT
            engine (TensorRT's parser rejects uint8 Q/DQ with non-zero zero points).
    """
    if cfg.int8_calibration not in CALIBRATION_METHODS:
        raise ValueError(f"--int8-calibration must be one of {CALIBRATION_METHODS}, got {cfg.int8_calibration!r}")
    b = cfg.int8_backend
    if b == "auto":
        return "tensorrt" if cfg.format in ("engine", "triton") else "onnxruntime"
    if b == "openvino":  # an OpenVINO IR (export/openvino_int8.py), beside the ONNX graphs
        if cfg.int8 and cfg.format != "onnx":
            raise ValueError(f"--int8-backend openvino writes an OpenVINO IR; it goes with --format onnx, not "
                             f"{cfg.format}")
        return b
    if b not in INT8_SCHEMES:
        raise ValueError(f"--int8-backend must be auto, onnxruntime, tensorrt or openvino, got {b!r}")
    if cfg.int8 and cfg.format == "engine" and b != "tensorrt":
        raise ValueError("--format engine --int8 needs the TensorRT INT8 form (--int8-backend tensorrt or auto): "
                         "TensorRT's ONNX parser accepts only signed int8 Q/DQ with zero point 0")
    return b


@dataclass
class ExportResult:
    """Files written by an export and the parity measured for each (keyed by precision)."""

    files: Dict[str, Path] = field(default_factory=dict)
    metadata: Dict[str, ModelMetadata] = field(default_factory=dict)
    parity: Dict[str, dict] = field(default_factory=dict)


def _versions() -> dict:
    import onnxruntime

    v = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
         "python": platform.python_version()}
    try:
        import onnxslim

        v["onnxslim"] = onnxslim.__version__
    except Exception:  # onnxslim is optional when simplify=False
        pass
    return v


def _to_input(frames: List[np.ndarray], layout: str, mean, std) -> np.ndarray:
    x = np.stack(frames)  # (B, H, W, 3) uint8
    if layout == "uint8_nhwc":
        return x
    xf = x.astype(np.float32) / 255.0
    xf = (xf - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(xf.transpose(0, 3, 1, 2))


def _export_fp32(wrapper: ExportWrapper, cfg: ExportConfig, size: Tuple[int, int], path: Path) -> onnx.ModelProto:
    h, w = size
    nhwc = wrapper.input_layout == "uint8_nhwc"
    b = max(2, cfg.batch) if cfg.dynamic else cfg.batch
    if nhwc:
        x = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8)
    else:
        x = torch.randn(b, 3, h, w)
    tmp = path.with_name(path.name + ".export-tmp")
    try:
        kw = dict(input_names=[wrapper.input_name], output_names=[wrapper.output_name], opset_version=cfg.opset)
        if cfg.legacy_exporter:
            if cfg.dynamic:
                hw = (1, 2) if nhwc else (2, 3)
                axes = {0: "batch", hw[0]: "height", hw[1]: "width"}
                out_axes = ({0: "batch", 1: "height", 2: "width"} if wrapper.output_kind == "class_map"
                            else {0: "batch"})
                kw["dynamic_axes"] = {wrapper.input_name: axes, wrapper.output_name: out_axes}
            torch.onnx.export(wrapper, (x,), str(tmp), dynamo=False, **kw)
        else:
            if cfg.dynamic:
                from torch.export import Dim

                batch = Dim("batch", min=1, max=max(cfg.max_batch, b))
                height = Dim("height", min=cfg.min_size[0], max=cfg.max_size[0])
                width = Dim("width", min=cfg.min_size[1], max=cfg.max_size[1])
                dims = {0: batch, 1: height, 2: width} if nhwc else {0: batch, 2: height, 3: width}
                kw["dynamic_shapes"] = {"x": dims}
            torch.onnx.export(wrapper, (x,), str(tmp), dynamo=True, external_data=False, verbose=False, **kw)
        model = onnx.load(str(tmp))
    except Exception as e:  # a full disk or read-only folder: one line naming the file
        err = write_error(path, e, what="ONNX model")
        if err is not None:
            raise err from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if cfg.simplify:
        import onnxslim

        model = onnxslim.slim(model)
    onnx.checker.check_model(model)
    return model


def _save_onnx(model: onnx.ModelProto, path: Path, meta: ModelMetadata) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "segadapt", json.dumps(meta.to_dict())
    write_atomic(path, model.SerializeToString())
    meta.save(metadata_path(path))


def _ort_session(model: onnx.ModelProto | str | Path, optimize: bool = True):
    """A CPU ONNX Runtime session; ``optimize=False`` runs the graph as written (no fusions: each Q/DQ applied
    separately, convolutions in float32, which is how TensorRT computes an int8 Q/DQ graph up to rounding)."""
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _with_logits_output(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Optional[str]]:
    """A copy of a class-map graph that also outputs the upsampled logits (the ArgMax input), for parity checks."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    argmax = [n for n in m.graph.node if n.op_type == "ArgMax"]
    if not argmax:
        return m, None
    name = argmax[-1].input[0]
    if name not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m, name


def graph_batch(model: onnx.ModelProto) -> int:
    """The static batch of a graph's first input (its first dimension), or 1 when the batch is dynamic."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1


def batches(x: np.ndarray, b: int):
    """Yield ``(batch, n)``: consecutive chunks of ``b`` items of ``x`` (B, ...), the last one padded to ``b`` items
    by repeating its last item; ``n`` is how many leading items are real (drop the rest of the outputs)."""
    for i in range(0, x.shape[0], b):
        chunk = x[i:i + b]
        n = chunk.shape[0]
        if n < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
        yield chunk, n


def parity_report(model: onnx.ModelProto, inputs: np.ndarray, ref_out: np.ndarray,
                  ref_logits: Optional[np.ndarray], exact_qdq: bool = False) -> dict:
    """Compare an ONNX graph (ONNX Runtime, CPU) with reference outputs on the same inputs.

    Frames are fed in batches of the graph's static batch (:func:`graph_batch`; one at a time for a dynamic batch),
    the last batch padded with repeats whose outputs are dropped.

    Args:
        model: the graph.
        inputs: the graph's input frames (N, H, W, 3) uint8 NHWC or (N, 3, H, W) float32 NCHW; any N >= 1.
        ref_out: reference output for the N frames: (N, H, W) class map or (N, K, h, w) logits.
        ref_logits: reference (N, K, H, W) upsampled logits for a class-map graph (None for a logits graph).
        exact_qdq: run without ONNX Runtime's graph optimisations (how TensorRT computes an int8 Q/DQ graph; see the
            module docstring).

    Returns:
        ``class_agreement`` (fraction of pixels with the same class, 0-1), ``max_abs_logit_diff``,
        ``mean_abs_logit_diff``, ``frames`` (N), ``batch`` (the graph's batch), ``ort_graph_optimization``
        (``all`` or ``none``).
    """
    probe, logits_name = _with_logits_output(model)
    sess = _ort_session(probe, optimize=not exact_qdq)
    in_name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    b = graph_batch(model)
    mains, lgs = [], []
    for xb, n in batches(inputs, b):
        d = dict(zip(outs, sess.run(None, {in_name: xb})))
        mains.append(d[outs[0]][:n])
        if logits_name is not None:
            lgs.append(d[logits_name][:n].astype(np.float32))
    main = np.concatenate(mains)
    res: dict = {"frames": int(inputs.shape[0]), "batch": b, "ort_graph_optimization": "none" if exact_qdq else "all"}
    if logits_name is not None:
        res["class_agreement"] = float((main.astype(np.int64) == ref_out.astype(np.int64)).mean())
        got_logits, ref_l = np.concatenate(lgs), ref_logits
    else:
        got_logits, ref_l = main.astype(np.float32), ref_out
        res["class_agreement"] = float((got_logits.argmax(1) == ref_out.argmax(1)).mean())
    if ref_l is not None and got_logits.shape == ref_l.shape:
        diff = np.abs(got_logits - ref_l)
        res["max_abs_logit_diff"] = float(diff.max())
        res["mean_abs_logit_diff"] = float(diff.mean())
    return res


class _FrameReader:
    """onnxruntime CalibrationDataReader over a list of input batches (one graph input per call)."""

    def __init__(self, name: str, batches: List[np.ndarray]):
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def _preprocessing_nodes(model: onnx.ModelProto) -> List[str]:
    """Names of the nodes on the data path between the graph input and the first Conv/MatMul/Gemm (layout change,
    cast, normalisation). They stay FP32 in the FP16 graph (the uint8 -> float cast must meet FP32 constants) and
    are not quantised in the INT8 graph: ONNX Runtime's QLinearMul/QLinearAdd with a per-channel broadcast took
    17 of 36 ms of a DeepLabV3-MobileNetV2 INT8 graph at 1x360x480 (measured), leaving it slower than FP32.
    ``Shape`` nodes end the walk: what follows them computes shapes of a dynamic graph, not pixels."""
    consumers: Dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen: Dict[str, None] = {}
    frontier = [i.name for i in model.graph.input]
    while frontier:
        t = frontier.pop()
        for n in consumers.get(t, []):
            if n.op_type in ("Conv", "MatMul", "Gemm", "Shape", "Size") or n.name in seen:
                continue
            seen[n.name] = None
            frontier.extend(n.output)
    return list(seen)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and activations with FP32 inputs/outputs; ops in :data:`FP16_BLOCK_LIST` and the input
    preprocessing stay FP32."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float32 number ... will be truncated": expected for tiny weights
        m16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_BLOCK_LIST,
                                               node_block_list=_preprocessing_nodes(model))
    del m16.graph.value_info[:]  # stale shape annotations break buffer reuse in ORT (deploy-notes 1.4)
    onnx.checker.check_model(m16)
    return m16


def _quant_pre_process(fp32_path: Path, pre: Path) -> None:
    """onnxruntime's pre-processing (shape inference, folding) of ``fp32_path`` into ``pre``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # onnxruntime's symbolic shape inference cannot finish on our dynamic height/width graphs, and when it fails
    # it leaves sym_shape_infer_temp.onnx + a <uuid>.data file in the working directory: skip it there (ONNX's
    # own shape inference is enough for QDQ), and clean up after it if it fails on a static graph
    dynamic = any(d.dim_param for i in onnx.load(str(fp32_path), load_external_data=False).graph.input
                  for d in i.type.tensor_type.shape.dim)
    before = set(Path.cwd().iterdir())
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=dynamic)
    except Exception:  # onnxruntime raises a bare Exception when symbolic inference is incomplete
        for f in set(Path.cwd().iterdir()) - before:
            if f.name == "sym_shape_infer_temp.onnx" or re.fullmatch(r"[0-9a-f-]{36}\.data", f.name):
                f.unlink(missing_ok=True)
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)


def _quant_settings(scheme: Int8Scheme, calibration: str, model: onnx.ModelProto) -> dict:
    """Keyword arguments of onnxruntime's ``quantize_static`` for ``scheme`` on ``model`` (the pre-processed graph).

    The input normalisation stays FP32 in both forms. The TensorRT form also leaves bias adds (an Add with a
    constant input) unquantised: TensorRT's advice is to quantise residual adds, and an int8 per-tensor bias only
    loses precision.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    exclude = _preprocessing_nodes(model)
    extra: dict = {"ActivationSymmetric": scheme.activation_symmetric, "WeightSymmetric": True}
    if scheme.name == "tensorrt":
        consts = {t.name for t in model.graph.initializer}
        consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        exclude += [n.name for n in model.graph.node if n.op_type == "Add" and any(i in consts for i in n.input)]
    if scheme.inputs_only:
        extra["OpTypesToExcludeOutputQuantization"] = sorted({n.op_type for n in model.graph.node})
        extra["ForceQuantizeNoInputCheck"] = True
    extra["QuantizeBias"] = scheme.quantize_bias
    extra["QDQOpTypePerChannelSupportToAxis"] = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}  # output channels
    if calibration == "percentile":
        extra["CalibPercentile"] = 99.99
    # (entropy: quantize_static keeps 128 histogram bins for 128 quantised bins, which leaves min-max thresholds;
    # it agreed with PyTorch to the last pixel as min-max did in benchmarks/int8_settings.py)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    act = QuantType.QInt8 if scheme.activation_type == "int8" else QuantType.QUInt8
    return dict(quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel, activation_type=act,
                weight_type=QuantType.QInt8,
                calibrate_method=method, op_types_to_quantize=list(scheme.op_types), nodes_to_exclude=exclude,
                extra_options=extra)


def quantize_int8(fp32_path: Path, out_path: Path, calib_inputs: List[np.ndarray], input_name: str,
                  scheme: str = "onnxruntime", calibration: str = "minmax") -> onnx.ModelProto:
    """Static INT8 quantisation in QDQ format (symmetric int8 weights, per tensor or channel as the scheme says),
    calibrated on frames.

    Args:
        fp32_path: the FP32 graph.
        out_path: where the INT8 graph will be written (temporary files go beside it; nothing is written there).
        calib_inputs: calibration batches, each a graph input (b, H, W, 3) uint8 or (b, 3, H, W) float32 with b the
            graph's batch (any b for a dynamic batch).
        input_name: the graph's input name.
        scheme: ``onnxruntime`` (uint8 asymmetric activations) or ``tensorrt`` (int8 symmetric, zero points 0,
            float biases, Q/DQ on op inputs only), see :data:`INT8_SCHEMES`.
        calibration: ``minmax``, ``percentile`` or ``entropy``.

    Returns:
        the checked INT8 graph.

    Raises:
        ValueError: no calibration frames, unknown scheme or calibration method.
    """
    from onnxruntime.quantization import quantize_static

    if not calib_inputs:
        raise ValueError("INT8 quantisation needs calibration frames (--calib DIR)")
    if scheme not in INT8_SCHEMES or calibration not in CALIBRATION_METHODS:
        raise ValueError(f"unknown INT8 scheme {scheme!r} or calibration {calibration!r}")
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    tmp = out_path.with_name(out_path.stem + ".q.onnx")
    try:
        _quant_pre_process(fp32_path, pre)
        kw = _quant_settings(INT8_SCHEMES[scheme], calibration, onnx.load(str(pre)))
        quantize_static(str(pre), str(tmp), _FrameReader(input_name, calib_inputs), **kw)
        model = onnx.load(str(tmp))
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    onnx.checker.check_model(model)
    return model


def tensorrt_qdq_problems(model: onnx.ModelProto) -> List[str]:
    """What keeps TensorRT's ONNX parser from taking an INT8 Q/DQ graph (empty list: nothing).

    TensorRT takes signed int8 QuantizeLinear/DequantizeLinear with zero point 0 and positive constant scales, and
    dequantises no int32 tensor (a quantised bias). Each problem names the node.
    """
    init = {t.name: t for t in model.graph.initializer}
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.input[1] not in init:
            problems.append(f"{n.name}: scale is not a constant")
        elif (onnx.numpy_helper.to_array(init[n.input[1]]) <= 0).any():
            problems.append(f"{n.name}: scale <= 0")
        zp = init.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            problems.append(f"{n.name}: no constant zero point (defaults to uint8)")
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            problems.append(f"{n.name}: zero point is {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
        elif onnx.numpy_helper.to_array(zp).any():
            problems.append(f"{n.name}: zero point is not 0")
    return problems


def _reference(wrapper: ExportWrapper, x_np: np.ndarray, b: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """PyTorch's outputs on the parity frames, fed in the same padded batches of ``b`` as the graph (see
    :func:`batches`): the graph's output (N, H, W) class map or (N, K, h, w) logits, and for a class-map graph the
    (N, K, H, W) upsampled logits (else None)."""
    outs, lgs = [], []
    with torch.no_grad():
        for xb, n in batches(x_np, b):
            xt = torch.from_numpy(np.ascontiguousarray(xb))
            outs.append(wrapper(xt)[:n].numpy())
            if wrapper.output_kind == "class_map":
                lgs.append(wrapper.upsampled_logits(xt)[:n].numpy())
    return np.concatenate(outs), (np.concatenate(lgs) if lgs else None)


def _base_metadata(cfg: ExportConfig, ck: Path, model, meta_ck, wrapper: ExportWrapper, size) -> dict:
    """The metadata fields shared by every graph of one export (everything but precision, parity, quantization);
    ``adaptation`` is the checkpoint's ``info["selection"]`` (verdict, margin, picked, rule, reason) when it has one."""
    return dict(
        classes=list(meta_ck.classes.names), palette=[list(c) for c in meta_ck.classes.palette],
        ignore_index=meta_ck.classes.ignore_index, input_name=wrapper.input_name, output_name=wrapper.output_name,
        input_layout=cfg.input_layout, input_size=size, dynamic=cfg.dynamic, min_size=cfg.min_size,
        max_size=cfg.max_size, batch=cfg.batch, max_batch=cfg.max_batch if cfg.dynamic else cfg.batch,
        mean=meta_ck.mean, std=meta_ck.std, output_kind=cfg.output,
        output_dtype=cfg.class_dtype if cfg.output == "class_map" else "float32",
        output_stride=1 if cfg.output == "class_map" else model.output_stride, format="onnx", arch=model.arch,
        source_checkpoint=str(ck), source_checkpoint_sha256=checkpoint_hash(ck) if is_checkpoint(ck) else "",
        exporter=_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        adaptation=selection_record((meta_ck.info or {}).get("selection")))  # the adaptation's verdict, if any


def export_onnx(cfg: ExportConfig, log: Callable[[str], None] = print) -> ExportResult:
    """Export a checkpoint's RGB segmenter to ONNX (FP32, plus FP16/INT8 variants on request).

    Writes ``<out>/<name>.onnx`` (+ ``.fp16.onnx``, ``.int8.onnx``) and a ``.json`` metadata file beside each,
    atomically, and prints the parity of each graph against PyTorch on real frames. The INT8 graph is in the form
    :func:`resolve_int8_backend` picks (its metadata's ``quantization`` says which).

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, opset < 17, missing calibration frames, an INT8 form the
            format cannot use.
    """
    if cfg.opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization, TensorRT FP16 accuracy), got {cfg.opset}")
    int8_scheme = resolve_int8_backend(cfg)
    ck = Path(cfg.checkpoint)
    model, meta_ck = load_segmenter(ck)
    model.eval()
    size = tuple(cfg.imgsz) if all(cfg.imgsz) else tuple(meta_ck.input_size)
    wrapper = ExportWrapper(model, meta_ck.mean, meta_ck.std, cfg.input_layout, cfg.output, cfg.class_dtype).eval()
    out = Path(cfg.out) if cfg.out else ck.with_name(ck.name + "-export")
    out.mkdir(parents=True, exist_ok=True)
    res = ExportResult()

    t0 = time.time()
    fp32 = _export_fp32(wrapper, cfg, size, out / f"{cfg.name}.onnx")
    log(f"exported FP32 graph in {time.time() - t0:.1f} s (opset {cfg.opset}, "
        f"{'dynamic' if cfg.dynamic else 'static'} {cfg.batch}x{size[0]}x{size[1]})")
    base = _base_metadata(cfg, ck, model, meta_ck, wrapper, size)

    # parity frames: real footage, in the graph's own batches (a static batch-N graph takes exactly N frames)
    from segadapt.adapt.config import default_camvid_dir

    pdir = cfg.parity_data or cfg.calib or str(Path(default_camvid_dir()) / "tiny" / "target")
    x_np = _to_input(load_frames(pdir, cfg.parity_frames, size), cfg.input_layout, meta_ck.mean, meta_ck.std)
    b = graph_batch(fp32)
    ref, ref_logits = _reference(wrapper, x_np, b)

    def finish(precision: str, m: onnx.ModelProto, path: Path, quant: Optional[dict] = None) -> None:
        exact = bool(quant) and quant["scheme"] == "tensorrt"
        p = parity_report(m, x_np, ref, ref_logits, exact_qdq=exact)
        p["data"] = pdir
        meta = ModelMetadata(**base, precision=precision, parity=p, quantization=quant or {})
        _save_onnx(m, path, meta)
        res.files[precision], res.metadata[precision], res.parity[precision] = path, meta, p
        diff = f", max |logit diff| {p['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in p else ""
        how = " (as TensorRT computes it: Q/DQ applied as written)" if exact else ""
        log(f"{precision}: {path} ({path.stat().st_size / 1e6:.1f} MB) vs PyTorch on {p['frames']} real frames"
            f"{how}: {p['class_agreement'] * 100:.3f} % same class{diff}")

    finish("fp32", fp32, out / f"{cfg.name}.onnx")
    if cfg.half:
        finish("fp16", convert_fp16(fp32), out / f"{cfg.name}.fp16.onnx")
    if cfg.int8:
        cdir = cfg.calib or pdir
        calib = _to_input(load_frames(cdir, cfg.calib_frames, size), cfg.input_layout, meta_ck.mean, meta_ck.std)
        cin = [xb for xb, _ in batches(calib, b)]
        if int8_scheme == "openvino":  # NNCF -> <name>.int8.xml/.bin + <name>.int8.xml.json
            from segadapt.export.openvino_int8 import export_openvino_int8

            path, meta, p = export_openvino_int8(res.files["fp32"], out / f"{cfg.name}.int8.xml", cin, x_np, ref,
                                                 base, cdir, batch=b, parity_data=pdir, log=log)
            res.files["int8"], res.metadata["int8"], res.parity["int8"] = path, meta, p
            return res
        t1 = time.time()
        q = quantize_int8(res.files["fp32"], out / f"{cfg.name}.int8.onnx", cin, wrapper.input_name,
                          scheme=int8_scheme, calibration=cfg.int8_calibration)
        log(f"INT8 Q/DQ ({int8_scheme} form, {cfg.int8_calibration} calibration) on {len(calib)} frames from {cdir} "
            f"took {time.time() - t1:.1f} s")
        quant = INT8_SCHEMES[int8_scheme].describe(cfg.int8_calibration, len(calib), cdir)
        finish("int8", q, out / f"{cfg.name}.int8.onnx", quant)
    return res
