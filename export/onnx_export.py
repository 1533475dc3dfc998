"""Checkpoint -> ONNX (FP32, optionally FP16 and INT8 QDQ), with metadata and a parity report.

* FP32: ``torch.onnx.export`` (dynamo exporter, ``dynamic_shapes`` for dynamic axes, example batch >= 2 when the
  batch is dynamic, single file), simplified with onnxslim, checked with ``onnx.checker``.
* FP16: onnxconverter-common's ``convert_float_to_float16`` with FP32 inputs/outputs kept and numerically sensitive
  ops (normalisation, softmax, reductions, resize) blocked from conversion.
* INT8: explicit Q/DQ quantisation with onnxruntime's static quantisation (QDQ format, per-channel weights),
  calibrated on target frames.

Precision is baked into the graph, so each variant can be checked with ONNX Runtime on any machine, and TensorRT 11
(strongly typed) builds it as it is.
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
from segadapt.runtime.files import write_atomic
from segadapt.runtime.metadata import ModelMetadata, metadata_path

# Kept in FP32 in the FP16 graph: normalisation statistics, softmax and resizing lose accuracy or overflow in FP16.
FP16_BLOCK_LIST = ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Resize", "Erf", "ArgMax",
                   "BatchNormalization", "InstanceNormalization", "Range", "Upsample"]
# (never "Cast": blocking Cast makes onnxconverter-common wrap Casts in Casts forever)
# Quantised in the INT8 graph (the input normalisation excepted, see _preprocessing_nodes).
INT8_OP_TYPES = ["Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Relu", "Clip", "AveragePool", "GlobalAveragePool"]


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
    kw = dict(input_names=[wrapper.input_name], output_names=[wrapper.output_name], opset_version=cfg.opset)
    if cfg.legacy_exporter:
        if cfg.dynamic:
            hw = (1, 2) if nhwc else (2, 3)
            axes = {0: "batch", hw[0]: "height", hw[1]: "width"}
            out_axes = {0: "batch", 1: "height", 2: "width"} if wrapper.output_kind == "class_map" else {0: "batch"}
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


def _ort_session(model: onnx.ModelProto | str | Path):
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
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


def parity_report(model: onnx.ModelProto, inputs: np.ndarray, ref_out: np.ndarray,
                  ref_logits: Optional[np.ndarray]) -> dict:
    """Compare an ONNX graph (ONNX Runtime, CPU) with reference outputs on the same inputs.

    Args:
        model: the graph.
        inputs: the graph's input batch (uint8 NHWC or float NCHW).
        ref_out: reference output: (B, H, W) class map or (B, K, h, w) logits.
        ref_logits: reference (B, K, H, W) upsampled logits for a class-map graph (None for a logits graph).

    Returns:
        ``class_agreement`` (fraction of pixels with the same class, 0-1), ``max_abs_logit_diff``,
        ``mean_abs_logit_diff``, ``frames``.
    """
    probe, logits_name = _with_logits_output(model)
    sess = _ort_session(probe)
    in_name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    res: dict = {"frames": int(inputs.shape[0])}
    got_logits = None
    got_cls = None
    for i in range(inputs.shape[0]):  # one frame at a time: static graphs may have batch 1
        o = sess.run(None, {in_name: inputs[i:i + 1]})
        d = dict(zip(outs, o))
        main = d[outs[0]]
        if logits_name is not None:
            got_cls = main if got_cls is None else np.concatenate([got_cls, main])
            lg = d[logits_name].astype(np.float32)
            got_logits = lg if got_logits is None else np.concatenate([got_logits, lg])
        else:
            got_logits = main.astype(np.float32) if got_logits is None else np.concatenate([got_logits, main])
    if logits_name is not None:
        res["class_agreement"] = float((got_cls.astype(np.int64) == ref_out.astype(np.int64)).mean())
        ref_l = ref_logits
    else:
        res["class_agreement"] = float((got_logits.argmax(1) == ref_out.argmax(1)).mean())
        ref_l = ref_out
    if ref_l is not None and got_logits is not None and got_logits.shape == ref_l.shape:
        diff = np.abs(got_logits - ref_l)
        res["max_abs_logit_diff"] = float(diff.max())
        res["mean_abs_logit_diff"] = float(diff.mean())
    return res


class _FrameReader:
    """onnxruntime CalibrationDataReader over a list of input arrays (one frame per call)."""

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


def quantize_int8(fp32_path: Path, out_path: Path, calib_inputs: List[np.ndarray], input_name: str) -> onnx.ModelProto:
    """Static INT8 quantisation in QDQ format (per-channel int8 weights, uint8 activations), calibrated on frames.

    Raises:
        ValueError: no calibration frames.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calib_inputs:
        raise ValueError("INT8 quantisation needs calibration frames (--calib DIR)")
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    tmp = out_path.with_name(out_path.stem + ".q.onnx")
    try:
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
        quantize_static(str(pre), str(tmp), _FrameReader(input_name, calib_inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=INT8_OP_TYPES, nodes_to_exclude=_preprocessing_nodes(onnx.load(str(pre))),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        model = onnx.load(str(tmp))
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    onnx.checker.check_model(model)
    return model


def export_onnx(cfg: ExportConfig, log: Callable[[str], None] = print) -> ExportResult:
    """Export a checkpoint's RGB segmenter to ONNX (FP32, plus FP16/INT8 variants on request).

    Writes ``<out>/<name>.onnx`` (+ ``.fp16.onnx``, ``.int8.onnx``) and a ``.json`` metadata file beside each,
    atomically, and prints the parity of each graph against PyTorch on real frames.

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, opset < 17, missing calibration frames.
    """
    if cfg.opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization, TensorRT FP16 accuracy), got {cfg.opset}")
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
    base = dict(
        classes=list(meta_ck.classes.names), palette=[list(c) for c in meta_ck.classes.palette],
        ignore_index=meta_ck.classes.ignore_index, input_name=wrapper.input_name, output_name=wrapper.output_name,
        input_layout=cfg.input_layout, input_size=size, dynamic=cfg.dynamic, min_size=cfg.min_size,
        max_size=cfg.max_size, batch=cfg.batch, max_batch=cfg.max_batch if cfg.dynamic else cfg.batch,
        mean=meta_ck.mean, std=meta_ck.std, output_kind=cfg.output,
        output_dtype=cfg.class_dtype if cfg.output == "class_map" else "float32",
        output_stride=1 if cfg.output == "class_map" else model.output_stride, format="onnx", arch=model.arch,
        source_checkpoint=str(ck), source_checkpoint_sha256=checkpoint_hash(ck) if is_checkpoint(ck) else "",
        exporter=_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))

    # parity frames: real footage
    from segadapt.adapt.config import default_camvid_dir

    pdir = cfg.parity_data or cfg.calib or str(Path(default_camvid_dir()) / "tiny" / "target")
    frames = load_frames(pdir, cfg.parity_frames, size)
    x_np = _to_input(frames, cfg.input_layout, meta_ck.mean, meta_ck.std)
    with torch.no_grad():
        xt = torch.from_numpy(x_np)
        ref = torch.cat([wrapper(xt[i:i + 1]) for i in range(len(xt))]).numpy()
        ref_logits = (torch.cat([wrapper.upsampled_logits(xt[i:i + 1]) for i in range(len(xt))]).numpy()
                      if cfg.output == "class_map" else None)

    def finish(precision: str, m: onnx.ModelProto, path: Path) -> None:
        p = parity_report(m, x_np, ref, ref_logits)
        p["data"] = pdir
        meta = ModelMetadata(**base, precision=precision, parity=p)
        _save_onnx(m, path, meta)
        res.files[precision], res.metadata[precision], res.parity[precision] = path, meta, p
        diff = f", max |logit diff| {p['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in p else ""
        log(f"{precision}: {path} ({path.stat().st_size / 1e6:.1f} MB) vs PyTorch on {p['frames']} real frames: "
            f"{p['class_agreement'] * 100:.3f} % same class{diff}")

    finish("fp32", fp32, out / f"{cfg.name}.onnx")
    if cfg.half:
        finish("fp16", convert_fp16(fp32), out / f"{cfg.name}.fp16.onnx")
    if cfg.int8:
        cdir = cfg.calib or pdir
        calib = load_frames(cdir, cfg.calib_frames, size)
        cin = [_to_input([f], cfg.input_layout, meta_ck.mean, meta_ck.std) for f in calib]
        t1 = time.time()
        q = quantize_int8(res.files["fp32"], out / f"{cfg.name}.int8.onnx", cin, wrapper.input_name)
        log(f"INT8 QDQ calibration on {len(cin)} frames from {cdir} took {time.time() - t1:.1f} s")
        finish("int8", q, out / f"{cfg.name}.int8.onnx")
    return res
