"""AdaBN: re-estimate BatchNorm statistics on target images (Li et al., 2016), the first, optional step of the
source-free adaptation.

Only the BatchNorm running mean/variance change: they become the plain average over the target images (momentum
None = cumulative average), everything else is untouched. Models without BatchNorm (SegFormer uses LayerNorm,
except for one BatchNorm in its decoder) change only in those layers.

``layers`` < 1 re-estimates only the first share of the BatchNorm layers in module order (the input side) and keeps
the source statistics in the deeper ones (our option, not Li et al.'s: see docs/method-notes.md, AdaBN; in the
spirit of partial and blended BatchNorm adaptation such as Schneider et al. 2020, section 3). Rationale: a lighting
or sensor change shows in the early layers' statistics, while the deep layers' statistics also carry the target's
class mix, which AdaBN then normalises away (measured 2026-12-02 with the full method, ``layers`` 0.75: +0.32 mIoU
on CamVid dusk over 3 seeds, -0.86 on KITTI (seed 0), so the default stays 1: docs/changelog.md).

``alpha`` < 1 blends the statistics instead of replacing them: ``mean = (1 - alpha) * mean_source + alpha *
mean_target``, the same for the variance (the alpha-BN form of Schneider et al. 2020, "Improving robustness
against common corruptions by covariate shift adaptation", section 3, which blends with a prior strength N; our
option, see docs/method-notes.md, AdaBN; 1 = AdaBN as in Li et al. 2016, this function's default; ``segadapt adapt``
uses 0.75 by default, ``AdaptConfig.adabn_alpha``).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from segadapt.adapt.augment import normalize


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[dict], mean, std, device,
                    input_fn=None, max_batches: int = 0, layers: float = 1.0, alpha: float = 1.0) -> int:
    """Replace BatchNorm running statistics by those of the target images.

    Args:
        model: the segmenter (modified in place; left in eval mode).
        batches: iterable of dicts with ``image`` (B, 3, H, W) uint8 (and ``depth`` if ``input_fn`` uses it).
        mean, std: RGB normalisation.
        input_fn: optional ``batch -> model input`` (the RGB-D stream concatenates depth); default: normalised RGB.
        max_batches: stop after this many batches (0 = all).
        layers: share in [0, 1] of the BatchNorm layers, input side first (module order, which is the forward
            order of both architectures), to re-estimate: ``round(layers * count)`` of them, at least one when
            ``layers`` > 0; the others keep their statistics (and are used, in eval mode, while the first ones are
            measured).
        alpha: weight in [0, 1] of the target statistics in each re-estimated layer: running mean and variance
            become ``(1 - alpha) * source + alpha * target`` (1 = AdaBN, 0 = the source statistics unchanged).

    Returns:
        number of BatchNorm layers re-estimated.

    Raises:
        ValueError: ``layers`` or ``alpha`` outside [0, 1].
    """
    if not 0.0 <= layers <= 1.0:
        raise ValueError(f"AdaBN layers share {layers} is outside [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"AdaBN blend alpha {alpha} is outside [0, 1]")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = bns[:max(1, round(layers * len(bns))) if layers > 0 else 0]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    source = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over all batches
    model.eval()
    for m in bns:
        m.train()
    n = 0
    for b in batches:
        x = input_fn(b) if input_fn else normalize(b["image"].to(device), mean, std)
        model(x)
        n += 1
        if max_batches and n >= max_batches:
            break
    for m, (mom, _), (mean_s, var_s) in zip(bns, saved, source):
        m.momentum = mom
        if alpha < 1.0:
            m.running_mean.mul_(alpha).add_((1.0 - alpha) * mean_s)
            m.running_var.mul_(alpha).add_((1.0 - alpha) * var_s)
    model.eval()
    return len(bns)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers in eval mode (use, don't update, their statistics) while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def adabn_source_model(checkpoint, frames, device, alpha: float = 1.0, layers: float = 1.0, enabled: bool = True,
                       batch_size: int = 8, loaded=None):
    """The source model as adaptation starts: loaded from ``checkpoint``, then (``enabled``) AdaBN with the blend
    ``alpha`` over the ``layers`` share on ``frames`` in order. The one place the product and the benchmarks build
    it (the student's and the EMA teacher's step-0 weights, the anchor, SeCo's and BiDA's labeller).

    Under torchrun each rank reads its share of the batches and the statistics are pooled over the ranks (the
    result equals one process reading every batch); otherwise that is a no-op.

    Args:
        checkpoint: a segadapt checkpoint or local transformers directory.
        frames: a dataset of target frames resized to the run's size without augmentation (items ``image``
            (3, H, W) uint8).
        device: where the model goes.
        loaded: ``(model, meta)`` already read from ``checkpoint`` (changed in place), to skip reading it again.

    Returns:
        (model in eval mode, its :class:`~segadapt.adapt.models.checkpoint.CheckpointMeta`).

    Raises:
        FileNotFoundError / ValueError: a bad checkpoint; ValueError: ``alpha`` or ``layers`` outside [0, 1].
    """
    from torch.utils.data import DataLoader

    from segadapt.adapt.data.datasets import collate
    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.adapt.training import distributed

    model, meta = loaded if loaded is not None else load_segmenter(checkpoint, map_location=device)
    if enabled:
        loader = DataLoader(distributed.shard_batches(frames, batch_size), batch_size=batch_size, shuffle=False,
                            collate_fn=collate, num_workers=0)
        adapt_batchnorm(model, loader, meta.mean, meta.std, device, layers=layers, alpha=alpha)
        distributed.pool_batchnorm(model)
    return model.eval(), meta
