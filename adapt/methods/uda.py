"""UDA mode of ``segadapt adapt`` (``--source-data DIR``): labelled source frames join the loop.

Source-free by default: with ``AdaptConfig.source_data`` empty nothing here runs and nothing opens a source file.
With a labelled source split (``DIR/images`` + ``DIR/labels``, the checkpoint's class ids), every step adds, after
DACS (Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling", WACV 2021):

* a batch of source frames with the target's geometric augmentation (resize to the run's size, random scale and
  crop, flip), from an endless seeded stream whose batch k depends only on (seed, k)
  (:mod:`segadapt.adapt.data.sampling`): a resumed run reads exactly the source batches the uninterrupted run read;
  with ``rare_class_sampling`` the frames are drawn by DAFormer's rare-class sampling
  (:mod:`segadapt.adapt.data.rare_class`; the class pixel counts in ``<out>/class_stats.json``);
* ``source_weight * CE(student(x_s), y_s)`` (:func:`source_ce`), logged as ``loss_src``;
* the student's strong view is DACS's source->target ClassMix (:func:`dacs_mix`): half of the classes present in
  each source label (ceil(n/2), at random) pasted onto a target frame; the mixed label is the source label on pasted
  pixels (weight 1) and the teacher's pseudo-label elsewhere (with its weights); then the usual colour jitter and
  blur (``AdaptConfig.strong``).

RCCR and BiDA then run in their paper forms (:mod:`segadapt.adapt.methods.rccr`, :mod:`segadapt.adapt.methods.bida`)
from the
:class:`~segadapt.adapt.methods.base.SourceContext` this module builds.

Our design, not the paper's (see docs/method-notes.md, DACS; configurable where a field is named):

* Pairing: source frame ``i % Bs`` is pasted onto target frame ``i`` (DACS pairs equal batches);
  ``source_batch_size`` (0 = the target's ``batch_size``) sets Bs.
* Target-to-target ClassMix is off in the UDA mode: DACS's strong view is one mix, source onto target, and a second
  mix would paste target classes over the source ones. ``source_mix`` false keeps the source-free strong view
  (target-to-target ClassMix) and adds only the source CE.
* The rectifier's reliability r is 1 on pasted source pixels (their labels are ground truth); its training signal
  stays the target-side agreement (supervising r with source labels is not used; see docs/method-notes.md,
  IR2F).
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
from segadapt.adapt.data.datasets import LabeledImageFolder, collate, find_classes_json
from segadapt.adapt.data.rare_class import rare_class_loader, run_class_stats
from segadapt.adapt.data.sampling import resumable_loader
from segadapt.adapt.data.transforms import train_transform
from segadapt.adapt.methods.base import Component, RunContext, SourceContext, Step, StrongView
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.training import distributed
from segadapt.adapt.training.train_utils import autocast
from segadapt.runtime.classes import ClassInfo

__all__ = ["SOURCE_SEED_OFFSET", "UDAMode", "dacs_mix", "paste_masks", "source_ce", "source_dataset",
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
        FileNotFoundError / ValueError: one line naming the folder or file and the problem, also when the split's
            own ``classes.json`` (in it or its parents) names other classes than the checkpoint.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such source data folder (--source-data)")
    if not (root / "labels").is_dir():
        raise ValueError(f"{root}: no labels/ folder in the source data folder (--source-data expects <dir>/images "
                         "and <dir>/labels)")
    try:
        own = find_classes_json(root)
    except FileNotFoundError:
        own = None  # no class file: the labels are read with the checkpoint's classes
    if own is not None and list(ClassInfo.load(own).names) != list(classes.names):
        raise ValueError(f"{own}: its class names {list(ClassInfo.load(own).names)} differ from the checkpoint's "
                         f"{list(classes.names)} (--source-data: source labels must use the checkpoint's class ids)")
    ds = LabeledImageFolder(root, classes, transform=train_transform(crop, size, scale, classes.ignore_index))
    ds.load(0)
    return ds


def source_loader(ds: LabeledImageFolder, batch_size: int, seed: int, start: int, num_workers: int = 0,
                  rank: int = 0, world_size: int = 1, rare_classes: Optional[dict] = None):
    """The endless source stream (:func:`~segadapt.adapt.data.sampling.resumable_loader` with the seed
    ``seed + SOURCE_SEED_OFFSET``): one batch per step, so ``start`` = the steps already done resumes it exactly.
    ``rare_classes``: the keyword arguments ``stats``, ``temperature``, ``min_pixels``, ``crop_tries`` of
    :func:`~segadapt.adapt.data.rare_class.rare_class_loader` (rare-class sampling); None = uniform frames."""
    if rare_classes is not None:
        return rare_class_loader(ds, batch_size=batch_size, seed=seed + SOURCE_SEED_OFFSET, start=start,
                                 num_workers=num_workers, collate_fn=collate, rank=rank, world_size=world_size,
                                 **rare_classes)
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


class UDAMode(Component):
    """The UDA mode (module docstring) as a component, enabled by ``--source-data``. Its source stream's position
    (= the source batches drawn) is part of its state, so a resumed run reads exactly the source batches of the
    uninterrupted run. It is first in the component list: its batch and :class:`SourceContext` are there when the
    other components' hooks run, and its source features before BiDA's loss."""

    name = "uda"

    @staticmethod
    def enabled(cfg) -> bool:
        return bool(cfg.source_data)

    def __init__(self, cfg):
        if cfg.depth.provider != "none":
            raise ValueError("--source-data with --depth.provider: the UDA mode has no depth for source frames; "
                             "use one of them")
        self.cfg, self.consumed, self.batches = cfg, 0, None

    def setup(self, run: RunContext) -> None:
        """Check and open the labelled source split (:func:`source_dataset`)."""
        cfg = self.cfg
        crop = tuple(cfg.crop) if all(cfg.crop) else tuple(run.size)
        self.run, self.ignore, self.mean, self.std, self.device = run, run.ignore_index, run.mean, run.std, run.device
        self.ds = source_dataset(cfg.source_data, run.classes, tuple(run.size), crop, tuple(cfg.scale))
        run.log(f"UDA mode: {len(self.ds)} labelled source frames from {cfg.source_data}")
        self.rare = None
        if cfg.rare_class_sampling:  # data-parallel: rank 0 counts and writes, every rank samples with its counts
            stats = distributed.broadcast_object(run_class_stats(run.out, self.ds, not run.fresh, run.log)
                                                 if distributed.is_main() else None)
            self.rare = dict(stats=stats, temperature=cfg.rare_class_temperature,
                             min_pixels=cfg.rare_class_min_pixels, crop_tries=cfg.rare_class_crop_tries)

    def start_step(self, s: Step) -> None:
        """Draw the step's source batch and DACS masks; ``s.source`` for the other components."""
        if self.batches is None:  # at the steps done: exact resume
            bs = self.cfg.source_batch_size or self.cfg.batch_size
            self.batches = iter(source_loader(self.ds, bs, self.cfg.seed, self.consumed, self.cfg.num_workers,
                                              distributed.rank(), distributed.world_size(), self.rare))
        b = next(self.batches)
        self.consumed += 1
        dev, amp, student, teacher = self.device, self.cfg.amp, self.run.student, self.run.teacher
        image, labels = b["image"].to(dev).float() / 255.0, b["label"].to(dev)
        masks = paste_masks(labels, self.ignore) if self.cfg.source_mix else None

        def fwd_s(x):
            with autocast(dev, amp):
                return student().forward_features(x)

        def fwd_t(x):
            with torch.no_grad(), autocast(dev, amp):
                return teacher.forward_features(x)

        s.source = SourceContext(image=image, labels=labels, valid=b["valid"].to(dev),
                                 target_image=s.image.float() / 255.0, prepare=self.prepare, student_forward=fwd_s,
                                 teacher_forward=fwd_t, normalize=lambda x: normalize_float(x, self.mean, self.std),
                                 masks=masks)

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] -> the normalised strong view (colour jitter and blur, ``cfg.strong``)."""
        return normalize_float(photometric(x01, self.cfg.strong), self.mean, self.std)

    def strong_view(self, s: Step) -> Optional[StrongView]:
        """With ``source_mix``: DACS's source->target ClassMix of the weak target view (:func:`dacs_mix`), then
        colour jitter and blur; r is 1 on pasted source pixels."""
        src, pl = s.source, s.labels
        if src.masks is None:
            return None
        x, lab, w, r, m = dacs_mix(s.image.float() / 255.0, src.image, pl.labels, pl.weights, src.labels, src.masks,
                                   s.reliability)
        src.paste_masks = m
        return StrongView(self.prepare(x), lab, w, r, None)

    def loss(self, s: Step) -> dict:
        """``{"source_ce": source_weight * CE of the student on the source batch}``; the student's source features
        go to ``s.source.features`` (BiDA's paper form reads them)."""
        src = s.source
        with autocast(self.device, self.cfg.amp):
            loss, feats = source_ce(self.run.student().forward_features, src.normalize(src.image), src.labels,
                                    self.ignore)
        src.features = feats
        return {"source_ce": self.cfg.source_weight * loss}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.batches = int(state["consumed"]), None
