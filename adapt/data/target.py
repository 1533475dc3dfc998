"""The unlabelled target footage of an adaptation run: an image folder, a video file or a folder of videos."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset

from segadapt.adapt.augment import normalize
from segadapt.adapt.data.datasets import ImageFolder, collate, is_video
from segadapt.adapt.data.footage import VideoFootage, is_video_folder

__all__ = ["normalised_batches", "target_dataset"]


def target_dataset(cfg, size, transform, depth_provider=None, rank: int = 0, world_size: int = 1):
    """The unlabelled target dataset of an :class:`~segadapt.adapt.config.AdaptConfig`: an image folder, or the
    frames of a video file or a folder of videos (:class:`~segadapt.adapt.data.footage.VideoFootage`:
    ``video_stride``, a ``video_max_frames`` budget per video, decoded on demand at ``size``). ``rank`` /
    ``world_size`` give a data-parallel rank its disjoint share of a video target's frames (an image folder is not
    sharded here).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable target (the message names it); depth with a video.
    """
    if not cfg.target:
        raise ValueError("--target is required (an image folder or a video file)")
    if is_video(cfg.target) or is_video_folder(cfg.target):
        if depth_provider is not None:
            raise ValueError("depth providers need image files; extract the video's frames first")
        return VideoFootage(cfg.target, cfg.video_stride, cfg.video_max_frames, size=size, transform=transform,
                            skip_duplicates=cfg.video_skip_duplicates, cache_dir=cfg.video_cache or None,
                            rank=rank, world_size=world_size)
    return ImageFolder(cfg.target, transform=transform, depth_provider=depth_provider)


def normalised_batches(dataset, mean, std, device, max_frames: int, batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Normalised (B, 3, H, W) float32 batches of the first ``max_frames`` frames of ``dataset`` (its transform
    should be a plain resize), in order."""
    n = min(len(dataset), max_frames)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=0)
    for batch in loader:
        yield normalize(batch["image"].to(device), mean, std)
