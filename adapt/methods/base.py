"""The one protocol every adaptation method implements, and what the loop hands it.

The loop (:mod:`segadapt.adapt.engine`) knows no method by name. Each step it fills one :class:`Step` and calls the
enabled components' hooks at fixed points, in the order of :data:`segadapt.adapt.methods.components.COMPONENTS`:

1. :meth:`Component.start_step`: the batch is in (e.g. the UDA mode draws its source batch);
2. :meth:`Component.teacher_view`: the EMA teacher has seen the weak view; add extra outputs (no gradients) to
   ``step.view.extra`` (e.g. the RGB-D teacher's probabilities);
3. :meth:`Component.label_probs`: change the distribution the pseudo-labels are drawn from (dual-head fusion);
4. :meth:`Component.refine`: change the thresholded pseudo-labels (veto, fill, merge);
5. :meth:`Component.reliability`: a per-pixel reliability r of the final pseudo-labels (IR2F's rectification), which
   turns the pseudo-label loss into the rectification-aware mixture loss;
6. :meth:`Component.strong_view`: replace the loop's target-to-target ClassMix (DACS's source->target mix);
7. :meth:`Component.loss`: loss terms on the student's strong-view output (and anything else the component runs);
8. :meth:`Component.after_update`: after the optimiser step and the teacher's EMA update (momentum heads,
   prototypes);

and at set-up :meth:`Component.setup` (build modules from the source model) and :meth:`Component.param_groups`
(what the optimiser trains), for exact resume :meth:`Component.state_dict` / :meth:`Component.load_state_dict`.
Every hook has a do-nothing default, so a component implements only what it uses. Sizes below: B frames, K classes,
D decoder channels, (H, W) the input size, (h, w) the decoder's output size (H / output stride).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Component", "PseudoLabels", "RunContext", "SourceContext", "Step", "StrongView", "TeacherView"]


@dataclass
class TeacherView:
    """The EMA teacher on the weak (un-augmented) view, no gradients."""

    image: torch.Tensor  # (B, 3, H, W) uint8 weak view
    x: torch.Tensor  # (B, 3, H, W) float32 the same, normalised
    logits: torch.Tensor  # (B, K, h, w) teacher logits
    features: torch.Tensor  # (B, D, h, w) teacher decoder features (the classifier's input)
    probs: torch.Tensor  # (B, K, H, W) float32 teacher softmax at the input size (flip-averaged with teacher.flip)
    anchor_logits: Optional[torch.Tensor] = None  # (B, K, h, w) the frozen AdaBN source model, when the run keeps it
    anchor_probs: Optional[torch.Tensor] = None  # (B, K, H, W) its softmax
    valid: Optional[torch.Tensor] = None  # (B, H, W) bool, False on crop padding; None = every pixel is real
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)  # components' teacher outputs, by name


@dataclass
class PseudoLabels:
    """Pseudo-labels of one batch. ``labels`` (B, H, W) int64 (ignore index where dropped), ``mask`` (B, H, W) bool
    kept pixels, ``weights`` (B, H, W) float32 per-pixel loss weights (0 where dropped), ``threshold`` the
    confidence threshold(s) used ((K,) tensor or float)."""

    labels: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    threshold: torch.Tensor | float
    valid: Optional[torch.Tensor] = None  # (B, H, W) bool, False on crop padding (never labelled, never counted)


@dataclass
class StrongView:
    """The student's strong view and its targets. ``mix_masks``: the loop's target-to-target ClassMix masks
    (B, 1, H, W) {0, 1} (None without ClassMix or with a component's own view), see :func:`segadapt.adapt.augment.mix`.
    """

    x: torch.Tensor  # (B, 3, H, W) float32 normalised image
    labels: torch.Tensor  # (B, H, W) int64
    weights: torch.Tensor  # (B, H, W) float32
    reliability: Optional[torch.Tensor] = None  # (B, H, W) r mixed like the view, when a component gives r
    mix_masks: Optional[torch.Tensor] = None


@dataclass
class SourceContext:
    """UDA mode (:mod:`segadapt.adapt.methods.uda`): the step's labelled source batch and what the paper forms of
    RCCR and BiDA need. The source batch has the target batch's (H, W) and may hold another number Bs of frames."""

    image: torch.Tensor  # (Bs, 3, H, W) float in [0, 1], source frames (geometric augmentation only)
    labels: torch.Tensor  # (Bs, H, W) int64 source labels (ignore index on void and crop padding)
    valid: torch.Tensor  # (Bs, H, W) bool, False on crop padding
    target_image: torch.Tensor  # (B, 3, H, W) float in [0, 1], the weak target view the teacher saw
    prepare: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) [0, 1] -> normalised strong view (photometric)
    student_forward: Callable  # normalised (N, 3, H, W) -> (logits (N, K, h, w), features (N, D, h, w)), with grad
    teacher_forward: Callable  # normalised (N, 3, H, W) -> (logits, features) of the EMA teacher, no grad
    normalize: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) [0, 1] -> normalised (no augmentation)
    masks: Optional[torch.Tensor] = None  # (Bs, 1, H, W) {0, 1} DACS ClassMix masks of the source frames
    paste_masks: Optional[torch.Tensor] = None  # (B, 1, H, W) {0, 1}: source pixels of the strong view (DACS mix)
    features: Optional[torch.Tensor] = None  # (Bs, D, h, w) student decoder features on the source frames, with grad


@dataclass
class Step:
    """One adaptation step as the loop fills it; components read it and write their own outputs into it."""

    index: int  # the 0-based step being made
    steps: int  # the run's total steps (for weight ramps)
    num_classes: int
    ignore_index: int
    batch: dict  # the target batch as loaded (``image`` (B, 3, H, W) uint8, ``valid``, ``depth``, ...)
    image: torch.Tensor  # (B, 3, H, W) uint8 weak view on the run's device
    valid: Optional[torch.Tensor] = None  # (B, H, W) bool, False on crop padding
    view: Optional[TeacherView] = None
    labels: Optional[PseudoLabels] = None
    reliability: Optional[torch.Tensor] = None  # (B, H, W) float in [0, 1], r of ``labels`` (detached)
    strong: Optional[StrongView] = None
    student_logits: Optional[torch.Tensor] = None  # (B, K, h, w) student on the strong view, with grad
    student_features: Optional[torch.Tensor] = None  # (B, D, h, w) its decoder features, with grad
    source: Optional[SourceContext] = None  # UDA mode: the step's labelled source batch
    logs: dict = field(default_factory=dict)  # scalars for the log (floats)


@dataclass
class RunContext:
    """What a component may use at set-up. ``student`` is the RGB segmenter being trained (in
    :class:`~segadapt.adapt.training.distributed.DistributedModel` under torchrun, once training starts: call it,
    do not keep its parameters); ``source_model`` is the source model after AdaBN as the run starts (the student's
    and the teacher's step-0 weights; on resume rebuilt from the checkpoint), read-only."""

    cfg: object  # the run's AdaptConfig
    device: torch.device
    out: Path
    classes: object  # the checkpoint's segadapt.runtime.classes.ClassInfo (names, ignore index, stuff flags)
    num_classes: int
    ignore_index: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    size: Tuple[int, int]
    student: Callable[[], nn.Module]  # the current student (wrapped or not)
    teacher: nn.Module  # the EMA teacher (segadapt.adapt.teacher.EMATeacher)
    source_model: Callable[[], nn.Module]  # the source model after AdaBN (built once, on first call)
    frames: Callable[[], object]  # the target frames resized to ``size``, no augmentation, in order (a dataset)
    dataset: object  # the target training dataset (its ``transform`` may be wrapped)
    fresh: bool  # False when resuming: state comes from load_state_dict, not from a pass over the data
    log: Callable[[str], None] = print


class Component:
    """Base of the adaptation methods: every hook does nothing. ``name`` keys the component's state in the training
    state and prefixes its log terms."""

    name = "component"
    #: the loop keeps the frozen AdaBN source model (the anchor) for this component's teacher_view
    needs_anchor = False

    def setup(self, run: RunContext) -> None:
        """Build modules and state before the first step (and before :meth:`load_state_dict` on resume)."""

    def param_groups(self) -> List[dict]:
        """AdamW parameter groups of this component's trainable parameters (``params``, ``lr``,
        ``weight_decay``); trained with the student, their gradients averaged over ranks under torchrun."""
        return []

    def start_step(self, step: Step) -> None:
        """The batch is loaded (``step.batch``, ``step.image``)."""

    def teacher_view(self, step: Step) -> None:
        """The teacher has seen the weak view (``step.view``); add outputs to ``step.view.extra`` (no grad)."""

    def label_probs(self, step: Step, probs: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) probabilities the pseudo-labels are drawn from -> the same, changed or not."""
        return probs

    def refine(self, step: Step, labels: PseudoLabels) -> PseudoLabels:
        """Thresholded pseudo-labels -> refined ones (veto, fill, merge); log what changed in ``step.logs``."""
        return labels

    def reliability(self, step: Step) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """((B, H, W) float r in [0, 1] of ``step.labels``, detached, or None; its own loss terms by name)."""
        return None, {}

    def strong_view(self, step: Step) -> Optional[StrongView]:
        """The student's strong view, or None for the loop's target-to-target ClassMix."""
        return None

    def loss(self, step: Step) -> Dict[str, torch.Tensor]:
        """Weighted loss terms with gradients, by name (``step.student_logits`` and ``step.strong`` are set)."""
        return {}

    def after_update(self) -> None:
        """After the optimiser step and the teacher's EMA update."""

    def state_dict(self) -> dict:
        """Everything the next step depends on (exact resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup`)."""
