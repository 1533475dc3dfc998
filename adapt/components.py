"""Optional loss components of the adaptation loop: small objects, each with its own loss (issue #13).

A component sees one :class:`StepContext` per step (the teacher on the weak view, the pseudo-labels, the student on
the strong view) and adds a scalar to the student's loss. It may own trainable parameters (a projection head: they
join the optimiser in the head's learning-rate group), updates its own EMA state after the optimiser step
(:meth:`LossComponent.after_update`), and saves that state with the training state for an exact resume. With no
component enabled the loop computes exactly what it computes without this module.

Components: :class:`segadapt.adapt.rccr.RCCR` (methods.md 2) and :class:`segadapt.adapt.bida.BiDA` (methods.md 4.3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LossComponent", "ProjectionHead", "SourceContext", "StepContext", "apply_votes", "build_components",
           "component_losses", "ema_", "labels_at", "source_batches"]


@dataclass
class StepContext:
    """What a component sees in one step. Sizes: B frames, K classes, D decoder channels, (H, W) the input size,
    (h, w) the decoder's output size (H / output stride).

    The teacher fields are filled before the pseudo-labels are voted on (:meth:`LossComponent.vote`); the student
    fields before :meth:`LossComponent.loss`."""

    step: int  # the 0-based step being made
    steps: int  # the run's total steps (for weight ramps)
    ignore_index: int
    teacher_logits: torch.Tensor  # (B, K, h, w) float, EMA teacher on the weak (un-augmented) view, no grad
    teacher_features: torch.Tensor  # (B, D, h, w) float, its decoder features (classifier input)
    teacher_probs: torch.Tensor  # (B, K, H, W) float32 softmax at the input size
    labels: torch.Tensor  # (B, H, W) int64 pseudo-labels of the weak view (ignore_index where dropped)
    weights: torch.Tensor  # (B, H, W) float32 per-pixel loss weights (0 where dropped)
    mask: torch.Tensor  # (B, H, W) bool, kept pseudo-label pixels
    student_logits: Optional[torch.Tensor] = None  # (B, K, h, w) student on the strong view, with grad
    student_features: Optional[torch.Tensor] = None  # (B, D, h, w) its decoder features, with grad
    strong_labels: Optional[torch.Tensor] = None  # (B, H, W) int64 pseudo-labels mixed like the strong view
    strong_weights: Optional[torch.Tensor] = None  # (B, H, W) float32 weights mixed like the strong view
    mix_masks: Optional[torch.Tensor] = None  # (B, 1, H, W) float {0, 1} ClassMix masks (None: no mix), see augment.mix
    valid: Optional[torch.Tensor] = None  # (B, H, W) bool weak view, False on crop padding (None: all real pixels)
    source: Optional["SourceContext"] = None  # UDA mode (adapt/uda.py): the step's labelled source batch; None = SF


@dataclass
class SourceContext:
    """UDA mode (:mod:`segadapt.adapt.uda`, ``--source-data``): the step's labelled source batch and what the paper
    forms of the components need (RCCR's source-crop-with-target-box view, BiDA's source prototypes). Sizes as in
    :class:`StepContext`; the source batch has the target batch's (H, W) and may hold another number Bs of frames."""

    image: torch.Tensor  # (Bs, 3, H, W) float in [0, 1], source frames (geometric augmentation only)
    labels: torch.Tensor  # (Bs, H, W) int64 source labels (ignore_index on void and crop padding)
    valid: torch.Tensor  # (Bs, H, W) bool, False on crop padding
    target_image: torch.Tensor  # (B, 3, H, W) float in [0, 1], the weak target view the teacher saw
    prepare: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) [0, 1] -> normalised strong view (photometric)
    student_forward: Callable  # normalised (N, 3, H, W) -> (logits (N, K, h, w), features (N, D, h, w)), with grad
    teacher_forward: Callable  # normalised (N, 3, H, W) -> (logits, features) of the EMA teacher, no grad
    normalize: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) [0, 1] -> normalised (no augmentation)
    paste_masks: Optional[torch.Tensor] = None  # (B, 1, H, W) {0, 1}: source pixels of the strong view (DACS mix)
    features: Optional[torch.Tensor] = None  # (Bs, D, h, w) student decoder features on the source frames, with grad


class LossComponent:
    """Base of a loss component (a protocol with do-nothing defaults). ``name`` keys its state and its log terms."""

    name = "component"

    def parameters(self) -> List[nn.Parameter]:
        """Extra trainable parameters (e.g. a projection head); the loop adds them to the optimiser."""
        return []

    def to(self, device) -> "LossComponent":
        return self

    def vote(self, ctx: StepContext) -> Optional[torch.Tensor]:
        """(B, H, W) bool: pseudo-label pixels this component keeps (False = veto), or None for no opinion."""
        return None

    def loss(self, ctx: StepContext) -> Tuple[torch.Tensor, dict]:
        """(weighted scalar loss with grad, {log name: float}) for this step."""
        raise NotImplementedError

    def after_update(self) -> None:
        """After the optimiser step: EMA updates of momentum heads, prototypes and the like."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (exact resume)."""


class ProjectionHead(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> L2-normalise over channels (RCCR code's head, methods.md 2.2; BiDA's
    projection, methods.md 4.3).

    ``forward``: (N, D, h, w) float -> (N, E, h, w) float, unit norm along dim 1."""

    def __init__(self, in_channels: int, out_channels: int = 128, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def momentum_copy(head: nn.Module) -> nn.Module:
    """A frozen copy of ``head`` to follow it by EMA (the 'momentum projection head', methods.md 2.2)."""
    t = copy.deepcopy(head).eval()
    t.requires_grad_(False)
    return t


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` over parameters, in place."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def labels_at(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) int64 labels to (B, h, w) (methods.md 2.2: labels nearest-downsampled
    to the feature resolution)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def component_losses(components: Iterable[LossComponent], ctx: StepContext) -> Tuple[torch.Tensor, dict]:
    """Sum of the components' losses and their merged log terms."""
    total, logs = None, {}
    for c in components:
        loss, d = c.loss(ctx)
        total = loss if total is None else total + loss
        logs.update(d)
    return total, logs


def apply_votes(components: Iterable[LossComponent], ctx: StepContext
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Drop the pseudo-label pixels any component vetoes.

    Returns:
        (labels (B, H, W) int64 with ``ignore_index`` where dropped, mask (B, H, W) bool, weights (B, H, W) float32
        zeroed where dropped), or None when no component voted (nothing changes).
    """
    keep = None
    for c in components:
        v = c.vote(ctx)
        if v is not None:
            keep = v if keep is None else keep & v
    if keep is None:
        return None
    mask = ctx.mask & keep
    labels = torch.where(mask, ctx.labels, torch.full_like(ctx.labels, ctx.ignore_index))
    return labels, mask, ctx.weights * mask.float()


def source_batches(dataset, mean, std, device, max_frames: int, batch_size: int = 8):
    """Normalised (B, 3, H, W) float32 batches of the first ``max_frames`` frames of ``dataset`` (its transform
    should be a plain resize), in order: what the source model sees to build a component's source side."""
    from torch.utils.data import DataLoader, Subset

    from segadapt.adapt.augment import normalize
    from segadapt.adapt.data.datasets import collate

    n = min(len(dataset), max_frames)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=0)
    for batch in loader:
        yield normalize(batch["image"].to(device), mean, std)


def build_components(cfg, model: nn.Module, num_classes: int, device,
                     source_frames: Callable[[int], Iterable[torch.Tensor]], fresh: bool = True) -> List[LossComponent]:
    """The components ``cfg`` (an :class:`~segadapt.adapt.config.AdaptConfig`) enables, in a fixed order (RCCR,
    BiDA); an empty list by default.

    Args:
        model: the source model as adaptation starts (after AdaBN; the EMA teacher at step 0), with
            ``forward_features`` and ``feature_channels``; read, not changed.
        source_frames: ``n -> iterable of normalised (B, 3, H, W) batches`` of up to n target frames.
        fresh: False when resuming (the components' state comes from the training state; no source pass).

    With ``cfg.source_data`` (UDA mode) both run in their paper forms and BiDA's source side comes from the labelled
    source batches (no pass over target frames here).
    """
    from segadapt.adapt.bida import BiDA
    from segadapt.adapt.rccr import RCCR

    uda = bool(getattr(cfg, "source_data", ""))
    out: List[LossComponent] = []
    if cfg.rccr.enabled:
        out.append(RCCR(cfg.rccr, model.feature_channels, uda=uda).to(device))
    if cfg.bida.enabled:
        b = BiDA(cfg.bida, model.feature_channels, num_classes, uda=uda).to(device)
        if fresh and not uda:
            b.init_source(model, source_frames(cfg.bida.source_frames))
        out.append(b)
    return out
