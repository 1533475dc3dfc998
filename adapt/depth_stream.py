"""The training-side helpers of CrossMatch's RGB-D auxiliary stream (Yin et al., ICCV 2023; methods.md 1.3,
[RECON]; issue #12): the extra input channels, the depth cache set up before training, the depth-input weights'
own optimiser group and the per-step diagnostics of the two streams.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from segadapt.adapt.data.datasets import ImageFolder
from segadapt.adapt.data.depth_cache import CachedDepth, DepthCache
from segadapt.adapt.models.aux_stream import depth_input_weight


def extra_channels(validity_channel: bool) -> int:
    """Input channels of the RGB-D stream beyond RGB: depth, plus validity when ``validity_channel``."""
    return 2 if validity_channel else 1


def depth_input(batch: dict, validity_channel: bool) -> torch.Tensor:
    """The extra input of the RGB-D stream from a dataset batch.

    Args:
        batch: with ``depth`` (B, 1, H, W) float32 in [0, 1] (0 where missing) and ``depth_valid`` (B, 1, H, W) bool.
        validity_channel: append the validity mask as a second channel (1.0 measured, 0.0 missing) [RECON].

    Returns:
        (B, 1 or 2, H, W) float32; channel 0 is depth.
    """
    d = batch["depth"].float()
    if not validity_channel:
        return d
    return torch.cat([d, batch["depth_valid"].float()], 1)


def depth_valid_mask(depth: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool validity of a :func:`depth_input` tensor: its validity channel, or depth > 0 without one (the
    providers set missing depth to exactly 0 and valid depth above 0)."""
    return depth[:, 1] > 0.5 if depth.shape[1] > 1 else depth[:, 0] > 0


def prepare_depth_cache(provider: Callable, target: str | Path, cache_dir: str, out: Path,
                        log: Callable[[str], None] | None = None) -> CachedDepth:
    """Compute the depth of every target frame once (main process, progress bar) and return the cache reader the
    datasets use instead of ``provider``.

    Args:
        provider: a depth provider (``segadapt.adapt.data.depth``).
        target: the target image folder.
        cache_dir: the cache folder; empty = ``<out>/depth_cache``.
        out: the run directory.

    Raises:
        FileNotFoundError / ValueError: no target images, or what the provider raises for a frame.
    """
    cache = DepthCache(provider, Path(cache_dir) if cache_dir else Path(out) / "depth_cache")
    cache.precompute(ImageFolder(target).files, log)
    return cache.reader()


def split_depth_group(groups: list, aux: torch.nn.Module, lr: float) -> list:
    """Move the RGB-D stem's depth-input weights out of ``groups`` (AdamW parameter groups of ``aux``) into their
    own group with learning rate ``lr`` and no weight decay (decay would pull the zero-initialised weights back to
    "ignore depth") [RECON, issue #12].

    Returns:
        the groups without the weights (emptied groups dropped) plus the new group, named ``depth_input``.
    """
    w = depth_input_weight(aux)
    out = []
    for g in groups:
        ps = [p for p in g["params"] if p is not w]
        if ps:
            out.append({**g, "params": ps})
    out.append({"params": [w], "lr": lr, "weight_decay": 0.0, "name": "depth_input"})
    return out


def depth_weight_norm(aux: torch.nn.Module | None) -> dict:
    """``{"depth_w_norm": L2 norm of the depth-input weights}`` for the log, or ``{}`` without an RGB-D stream."""
    if aux is None:
        return {}
    return {"depth_w_norm": round(float(depth_input_weight(aux).detach().norm()), 6)}


@torch.no_grad()
def stream_agreement(p_rgb: torch.Tensor, p_rgbd: torch.Tensor, valid: torch.Tensor) -> float:
    """Share of pixels with valid depth where the RGB and RGB-D teachers' argmax agree (1.0 when no pixel is valid).

    Args:
        p_rgb, p_rgbd: (B, K, H, W) probabilities of the two teachers.
        valid: (B, H, W) bool depth validity.
    """
    agree = (p_rgb.argmax(1) == p_rgbd.argmax(1)) & valid
    n = int(valid.sum())
    return float(agree.sum()) / n if n else 1.0


@torch.no_grad()
def fusion_removed(kept_before: torch.Tensor, agree: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Share of the real pixels the dual-head agreement removes from the pseudo-labels: kept by the confidence
    threshold (``kept_before``, (B, H, W) bool) but the two heads disagree (``agree`` False). ``valid``: (B, H, W)
    bool, False on crop padding (not counted); None = all pixels are real. Same denominator as the log's ``kept``."""
    removed = kept_before & ~agree
    if valid is None:
        return float(removed.float().mean())
    return float((removed & valid).sum()) / max(1, int(valid.sum()))
