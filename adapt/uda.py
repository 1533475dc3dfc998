"""UDA mode of ``segadapt adapt`` (``--source-data DIR``, issue #13): labelled source frames join the loop.

Source-free by default: with ``AdaptConfig.source_data`` empty nothing here runs and nothing opens a source file.
With a labelled source split (``DIR/images`` + ``DIR/labels``, the checkpoint's class ids), every step adds, after
DACS (Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling", WACV 2021; methods.md 0.2):

* a batch of source frames with the target's geometric augmentation (resize to the run's size, random scale and
  crop, flip), from an endless seeded stream whose batch k depends only on (seed, k)
  (:mod:`segadapt.adapt.data.sampling`): a resumed run reads exactly the source batches the uninterrupted run read;
* ``source_weight * CE(student(x_s), y_s)`` (:func:`source_ce`), logged as ``loss_src``;
* the student's strong view is DACS's source->target ClassMix (:func:`dacs_mix`): half of the classes present in
  each source label (ceil(n/2), at random) pasted onto a target frame; the mixed label is the source label on pasted
  pixels (weight 1) and the teacher's pseudo-label elsewhere (with its weights); then the usual colour jitter and
  blur (``AdaptConfig.strong``).

RCCR and BiDA then run in their paper forms (:mod:`segadapt.adapt.rccr`, :mod:`segadapt.adapt.bida`) from the
:class:`~segadapt.adapt.components.SourceContext` this module builds.

[RECON] choices, ours (configurable where a field is named):

* Pairing: source frame ``i % Bs`` is pasted onto target frame ``i`` (DACS pairs equal batches);
  ``source_batch_size`` (0 = the target's ``batch_size``) sets Bs.
* Target-to-target ClassMix is off in the UDA mode: DACS's strong view is one mix, source onto target, and a second
  mix would paste target classes over the source ones. ``source_mix`` false keeps the source-free strong view
  (target-to-target ClassMix) and adds only the source CE.
* The rectifier's reliability r is 1 on pasted source pixels (their labels are ground truth); its training signal
  stays the target-side agreement (IR2F's source-correctness supervision, methods.md 5.3 (a), is not used).
* No photometric augmentation on the source CE's input (DACS: source crops are only cropped and flipped).
* BatchNorm: the loop freezes it after AdaBN on the target, so source frames are normalised with target statistics
  (DACS trains BatchNorm on both domains).
* Depth runs do not take source data (source frames have no depth): an error up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from segadapt.adapt.augment import class_mix_masks, normalize_float, photometric
from segadapt.adapt.components import SourceContext
from segadapt.adapt.data.datasets import LabeledImageFolder, collate
from segadapt.adapt.data.sampling import resumable_loader
from segadapt.adapt.data.transforms import train_transform
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.train_utils import autocast

__all__ = ["SOURCE_SEED_OFFSET", "UDASource", "dacs_mix", "paste_masks", "source_ce", "source_dataset",
           "source_loader"]

SOURCE_SEED_OFFSET = 104729  # the source stream's seed is the run's seed + this (its own order, independent)


def source_dataset(path: str | Path, classes, size: Tuple[int, int], crop: Tuple[int, int],
                   scale: Tuple[float, float]) -> LabeledImageFolder:
    """The labelled source split with the target's geometric training augmentation, checked before any model work:
    the folder, its ``labels/``, images in ``images/`` (or the folder itself), a label for every image, and the first
    frame and label (decodes, same size, values in ``[0, K)`` or the ignore index; later labels are checked as they
    are read, and ``segadapt adapt`` checks every one up front, :mod:`segadapt.preflight`).

    Args:
        path: the split folder (``<path>/images``, ``<path>/labels``).
        classes: :class:`~segadapt.runtime.classes.ClassInfo` of the checkpoint (K classes, ignore index).
        size, crop: (H, W) in pixels the frames are resized to, then randomly scaled by ``scale`` and cropped.

    Raises:
        FileNotFoundError / ValueError: one line naming the folder or file and the problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such source data folder (--source-data)")
    if not (root / "labels").is_dir():
        raise ValueError(f"{root}: no labels/ folder in the source data folder (--source-data expects <dir>/images "
                         "and <dir>/labels)")
    ds = LabeledImageFolder(root, classes, transform=train_transform(crop, size, scale, classes.ignore_index))
    ds.load(0)
    return ds


def source_loader(ds: LabeledImageFolder, batch_size: int, seed: int, start: int, num_workers: int = 0,
                  rank: int = 0, world_size: int = 1):
    """The endless source stream (:func:`~segadapt.adapt.data.sampling.resumable_loader` with the seed
    ``seed + SOURCE_SEED_OFFSET``): one batch per step, so ``start`` = the steps already done resumes it exactly."""
    return resumable_loader(ds, batch_size, seed + SOURCE_SEED_OFFSET, start=start, num_workers=num_workers,
                            collate_fn=collate, rank=rank, world_size=world_size)


def paste_masks(source_labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """DACS's ClassMix masks of the source frames: for each frame, ceil(n/2) of the n classes present in its label
    (never the ignore index), chosen at random (global torch RNG).

    Args:
        source_labels: (Bs, H, W) int64.

    Returns:
        (Bs, 1, H, W) float32 in {0, 1}, 1 on the chosen classes' pixels.
    """
    return class_mix_masks(source_labels, ignore_index)


def dacs_mix(target01: torch.Tensor, source01: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             source_labels: torch.Tensor, masks: torch.Tensor, reliability: Optional[torch.Tensor] = None):
    """DACS source->target ClassMix: source frame ``i % Bs``'s masked pixels pasted onto target frame ``i``.

    Args:
        target01: (B, 3, H, W) float in [0, 1] target frames; source01: (Bs, 3, H, W) float in [0, 1].
        labels: (B, H, W) int64 pseudo-labels of the targets; weights: (B, H, W) float32 their loss weights.
        source_labels: (Bs, H, W) int64; masks: (Bs, 1, H, W) {0, 1} from :func:`paste_masks`.
        reliability: (B, H, W) float rectification r of the targets, or None.

    Returns:
        (image (B, 3, H, W) float in [0, 1], labels (B, H, W) int64 = source label where pasted else the
        pseudo-label, weights (B, H, W) float32 = 1 where pasted else ``weights``, r (1 where pasted) or None,
        masks (B, 1, H, W) float {0, 1} paired with the targets).
    """
    idx = torch.arange(target01.shape[0], device=target01.device) % source01.shape[0]
    m = masks[idx].to(target01.dtype)
    x = m * source01[idx] + (1 - m) * target01
    pasted = m[:, 0] > 0.5
    lab = torch.where(pasted, source_labels[idx], labels)
    w = torch.where(pasted, torch.ones_like(weights), weights)
    r = torch.where(pasted, torch.ones_like(reliability), reliability) if reliability is not None else None
    return x, lab, w, r, m


def source_ce(student_forward: Callable, x_norm: torch.Tensor, labels: torch.Tensor,
              ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the student on normalised source frames against their labels.

    Args:
        student_forward: normalised (Bs, 3, H, W) -> (logits (Bs, K, h, w), decoder features (Bs, D, h, w)).
        x_norm: (Bs, 3, H, W) float normalised frames; labels: (Bs, H, W) int64 (``ignore_index`` skipped).

    Returns:
        (scalar loss with grad, 0 with grad when every pixel is ignored; features (Bs, D, h, w) with grad).
    """
    logits, feats = student_forward(x_norm)
    logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]))
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0, feats
    return F.cross_entropy(logits, labels, ignore_index=ignore_index), feats


class UDASource:
    """The source side of one UDA run (module docstring): the checked dataset (at construction, before any model
    work beyond reading the checkpoint), the stream (:meth:`start`), the step's batch and DACS masks (:meth:`next`).

    Args:
        cfg: the run's :class:`~segadapt.adapt.config.AdaptConfig` (``source_data`` set).
        classes: the checkpoint's :class:`~segadapt.runtime.classes.ClassInfo`.
        size, crop: the run's (H, W) input and crop sizes; mean, std: the checkpoint's normalisation (in [0, 1]).

    Raises:
        FileNotFoundError / ValueError: a bad source folder (:func:`source_dataset`) or source data with depth.
    """

    def __init__(self, cfg, classes, size, crop, mean, std, device):
        if cfg.depth.provider != "none":
            raise ValueError("--source-data with --depth.provider: the UDA mode has no depth for source frames; "
                             "use one of them")
        self.cfg, self.ignore, self.mean, self.std, self.device = cfg, classes.ignore_index, mean, std, device
        self.ds = source_dataset(cfg.source_data, classes, tuple(size), tuple(crop), tuple(cfg.scale))
        self.batch: Optional[dict] = None
        self.batches = None

    def start(self, consumed: int, rank: int = 0, world_size: int = 1) -> None:
        """Open the stream after ``consumed`` batches (= the steps done: exact resume)."""
        bs = self.cfg.source_batch_size or self.cfg.batch_size
        self.batches = iter(source_loader(self.ds, bs, self.cfg.seed, consumed, self.cfg.num_workers, rank,
                                          world_size))

    def next(self) -> dict:
        """The step's batch: ``image`` (Bs, 3, H, W) float in [0, 1], ``labels`` (Bs, H, W) int64, ``valid``
        (Bs, H, W) bool and, with ``source_mix``, DACS ``masks`` (Bs, 1, H, W)."""
        b = next(self.batches)
        dev = self.device
        self.batch = {"image": b["image"].to(dev).float() / 255.0, "labels": b["label"].to(dev),
                      "valid": b["valid"].to(dev)}
        self.batch["masks"] = paste_masks(self.batch["labels"], self.ignore) if self.cfg.source_mix else None
        return self.batch

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] -> the normalised strong view (colour jitter and blur, ``cfg.strong``)."""
        return normalize_float(photometric(x01, self.cfg.strong), self.mean, self.std)

    def strong_view(self, img: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    reliability: Optional[torch.Tensor]):
        """The DACS strong view of (B, 3, H, W) uint8 target frames: (normalised image, labels, weights, r or None,
        masks (B, 1, H, W)) (:func:`dacs_mix`, then :meth:`prepare`)."""
        b = self.batch
        x, lab, w, r, m = dacs_mix(img.float() / 255.0, b["image"], labels, weights, b["labels"], b["masks"],
                                   reliability)
        return self.prepare(x), lab, w, r, m

    def context(self, img: torch.Tensor, student_forward: Callable, teacher_forward: Callable) -> SourceContext:
        """The components' :class:`~segadapt.adapt.components.SourceContext` for this step ((B, 3, H, W) uint8
        target frames; the forwards take normalised frames and run under the run's autocast)."""
        b, dev, amp = self.batch, self.device, self.cfg.amp
        masks = None
        if b["masks"] is not None:
            idx = torch.arange(img.shape[0], device=img.device) % b["masks"].shape[0]
            masks = b["masks"][idx]

        def fwd_s(x):
            with autocast(dev, amp):
                return student_forward(x)

        def fwd_t(x):
            with torch.no_grad(), autocast(dev, amp):
                return teacher_forward(x)

        return SourceContext(image=b["image"], labels=b["labels"], valid=b["valid"], target_image=img.float() / 255.0,
                             prepare=self.prepare, student_forward=fwd_s, teacher_forward=fwd_t,
                             normalize=lambda x: normalize_float(x, self.mean, self.std), paste_masks=masks)

    def loss(self, student_forward: Callable, ctx=None) -> torch.Tensor:
        """The unweighted source CE of the step's batch (:func:`source_ce`, under the run's autocast); stores the
        student's source features in ``ctx.source`` for the components when ``ctx`` has one."""
        b = self.batch
        with autocast(self.device, self.cfg.amp):
            loss, feats = source_ce(student_forward, normalize_float(b["image"], self.mean, self.std), b["labels"],
                                    self.ignore)
        if ctx is not None and ctx.source is not None:
            ctx.source.features = feats
        return loss
