"""The export module: only the RGB segmenter, with normalisation and (optionally) argmax inside the graph.

The auxiliary RGB-D stream, the rectifier and any training head are never part of it: the wrapper is built from a
:class:`~segadapt.adapt.models.segmenter.Segmenter` with 3 input channels and calls nothing else (mmdeploy's
"segmentation logits or argmax only" promise, without function rewriting).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.adapt.models.segmenter import Segmenter


class ExportWrapper(nn.Module):
    """Graph entry point for export.

    Args:
        segmenter: an RGB segmenter (``in_channels == 3``).
        mean, std: per-channel RGB normalisation in [0, 1] units.
        input_layout: ``uint8_nhwc`` (input (B, H, W, 3) uint8 RGB, the graph normalises) or ``float_nchw``
            (input (B, 3, H, W) float32, already normalised).
        output_kind: ``class_map`` (output (B, H, W) class ids at input resolution: logits upsampled bilinearly,
            then argmax) or ``logits`` (output (B, K, H/s, W/s) float32 at the model's output stride s).
        class_dtype: ``uint8`` (up to 256 classes) or ``int32`` (TensorRT-friendly) for ``class_map``.

    Raises:
        ValueError: a segmenter with another input channel count, or an unknown layout/kind/dtype.
    """

    def __init__(self, segmenter: Segmenter, mean: Sequence[float], std: Sequence[float],
                 input_layout: str = "uint8_nhwc", output_kind: str = "class_map", class_dtype: str = "uint8"):
        super().__init__()
        if segmenter.in_channels != 3:
            raise ValueError(f"only the RGB segmenter is exported; got {segmenter.in_channels} input channels")
        if input_layout not in ("uint8_nhwc", "float_nchw"):
            raise ValueError(f"unknown input layout {input_layout!r}")
        if output_kind not in ("class_map", "logits"):
            raise ValueError(f"unknown output kind {output_kind!r}")
        if class_dtype not in ("uint8", "int32"):
            raise ValueError(f"class_dtype must be uint8 or int32, got {class_dtype!r}")
        if class_dtype == "uint8" and segmenter.num_classes > 256:
            raise ValueError("more than 256 classes need class_dtype int32")
        self.segmenter = segmenter
        self.input_layout = input_layout
        self.output_kind = output_kind
        self.class_dtype = torch.uint8 if class_dtype == "uint8" else torch.int32
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    @property
    def input_name(self) -> str:
        return "images" if self.input_layout == "uint8_nhwc" else "pixel_values"

    @property
    def output_name(self) -> str:
        return "class_map" if self.output_kind == "class_map" else "logits"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layout == "uint8_nhwc":
            return x.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pix = self.preprocess(x)
        logits = self.segmenter(pix)
        if self.output_kind == "logits":
            return logits
        up = F.interpolate(logits, size=pix.shape[-2:], mode="bilinear", align_corners=False)
        return up.argmax(1).to(self.class_dtype)

    def upsampled_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) logits at input resolution (what the class map is the argmax of), for parity checks."""
        pix = self.preprocess(x)
        return F.interpolate(self.segmenter(pix), size=pix.shape[-2:], mode="bilinear", align_corners=False)
