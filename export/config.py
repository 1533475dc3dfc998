"""Typed export configuration (torch-free, so the CLI can build its flags without importing torch).

Each field is documented by the string under it (the flag's help line); enumerations are ``Literal`` and numbers
carry their range (:mod:`segadapt.adapt.typed_config`), so ``segadapt export`` refuses bad values before it loads the
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from segadapt.adapt.typed_config import Bounds, PositiveFloat, PositiveInt, Size, check_size

MinSize = Annotated[tuple[int, int], Bounds(8)]


@dataclass
class ExportConfig:
    """``segadapt export`` settings: the RGB segmenter of a checkpoint to ONNX (FP32, optionally FP16 and INT8
    Q/DQ), then optionally a TensorRT engine or a Triton repository; metadata beside every file."""

    checkpoint: str = ""
    """the segadapt checkpoint, local transformers directory or cached Hugging Face Hub id to export (required)"""
    out: str = ""
    """output directory; empty = <checkpoint>-export"""
    name: str = "model"
    """file stem: <out>/<name>.onnx, .fp16.onnx, .int8.onnx, .engine"""
    format: Literal["onnx", "engine", "triton"] = "onnx"
    """onnx; engine (a TensorRT engine built from the ONNX file on this machine's GPU); triton (a Triton model
    repository)"""
    imgsz: Size = (0, 0)
    """H W of the static graph, or the optimisation profile's opt shape; 0 0 = the checkpoint's input size"""
    batch: PositiveInt = 1
    """static batch (or the profile's opt batch when dynamic)"""
    dynamic: bool = False
    """dynamic batch (1..--max-batch), height and width (--min-size..--max-size)"""
    min_size: MinSize = (64, 64)
    """dynamic graphs: smallest H W, pixels"""
    max_size: MinSize = (1088, 1920)
    """dynamic graphs: largest H W, pixels"""
    max_batch: PositiveInt = 8
    """dynamic graphs: largest batch"""
    half: bool = False
    """also write an FP16 graph (numerically sensitive ops stay FP32)"""
    int8: bool = False
    """also write an INT8 Q/DQ graph calibrated on the frames in --calib"""
    calib: str = ""
    """folder of real target frames, or a video, for INT8 calibration (default: --parity-data)"""
    calib_frames: PositiveInt = 32
    """number of frames used for INT8 calibration"""
    int8_backend: Literal["auto", "onnxruntime", "tensorrt", "openvino"] = "auto"
    """INT8 form: onnxruntime (uint8 asymmetric activations); tensorrt (symmetric int8, zero points 0: the form
    TensorRT's parser accepts); openvino (NNCF quantisation to an OpenVINO IR <name>.int8.xml; needs
    segadapt[openvino-int8]); auto = tensorrt for --format engine/triton, else onnxruntime"""
    int8_calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    """how INT8 activation ranges are set: minmax = the largest magnitude seen, percentile = the 99.99th
    percentile, entropy = onnxruntime's KL-divergence search"""
    input_layout: Literal["uint8_nhwc", "float_nchw"] = "uint8_nhwc"
    """graph input: uint8 (B, H, W, 3) RGB with normalisation inside, or normalised float32 (B, 3, H, W)"""
    output: Literal["class_map", "logits"] = "class_map"
    """graph output: (B, H, W) class ids at input resolution, or (B, K, H/s, W/s) logits"""
    class_dtype: Literal["uint8", "int32"] = "uint8"
    """dtype of the class map (uint8 up to 256 classes)"""
    opset: Annotated[int, Bounds(17)] = 18
    """ONNX opset (>= 17)"""
    simplify: bool = True
    """simplify the graph with onnxslim"""
    workspace: PositiveFloat = 4.0
    """TensorRT workspace memory limit, GiB"""
    parity_data: str = ""
    """folder of real frames, or a video, for the parity check against PyTorch (default: --calib, else CamVid tiny
    target)"""
    parity_frames: PositiveInt = 8
    """number of frames compared in the parity check"""
    legacy_exporter: bool = False
    """use torch's TorchScript-based ONNX exporter instead of the dynamo exporter"""

    def check(self) -> None:
        check_size(self.imgsz, "--imgsz", zero_means="the checkpoint's input size")
        if any(a > b for a, b in zip(self.min_size, self.max_size)):
            raise ValueError(f"--min-size {self.min_size} must not exceed --max-size {self.max_size}")
        if self.dynamic and self.batch > self.max_batch:
            raise ValueError(f"--batch {self.batch} must not exceed --max-batch {self.max_batch}")
