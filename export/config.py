"""Typed export configuration (torch-free, so the CLI can build its flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass
class ExportConfig:
    """``segadapt export`` settings.

    checkpoint: our checkpoint (or a local transformers directory). out: output directory (default
    ``<checkpoint>-export``). format: ``onnx``, ``engine`` (TensorRT, built from the ONNX file on this machine's GPU)
    or ``triton`` (a model repository). imgsz: (H, W) of the static graph or the profile's ``opt`` shape; (0, 0) =
    the checkpoint's input size. batch: static batch (or ``opt`` batch when dynamic). dynamic: dynamic batch/height/
    width between ``min_size`` and ``max_size`` (H, W) and batch 1..``max_batch``. half: also write an FP16 graph
    (numerically sensitive ops stay FP32). int8: also write an INT8 QDQ graph calibrated on the frames in ``calib``.
    input_layout: ``uint8_nhwc`` or ``float_nchw``. output: ``class_map`` or ``logits``. class_dtype: ``uint8`` or
    ``int32``. opset: ONNX opset (>= 17). simplify: run onnxslim. workspace: TensorRT workspace limit in GiB.
    parity_data: folder of real frames for the parity check (default: ``calib``, else the CamVid tiny target frames).
    parity_frames: how many frames to compare. legacy_exporter: use torch's TorchScript exporter instead of dynamo.
    """

    checkpoint: str = ""
    out: str = ""
    name: str = "model"
    format: str = "onnx"
    imgsz: Tuple[int, int] = (0, 0)
    batch: int = 1
    dynamic: bool = False
    min_size: Tuple[int, int] = (64, 64)
    max_size: Tuple[int, int] = (1088, 1920)
    max_batch: int = 8
    half: bool = False
    int8: bool = False
    calib: str = ""
    calib_frames: int = 32
    input_layout: str = "uint8_nhwc"
    output: str = "class_map"
    class_dtype: str = "uint8"
    opset: int = 18
    simplify: bool = True
    workspace: float = 4.0
    parity_data: str = ""
    parity_frames: int = 8
    legacy_exporter: bool = False
