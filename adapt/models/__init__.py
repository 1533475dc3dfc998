"""Segmenters (transformers SegFormer / DeepLabV3-MobileNetV2), checkpoints and training-only heads."""

from segadapt.adapt.models.segmenter import Segmenter, build_segmenter, SEGFORMER_VARIANTS
from segadapt.adapt.models.checkpoint import save_checkpoint, load_checkpoint, load_segmenter, CheckpointMeta

__all__ = ["Segmenter", "build_segmenter", "SEGFORMER_VARIANTS", "save_checkpoint", "load_checkpoint",
           "load_segmenter", "CheckpointMeta"]
