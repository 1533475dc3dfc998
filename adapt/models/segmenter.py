"""The segmenter: a thin wrapper over transformers' segmentation models that returns plain logits.

Two architectures, both built from a transformers config (random weights) or loaded with ``from_pretrained`` from a
local directory (never downloaded):

* ``segformer``: ``SegformerForSemanticSegmentation`` (MiT-b0..b5 encoder + all-MLP decoder), logits at 1/4.
* ``deeplabv3-mobilenetv2``: ``MobileNetV2ForSemanticSegmentation`` (MobileNetV2 backbone with dilated convolutions,
  DeepLabV3 ASPP head), logits at 1/``output_stride`` (1/8 by default).

The wrapper adds what training needs and transformers does not expose directly: the decoder features that feed the
classifier (for the IR2F rectifier and contrastive heads) and a configurable number of input channels (the RGB-D
auxiliary stream of CrossMatch).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SEGFORMER_VARIANTS: Dict[str, dict] = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], decoder_hidden_size=768),
    "b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], decoder_hidden_size=768),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
}
ARCHS = ("deeplabv3-mobilenetv2", "segformer")


def make_hf_config(arch: str, num_classes: int, variant: str = "", num_channels: int = 3, output_stride: int = 8,
                   dropout: float = 0.1, ignore_index: int = 255):
    """A transformers config for ``arch`` with random-initialisation settings.

    Raises:
        ValueError: unknown architecture or variant.
    """
    if arch == "segformer":
        from transformers import SegformerConfig

        v = variant or "b0"
        if v not in SEGFORMER_VARIANTS:
            raise ValueError(f"unknown SegFormer variant {v!r}; choose from {sorted(SEGFORMER_VARIANTS)}")
        return SegformerConfig(num_channels=num_channels, num_labels=num_classes, classifier_dropout_prob=dropout,
                               semantic_loss_ignore_index=ignore_index, **SEGFORMER_VARIANTS[v])
    if arch == "deeplabv3-mobilenetv2":
        from transformers import MobileNetV2Config

        try:
            mult = float(variant) if variant else 1.0
        except ValueError:
            raise ValueError(f"MobileNetV2 variant is a depth multiplier such as 1.0 or 0.75, got {variant!r}") from None
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        # tf_padding=False: symmetric PyTorch padding, which exports to ONNX/TensorRT without shape arithmetic.
        return MobileNetV2Config(num_channels=num_channels, num_labels=num_classes, depth_multiplier=mult,
                                 output_stride=output_stride, classifier_dropout_prob=dropout, tf_padding=False,
                                 semantic_loss_ignore_index=ignore_index)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


def _hf_class(model_type: str):
    if model_type == "segformer":
        from transformers import SegformerForSemanticSegmentation

        return SegformerForSemanticSegmentation
    if model_type == "mobilenet_v2":
        from transformers import MobileNetV2ForSemanticSegmentation

        return MobileNetV2ForSemanticSegmentation
    raise ValueError(f"unsupported transformers model type {model_type!r} (supported: segformer, mobilenet_v2)")


def arch_of(model_type: str) -> str:
    """Our architecture name for a transformers ``model_type`` (``segformer`` / ``mobilenet_v2``); KeyError
    otherwise."""
    return {"segformer": "segformer", "mobilenet_v2": "deeplabv3-mobilenetv2"}[model_type]


class Segmenter(nn.Module):
    """Semantic segmenter returning logits at the model's output stride.

    Args:
        hf_model: a transformers ``SegformerForSemanticSegmentation`` or ``MobileNetV2ForSemanticSegmentation``.

    ``forward(pixel_values)``: pixel_values (B, C_in, H, W) float, normalised RGB (C_in = 3) or RGB + depth
    (C_in = 4); returns logits (B, K, H/s, W/s) float with s = :attr:`output_stride` (4 for SegFormer, 8 or 16 for
    DeepLabV3-MobileNetV2; the size is rounded up for sizes that are not multiples of s).
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.model_type = hf_model.config.model_type
        if self.model_type not in ("segformer", "mobilenet_v2"):
            raise ValueError(f"unsupported transformers model type {self.model_type!r}")
        self._features: Optional[torch.Tensor] = None
        self._capture = False
        self._classifier.register_forward_hook(self._hook)

    @property
    def _classifier(self) -> nn.Module:
        # the final 1x1 classifier; its input are the decoder features (not registered twice as a submodule)
        if self.model_type == "segformer":
            return self.hf.decode_head.classifier
        return self.hf.segmentation_head.classifier

    def _hook(self, module, inputs, output):
        if self._capture:
            self._features = inputs[0]

    @property
    def arch(self) -> str:
        return arch_of(self.model_type)

    @property
    def num_classes(self) -> int:
        return int(self.hf.config.num_labels)

    @property
    def in_channels(self) -> int:
        return int(self.hf.config.num_channels)

    @property
    def output_stride(self) -> int:
        return 4 if self.model_type == "segformer" else int(self.hf.config.output_stride)

    @property
    def feature_channels(self) -> int:
        """Channels of the decoder features returned by :meth:`forward_features` (input of the classifier)."""
        c = self._classifier
        return int(c.in_channels if hasattr(c, "in_channels") else c.convolution.in_channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values, return_dict=True).logits

    def forward_features(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and the decoder features that feed the classifier.

        Returns:
            logits (B, K, h, w) and features (B, D, h, w) with D = :attr:`feature_channels`; the features are taken
            before the classifier's dropout is applied only for SegFormer (transformers applies dropout inside the
            MobileNetV2 head before the classifier; in eval mode both are dropout-free).
        """
        self._capture = True
        try:
            logits = self.forward(pixel_values)
            feats = self._features
        finally:
            self._capture = False
            self._features = None
        return logits, feats

    def _low_level_index(self, stride: int) -> int:
        """Index in ``hidden_states`` of the last backbone stage at ``stride`` (4 or 8); ValueError otherwise."""
        if stride not in (4, 8):
            raise ValueError(f"low-level features exist at stride 4 or 8, got {stride}")
        if self.model_type == "segformer":
            return {4: 0, 8: 1}[stride]  # encoder stages at strides 4, 8, 16, 32
        current, index = 2, -1  # MobileNetV2: the stem has stride 2; each inverted residual may halve the grid
        for i, layer in enumerate(self.hf.mobilenet_v2.layer):
            current *= layer.conv_3x3.convolution.stride[0]
            if current == stride:
                index = i
        if index < 0:
            raise ValueError(f"this MobileNetV2 has no layer at stride {stride}")
        return index

    def low_level_channels(self, stride: int) -> int:
        """Channels of the backbone features at ``stride`` (4 or 8) that :meth:`forward_features` appends."""
        if self.model_type == "segformer":
            return int(self.hf.config.hidden_sizes[self._low_level_index(stride)])
        return int(self.hf.mobilenet_v2.layer[self._low_level_index(stride)].reduce_1x1.convolution.out_channels)

    def forward_low_level(self, pixel_values: torch.Tensor, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and features at a resolution that can show boundaries (the IR2F rectifier's input; see
        docs/method-notes.md, IR2F).

        Args:
            pixel_values: (B, C_in, H, W) float, normalised.
            stride: 4 or 8.

        Returns:
            logits (B, K, h, w) as :meth:`forward`, and features (B, D + C_s, ceil(H/s), ceil(W/s)): the decoder
            features (:meth:`forward_features`) bilinearly upsampled to the backbone's stride-s grid, concatenated
            with the backbone's own features there (C_s = :meth:`low_level_channels`).

        Raises:
            ValueError: a stride other than 4 or 8.
        """
        idx = self._low_level_index(stride)
        self._capture = True
        try:
            out = self.hf(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            feats = self._features
        finally:
            self._capture = False
            self._features = None
        low = out.hidden_states[idx]
        up = F.interpolate(feats, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return out.logits, torch.cat([up, low.to(up.dtype)], 1)

    HEAD_PREFIX = ("hf.decode_head.", "hf.segmentation_head.")

    def backbone_parameters(self) -> list:
        """The trainable parameters outside the decode head (the encoder), in module order."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(self.HEAD_PREFIX)]

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 1.0) -> list:
        """AdamW parameter groups: no weight decay on biases and normalisation weights; the decoder/head gets
        ``lr * head_lr_mult`` (DAFormer, Hoyer et al. CVPR 2022, uses 10x for the head)."""
        head_prefix = self.HEAD_PREFIX
        groups: Dict[Tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim <= 1 or "norm" in name or "bn" in name.split(".")[-2:]
            is_head = name.startswith(head_prefix)
            groups.setdefault((no_decay, is_head), []).append(p)
        out = []
        for (no_decay, is_head), ps in groups.items():
            out.append({"params": ps, "lr": lr * (head_lr_mult if is_head else 1.0),
                        "weight_decay": 0.0 if no_decay else weight_decay})
        return out


def build_segmenter(arch: str, num_classes: int, variant: str = "", in_channels: int = 3, output_stride: int = 8,
                    dropout: float = 0.1, ignore_index: int = 255, pretrained: str = "") -> Segmenter:
    """Build a segmenter with random weights, or from a local transformers directory.

    Args:
        arch: ``segformer`` or ``deeplabv3-mobilenetv2``.
        num_classes: number of classes K.
        variant: SegFormer ``b0``..``b5`` or MobileNetV2 depth multiplier.
        in_channels: 3 (RGB) or 4 (RGB + depth).
        pretrained: a local directory with a transformers ``config.json`` and weights; loaded with
            ``from_pretrained(local_files_only=True)``. A classifier with a different class count is re-initialised.

    Raises:
        ValueError: unknown architecture/variant, or a pretrained directory of another architecture.
        FileNotFoundError: the pretrained directory does not exist.
    """
    if pretrained:
        from pathlib import Path

        from transformers import AutoConfig

        p = Path(pretrained)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: not a transformers model directory (no config.json)")
        hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        if arch_of(hf_cfg.model_type) != arch:
            raise ValueError(f"{p}: holds a {hf_cfg.model_type} model, but arch {arch!r} was requested")
        cls = _hf_class(hf_cfg.model_type)
        model = cls.from_pretrained(str(p), local_files_only=True, num_labels=num_classes,
                                    ignore_mismatched_sizes=True)
        model.config.semantic_loss_ignore_index = ignore_index
        return Segmenter(model)
    cfg = make_hf_config(arch, num_classes, variant, in_channels, output_stride, dropout, ignore_index)
    return Segmenter(_hf_class(cfg.model_type)(cfg))


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, K, h, w) logits to (B, K, H, W) = ``size`` (align_corners=False)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
