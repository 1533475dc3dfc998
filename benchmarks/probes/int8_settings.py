"""INT8 post-training quantisation settings, side by side: class agreement with PyTorch on held-out real frames.

The checkpoint is exported once as `segadapt export` does it (FP32 ONNX, dynamic batch/height/width, uint8 NHWC
input with the normalisation inside, ArgMax inside) at ``--size``; the frames of ``--data`` are split in two
interleaved halves (even frames calibrate, odd frames are scored; labels are never read). Each setting quantises
the FP32 graph and is scored by the fraction of pixels whose class equals PyTorch's (FP32, eager) on the scored
frames:

* NNCF (OpenVINO IR, run by OpenVINO's CPU plugin in f32 inference precision, the INT8 kernels doing the work):
  presets ``performance`` (symmetric activations) vs ``mixed`` (asymmetric activations), fast vs full bias
  correction (``fast_bias_correction=False``), the classifier (the last convolution) kept in float
  (``ignored_scope``), the overflow fix on every layer (7-bit weights: CPUs without VNNI add u8 x s8 pairs in int16
  and can saturate), and for transformer models SmoothQuant on/off (NNCF applies it to MatMuls of
  ``ModelType.TRANSFORMER`` only; DeepLabV3 has none, so it is skipped there).
* onnxruntime's ``quantize_static`` (QDQ, the onnxruntime form of ``segadapt export --int8``; run by ONNX Runtime's
  CPU provider with all graph optimisations, which fuses Q/DQ into its int8 kernels): per-channel vs per-tensor
  weights, MinMax vs Entropy vs Percentile calibration, the classifier kept in float, ``reduce_range`` (7-bit
  weights, onnxruntime's advice against u8s8 saturation on AVX2 CPUs without VNNI). Each row also gives the
  agreement with the Q/DQ applied as written (no graph optimisations, float kernels): the quantisation error alone.
* ``default-*`` rows: what the project's code does now (``quantize_openvino``, ``quantize_int8``), so a rerun checks
  the defaults against the table.

Example (the run behind the INT8 defaults in docs/results.md; on a shared machine only agreement is meaningful;
$DATA is the data root):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/probes/int8_settings.py --checkpoint runs/pipeline/source/best \\
        --data $DATA/camvid-day2dusk/target_adapt --json runs/bench/int8_settings.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.export.config import ExportConfig
from segadapt.export.frames import load_frames
from segadapt.export.onnx_export import (
    INT8_SCHEMES,
    _quant_pre_process,
    _quant_settings,
    _reference,
    export_onnx,
    parity_report,
    quantize_int8,
)
from segadapt.export.wrapper import ExportWrapper
from segadapt.runtime.files import write_atomic


def _last_convs(names_types: List[tuple], conv_type: str, n: int = 1) -> List[str]:
    """Names of the last ``n`` convolutions (graph order) among (name, type) pairs: the classifier."""
    return [nm for nm, t in names_types if t == conv_type][-n:]


def nncf_settings(transformer: bool) -> Dict[str, dict]:
    """NNCF ``quantize`` keyword sets by row name (``ignore_head`` is resolved on the model)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    perf, mixed = nncf.QuantizationPreset.PERFORMANCE, nncf.QuantizationPreset.MIXED
    of = {"advanced_parameters": AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)}
    rows = {
        "nncf performance": {"preset": perf},
        "nncf mixed": {"preset": mixed},
        "nncf mixed, graph from core.read_model (no conversion passes)": {"preset": mixed, "read_model": True},
        "nncf mixed, full bias correction": {"preset": mixed, "fast_bias_correction": False},
        "nncf performance, full bias correction": {"preset": perf, "fast_bias_correction": False},
        "nncf mixed, full bias correction, classifier in float": {"preset": mixed, "fast_bias_correction": False,
                                                                  "ignore_head": True},
        "nncf mixed, classifier in float": {"preset": mixed, "ignore_head": True},
        "nncf mixed, overflow fix all layers": {"preset": mixed, **of},
        "nncf performance, overflow fix all layers": {"preset": perf, **of},
        "nncf mixed, overflow fix all layers, classifier in float": {"preset": mixed, "ignore_head": True, **of},
        "nncf mixed, overflow fix all layers, full bias correction": {"preset": mixed, "fast_bias_correction": False,
                                                                      **of},
    }
    if transformer:
        sq_off = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
        for r in rows.values():
            r["model_type"] = nncf.ModelType.TRANSFORMER
        rows["nncf mixed, SmoothQuant off"] = {"preset": mixed, "model_type": nncf.ModelType.TRANSFORMER,
                                               "advanced_parameters": sq_off}
    return rows


def ort_settings() -> Dict[str, dict]:
    """onnxruntime static quantisation variants by row name, as changes to the project's onnxruntime form."""
    return {
        "ort minmax per-channel": {"calibration": "minmax"},
        "ort minmax per-tensor": {"calibration": "minmax", "per_channel": False},
        "ort minmax per-tensor, classifier in float": {"calibration": "minmax", "per_channel": False,
                                                       "ignore_head": True},
        "ort percentile per-tensor": {"calibration": "percentile", "per_channel": False},
        "ort entropy per-channel": {"calibration": "entropy"},
        "ort percentile per-channel": {"calibration": "percentile"},
        "ort minmax per-channel, classifier in float": {"calibration": "minmax", "ignore_head": True},
        "ort minmax per-channel, reduce_range": {"calibration": "minmax", "reduce_range": True},
        "ort minmax per-channel, reduce_range, classifier in float": {"calibration": "minmax", "reduce_range": True,
                                                                       "ignore_head": True},
        "ort percentile per-channel, reduce_range": {"calibration": "percentile", "reduce_range": True},
    }


def _ov_agreement(model, x: np.ndarray, ref: np.ndarray) -> float:
    """Class agreement of an ``openvino.Model`` (f32 inference precision: the INT8 ops stay INT8) with ``ref``."""
    from segadapt.runtime.openvino_backend import shared_core

    cm = shared_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = cm.create_infer_request()
    got = np.concatenate([req.infer({0: x[i:i + 1]})[0] for i in range(len(x))])
    return float((got.astype(np.int64) == ref.astype(np.int64)).mean())


def run_nncf(fp32: Path, calib: List[np.ndarray], x: np.ndarray, ref: np.ndarray, arch: str, only: str,
             log: Callable[[str], None]) -> Dict[str, dict]:
    """Every NNCF setting (and the project's default) on the FP32 graph: agreement and quantisation time."""
    import nncf
    import openvino as ov
    from segadapt.export.openvino_int8 import quantize_openvino
    from segadapt.runtime.openvino_backend import shared_core

    transformer = "segformer" in arch.lower()
    rows: Dict[str, dict] = {}
    settings = {"default (export/openvino_int8.py quantize_openvino)": None, **nncf_settings(transformer)}
    for name, kw in settings.items():
        if only and not any(o in name for o in only.split("|")):
            continue
        t0 = time.time()
        try:
            if kw is None:
                q = quantize_openvino(fp32, calib, arch)
            else:
                kw = dict(kw)
                raw = kw.pop("read_model", False)  # OpenVINO's ONNX reader alone, without its conversion passes
                model = shared_core().read_model(str(fp32)) if raw else ov.convert_model(str(fp32))
                if kw.pop("ignore_head", False):
                    ops = [(o.get_friendly_name(), o.get_type_name()) for o in model.get_ordered_ops()]
                    kw["ignored_scope"] = nncf.IgnoredScope(names=_last_convs(ops, "Convolution"))
                q = nncf.quantize(model, nncf.Dataset(list(calib)), subset_size=len(calib), **kw)
            secs = time.time() - t0
            rows[name] = {"class_agreement": _ov_agreement(q, x, ref), "quantize_s": secs}
        except Exception as e:  # recorded, the other settings go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{name}: {rows[name]}")
    return rows


def _ort_quantize(fp32: Path, work: Path, calib: List[np.ndarray], input_name: str, calibration: str = "minmax",
                  per_channel: bool = True, reduce_range: bool = False, ignore_head: bool = False) -> onnx.ModelProto:
    """The project's onnxruntime-form settings (``_quant_settings``) with one or more of them changed."""
    from onnxruntime.quantization import quantize_static
    from segadapt.export.onnx_export import _FrameReader

    pre, tmp = work / "ort.pre.onnx", work / "ort.q.onnx"
    _quant_pre_process(fp32, pre)
    m = onnx.load(str(pre))
    kw = _quant_settings(INT8_SCHEMES["onnxruntime"], calibration, m)
    kw["per_channel"], kw["reduce_range"] = per_channel, reduce_range
    if ignore_head:
        kw["nodes_to_exclude"] = kw["nodes_to_exclude"] + _last_convs([(n.name, n.op_type) for n in m.graph.node],
                                                                       "Conv")
    quantize_static(str(pre), str(tmp), _FrameReader(input_name, calib), **kw)
    return onnx.load(str(tmp))


def run_ort(fp32: Path, work: Path, calib: List[np.ndarray], x: np.ndarray, ref: np.ndarray, ref_logits,
            input_name: str, only: str, log: Callable[[str], None]) -> Dict[str, dict]:
    """Every onnxruntime setting (and the project's default): agreement optimised and as written, and time."""
    rows: Dict[str, dict] = {}
    settings = {"default (export/onnx_export.py quantize_int8)": None, **ort_settings()}
    for name, kw in settings.items():
        if only and not any(o in name for o in only.split("|")):
            continue
        t0 = time.time()
        try:
            if kw is None:
                q = quantize_int8(fp32, work / "default.int8.onnx", calib, input_name)
            else:
                q = _ort_quantize(fp32, work, calib, input_name, **kw)
            secs = time.time() - t0
            rows[name] = {"class_agreement": parity_report(q, x, ref, ref_logits)["class_agreement"],
                          "class_agreement_qdq_as_written":
                              parity_report(q, x, ref, ref_logits, exact_qdq=True)["class_agreement"],
                          "quantize_s": secs}
        except Exception as e:  # recorded, the other settings go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{name}: {rows[name]}")
    return rows


def measure(checkpoint: str, data: str, size, work: Path, which: str, only: str, reuse: bool = False,
            log=print) -> dict:
    """Export (``reuse``: take ``<work>/model.onnx`` from an earlier run of the same checkpoint and size instead),
    split the frames, and score every setting (see the module docstring); a JSON-ready dict."""
    from segadapt.runtime.metadata import ModelMetadata, metadata_path

    model, meta = load_segmenter(checkpoint)
    size = tuple(size) if size else tuple(meta.input_size)
    frames = load_frames(data, 10**6, size)
    calib_frames, scored = frames[0::2], frames[1::2]
    fp32 = work / "model.onnx"
    if not (reuse and fp32.exists()):
        export_onnx(ExportConfig(checkpoint=checkpoint, out=str(work), imgsz=size, dynamic=True, max_batch=8,
                                 parity_data=data, parity_frames=2), log=log)
    fmeta = ModelMetadata.load(metadata_path(fp32))
    wrapper = ExportWrapper(model.eval(), meta.mean, meta.std).eval()
    x = np.stack(scored)
    ref, ref_logits = _reference(wrapper, x, 1)
    calib = [f[None] for f in calib_frames]
    rep = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
           "config": {"checkpoint": checkpoint, "arch": fmeta.arch, "data": data, "size": list(size),
                      "calibration_frames": len(calib), "scored_frames": len(scored),
                      "split": "even frames calibrate, odd frames are scored"},
           "fp32_onnx_agreement": parity_report(onnx.load(str(fp32)), x, ref, ref_logits)["class_agreement"],
           "results": {}}
    from segadapt.runtime.openvino_backend import cpu_capabilities, openvino_installed

    if which in ("all", "nncf") and openvino_installed():
        import nncf
        import openvino as ov

        rep["machine"].update(openvino=ov.get_version().split("-")[0], nncf=nncf.__version__,
                              openvino_cpu_capabilities=cpu_capabilities())
        rep["results"].update(run_nncf(fp32, calib, x, ref, fmeta.arch, only, log))
    if which in ("all", "ort"):
        import onnxruntime

        rep["machine"]["onnxruntime"] = onnxruntime.__version__
        rep["results"].update(run_ort(fp32, work, calib, x, ref, ref_logits, fmeta.input_name,
                                      only, log))
    return rep


def format_table(rep: dict) -> str:
    """The results as a Markdown table (agreement in %)."""
    rows = ["| setting | agreement | Q/DQ as written |", "|---|---|---|"]
    for k, r in rep["results"].items():
        if "error" in r:
            rows.append(f"| {k} | {r['error']} | |")
            continue
        w = f"{r['class_agreement_qdq_as_written'] * 100:.2f} %" if "class_agreement_qdq_as_written" in r else ""
        rows.append(f"| {k} | {r['class_agreement'] * 100:.2f} % | {w} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="target frames (a split folder with images/, or an image folder)")
    ap.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    ap.add_argument("--which", choices=("all", "nncf", "ort"), default="all")
    ap.add_argument("--only", default="",
                    help="only the settings whose names contain one of these texts (separated by |)")
    ap.add_argument("--work", default="runs/bench/int8_settings")
    ap.add_argument("--json", default="runs/bench/int8_settings.json")
    ap.add_argument("--reuse-export", action="store_true", help="reuse <work>/model.onnx from an earlier run")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rep = measure(a.checkpoint, a.data, a.size, work, a.which, a.only, a.reuse_export,
                  log=lambda s: print(s, flush=True))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.json, json.dumps(rep, indent=1).encode(), what="report")
    print(f"FP32 ONNX vs PyTorch: {rep['fp32_onnx_agreement'] * 100:.2f} %")
    print(format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
