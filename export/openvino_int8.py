"""INT8 for the OpenVINO CPU backend: NNCF post-training quantisation of the exported FP32 graph, calibrated on
target frames, written as an OpenVINO IR (``<name>.int8.xml`` + ``.bin``) with its metadata sidecar
(``<name>.int8.xml.json``) and an accuracy report (class agreement with PyTorch on real frames).

``openvino.convert_model`` reads the FP32 ONNX graph (uint8 NHWC in, normalisation and ArgMax inside, as exported;
its passes fold the dynamic graph's ShapeOf/Broadcast bias reshapes into constants: quantised without them, the
dynamic INT8 IR of a trained DeepLabV3-MobileNetV2 at 360x480 agreed 55 % with PyTorch). NNCF runs the calibration
frames through it, inserts FakeQuantize operations (int8 weights per channel, activations per tensor) and corrects
biases. Settings measured on that model (benchmarks/int8_settings.py; 31 CamVid dusk frames calibrate, the other 31
are scored; AVX2 CPU without VNNI): preset ``performance`` (symmetric int8 activations) 96.74 % and ``mixed``
(asymmetric activations) 97.06 % with NNCF's fast bias correction, 98.37 % and 98.24 % with full bias correction
(``fast_bias_correction=False``); the classifier in float and the overflow fix on every layer gained nothing. On the
tests' tiny model (0.35 width, 96x128) ``performance`` + full bias correction agreed 96.3 %, ``mixed`` 88.7 %. Hence
``performance`` + full bias correction (symmetric activations also need no zero-point arithmetic). SegFormer also gets
NNCF's transformer model type (SmoothQuant on its MatMuls, softmax and layer norms kept in float). Float weights
are stored as f32 in the IR (not OpenVINO's default f16 compression), so the only rounding is int8's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from segadapt.runtime.metadata import ModelMetadata
from segadapt.runtime.openvino_backend import shared_core


def _require():
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise ImportError(f"OpenVINO INT8 needs openvino and nncf ({e}): pip install 'segadapt[openvino-int8]'",
                          name=e.name) from None
    return ov, nncf


def quantize_openvino(fp32_onnx: str | Path, calib_inputs: List[np.ndarray], arch: str = ""):
    """NNCF post-training INT8 quantisation of an FP32 ONNX graph for OpenVINO.

    Args:
        fp32_onnx: the exported FP32 graph.
        calib_inputs: calibration batches, each a graph input ((b, H, W, 3) uint8 or (b, 3, H, W) float32) of the
            graph's batch b; all of them are used.
        arch: the model's architecture name; ``segformer*`` selects NNCF's transformer model type.

    Returns:
        the quantised ``openvino.Model``.

    Raises:
        ValueError: no calibration frames. ImportError: openvino or nncf missing.
    """
    ov, nncf = _require()
    if not calib_inputs:
        raise ValueError("INT8 quantisation needs calibration frames (--calib DIR)")
    # convert_model, not core.read_model: its passes fold the dynamic graph's ShapeOf/Broadcast bias reshapes into
    # constants; quantised unfolded, the dynamic INT8 IR agreed 55 % with PyTorch (93.9 % once reshaped static)
    model = ov.convert_model(str(fp32_onnx))
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if "segformer" in arch.lower() else {}
    return nncf.quantize(model, nncf.Dataset(list(calib_inputs)), subset_size=len(calib_inputs),
                         preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=False, **kw)


def save_ir(model, xml_path: str | Path) -> Path:
    """Write an ``openvino.Model`` as ``<xml_path>`` + its ``.bin``, atomically: both files are written in a scratch
    folder beside them and moved into place, the ``.bin`` first, so a reader never finds an ``.xml`` whose weights
    are missing or from another model. Float weights stay f32."""
    ov, _ = _require()
    xml_path = Path(xml_path)
    tmp = xml_path.parent / f".{xml_path.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(tmp / xml_path.name), compress_to_fp16=False)
        os.replace(tmp / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
        os.replace(tmp / xml_path.name, xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml_path


def openvino_agreement(model_path: str | Path, inputs: np.ndarray, ref_out: np.ndarray, batch: int = 1,
                       precision: str = "auto") -> dict:
    """Class agreement of a graph run by OpenVINO on the CPU with reference outputs (PyTorch's) on the same inputs.

    Args:
        model_path: ``.xml`` IR or ``.onnx`` graph.
        inputs: (N, H, W, 3) uint8 or (N, 3, H, W) float32 graph inputs.
        ref_out: (N, H, W) class maps or (N, K, h, w) logits (compared by their argmax over K).
        batch: the graph's batch (static graphs take exactly this many frames; padded with repeats).
        precision: OpenVINO's inference precision (``auto``, ``f32``, ``bf16``).

    Returns:
        ``class_agreement`` (fraction of pixels, 0-1), ``frames``, ``inference_precision`` (what ran),
        ``engine`` (``openvino <version>``).
    """
    from segadapt.export.onnx_export import batches

    ov, _ = _require()
    core = shared_core()
    from segadapt.runtime.openvino_backend import cpu_supports_bf16

    want = "bf16" if precision == "bf16" or (precision == "auto" and cpu_supports_bf16(core)) else "f32"
    cm = core.compile_model(str(model_path), "CPU", {"INFERENCE_PRECISION_HINT": want})
    req = cm.create_infer_request()
    outs = [req.infer({0: xb})[0][:n] for xb, n in batches(inputs, batch)]
    got = np.concatenate(outs)
    if got.ndim == 4:  # logits
        same = got.argmax(1) == ref_out.argmax(1)
    else:
        same = got.astype(np.int64) == ref_out.astype(np.int64)
    return {"class_agreement": float(same.mean()), "frames": int(inputs.shape[0]),
            "inference_precision": cm.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
            "engine": f"openvino {ov.get_version().split('-')[0]}"}


def export_openvino_int8(fp32_onnx: Path, xml_path: Path, calib_inputs: List[np.ndarray], parity_inputs: np.ndarray,
                         ref_out: np.ndarray, base_metadata: dict, calib_data: str, batch: int = 1,
                         parity_data: str = "", log: Optional[Callable[[str], None]] = print
                         ) -> Tuple[Path, ModelMetadata, dict]:
    """Quantise, write the IR and its metadata sidecar, and report the INT8 IR's agreement with PyTorch.

    Args:
        fp32_onnx: the exported FP32 graph.
        xml_path: where the IR goes (``<name>.int8.xml``; ``.bin`` and ``.xml.json`` beside it).
        calib_inputs: calibration batches (see :func:`quantize_openvino`).
        parity_inputs, ref_out: the parity frames as graph inputs and PyTorch's outputs on them.
        base_metadata: the export's shared metadata fields (classes, input, output, sizes, checkpoint...).
        calib_data: the calibration folder (recorded). batch: the graph's batch. parity_data: the parity folder.

    Returns:
        ``(xml_path, metadata, parity)``.
    """
    import time

    ov, nncf = _require()
    t0 = time.time()
    q = quantize_openvino(fp32_onnx, calib_inputs, base_metadata.get("arch", ""))
    frames = sum(int(x.shape[0]) for x in calib_inputs)
    save_ir(q, xml_path)
    if log:
        log(f"INT8 (OpenVINO IR, NNCF post-training quantisation) on {frames} frames from {calib_data} took "
            f"{time.time() - t0:.1f} s")
    p = openvino_agreement(xml_path, parity_inputs, ref_out, batch)
    p["data"] = parity_data
    transformer = "segformer" in str(base_metadata.get("arch", "")).lower()
    quant = {"scheme": "openvino", "format": "openvino-ir", "tool": f"nncf {nncf.__version__}",
             "activation_type": "int8", "weight_type": "int8", "per_channel": True,
             "activation_symmetric": True, "preset": "performance", "model_type": "transformer" if transformer else "",
             "calibration_method": "nncf min-max + bias correction", "calibration_frames": frames,
             "calibration_data": calib_data}
    exporter = dict(base_metadata.get("exporter", {}), openvino=ov.get_version().split("-")[0], nncf=nncf.__version__)
    meta = ModelMetadata(**dict(base_metadata, exporter=exporter, format="openvino"), precision="int8", parity=p,
                         quantization=quant)
    from segadapt.runtime.metadata import metadata_path

    meta.save(metadata_path(xml_path))
    if log:
        log(f"int8: {xml_path} ({xml_path.with_suffix('.bin').stat().st_size / 1e6:.1f} MB) vs PyTorch on "
            f"{p['frames']} real frames (OpenVINO, {p['inference_precision']}): {p['class_agreement'] * 100:.3f} % "
            f"same class")
    return xml_path, meta, p
