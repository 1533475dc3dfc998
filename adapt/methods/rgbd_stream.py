"""CrossMatch's RGB-D auxiliary stream (Yin et al., ICCV 2023), a training-only component.

A copy of the source model with a depth input (:mod:`segadapt.adapt.models.rgbd_segmenter`: early fusion, the depth
weights start at zero) and its own EMA teacher join the loop:

* dual-head pseudo-label denoising: the pseudo-labels come from the mean of the RGB and RGB-D teachers' softmax,
  kept only where their argmax agree (``depth.require_agreement``);
* the RGB-D student learns the same (fused, refined) pseudo-labels on the strong view (depth mixed like the image,
  no photometric change);
* cross-modal consistency: each student learns the *other* teacher's own weak-view pseudo-labels, each thresholded
  by its own class-balanced thresholds (``depth.cross_modal_weight``).

Our design, not the paper's (its code was not available; see docs/method-notes.md, CrossMatch): the fusion rule,
the cross-modal form, the RGB-D teacher's own momentum (``depth.teacher_alpha``), the depth-input weights' own
learning rate and the validity channel. Inference never
sees depth: only the RGB student is exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segadapt.adapt.adabn import freeze_batchnorm
from segadapt.adapt.augment import mix
from segadapt.adapt.losses import weighted_ce
from segadapt.adapt.methods.base import Component, PseudoLabels, RunContext, Step
from segadapt.adapt.models.rgbd_segmenter import depth_input_weight, make_rgbd_segmenter
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.pseudo_label import ThresholdTracker, fuse_dual_head, kept_fraction, pseudo_label
from segadapt.adapt.teacher import EMATeacher
from segadapt.adapt.training.train_utils import autocast

__all__ = ["RGBDStream", "depth_input", "depth_valid_mask", "depth_weight_norm", "extra_channels", "fusion_removed",
           "split_depth_group", "stream_agreement"]


def extra_channels(validity_channel: bool) -> int:
    """Input channels of the RGB-D stream beyond RGB: depth, plus validity when ``validity_channel``."""
    return 2 if validity_channel else 1


def depth_input(batch: dict, validity_channel: bool) -> torch.Tensor:
    """The extra input of the RGB-D stream from a dataset batch.

    Args:
        batch: with ``depth`` (B, 1, H, W) float32 in [0, 1] (0 where missing) and ``depth_valid`` (B, 1, H, W) bool.
        validity_channel: append the validity mask as a second channel (1.0 measured, 0.0 missing; our design,
            see docs/method-notes.md, CrossMatch).

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


def split_depth_group(groups: list, rgbd: torch.nn.Module, lr: float) -> list:
    """Move the RGB-D stem's depth-input weights out of ``groups`` (AdamW parameter groups of ``rgbd``) into their
    own group with learning rate ``lr`` and no weight decay (decay would pull the zero-initialised weights back to
    "ignore depth") (ours).

    Returns:
        the groups without the weights (emptied groups dropped) plus the new group, named ``depth_input``.
    """
    w = depth_input_weight(rgbd)
    out = []
    for g in groups:
        ps = [p for p in g["params"] if p is not w]
        if ps:
            out.append({**g, "params": ps})
    out.append({"params": [w], "lr": lr, "weight_decay": 0.0, "name": "depth_input"})
    return out


def depth_weight_norm(rgbd: torch.nn.Module | None) -> dict:
    """``{"depth_w_norm": L2 norm of the depth-input weights}`` for the log, or ``{}`` without an RGB-D stream."""
    if rgbd is None:
        return {}
    return {"depth_w_norm": round(float(depth_input_weight(rgbd).detach().norm()), 6)}


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


class RGBDStream(Component):
    """The component (module docstring). Enabled by ``--depth.provider`` (not ``none``); the loop's dataset then
    carries ``depth`` (B, 1, H, W) float in [0, 1] and ``depth_valid`` (B, 1, H, W) bool."""

    name = "rgbd_stream"

    @staticmethod
    def enabled(cfg) -> bool:
        return cfg.depth.provider != "none"

    def __init__(self, cfg):
        self.cfg, self.d = cfg, cfg.depth

    def setup(self, run: RunContext) -> None:
        """The RGB-D student from the RGB student as the run starts (zero depth weights), its EMA teacher, and the
        two streams' own threshold trackers for the cross-modal targets."""
        cfg, p, k = self.cfg, self.cfg.pseudo, run.num_classes
        self.device, self.amp, self.ignore = run.device, cfg.amp, run.ignore_index
        self.model = make_rgbd_segmenter(run.student(), extra_channels(self.d.validity_channel)).to(run.device)
        self.model.train()
        freeze_batchnorm(self.model)
        self.teacher = EMATeacher(self.model, self.d.teacher_alpha)
        self.trackers = {n: ThresholdTracker(k, p.fraction, p.threshold, p.floor) for n in ("rgb", "rgbd")}

    def param_groups(self) -> list:
        cfg = self.cfg
        groups = self.model.param_groups(cfg.learning_rate(), cfg.weight_decay, cfg.head_lr_mult)
        return split_depth_group(groups, self.model, self.d.input_lr)

    def start_step(self, s: Step) -> None:
        self.depth = depth_input(s.batch, self.d.validity_channel).to(s.image.device)

    def teacher_view(self, s: Step) -> None:
        """The RGB-D teacher's (B, K, H, W) softmax on the weak view: ``view.extra["rgbd_probs"]``."""
        hw = tuple(s.image.shape[-2:])
        with torch.no_grad(), autocast(self.device, self.amp):
            logits = self.teacher(torch.cat([s.view.x, self.depth], 1))
        s.view.extra["rgbd_probs"] = F.softmax(upsample_logits(logits.float(), hw), 1)

    def label_probs(self, s: Step, probs: torch.Tensor) -> torch.Tensor:
        """Dual-head fusion: the mean of the two teachers' softmax (the agreement mask is applied in refine)."""
        fused, self.agree = fuse_dual_head(probs, s.view.extra["rgbd_probs"], self.d.require_agreement)
        return fused

    def refine(self, s: Step, pl: PseudoLabels) -> PseudoLabels:
        """Drop the pixels where the two teachers' argmax disagree; log what that removed and the streams'
        agreement on pixels with depth."""
        s.logs["rgbd_removed"] = fusion_removed(pl.mask, self.agree, pl.valid)
        s.logs["stream_agreement"] = stream_agreement(s.view.probs, s.view.extra["rgbd_probs"],
                                                      depth_valid_mask(self.depth))
        mask = pl.mask & self.agree
        labels = torch.where(mask, pl.labels, torch.full_like(pl.labels, self.ignore))
        return PseudoLabels(labels, mask, pl.weights * mask.float(), pl.threshold, pl.valid)

    def loss(self, s: Step) -> dict:
        """``rgbd_pl``: the RGB-D student's weighted CE on the strong view's labels; ``cross_modal``: each student
        toward the other teacher's own weak-view pseudo-labels (mixed like the strong view), weighted."""
        v, hw = s.strong, tuple(s.strong.x.shape[-2:])
        self.step = s  # after_update logs the depth weights' norm into it
        depth = mix(self.depth, v.mix_masks) if v.mix_masks is not None else self.depth
        with autocast(self.device, self.amp):
            logits_d = upsample_logits(self.model(torch.cat([v.x, depth], 1)).float(), hw)
        logits = upsample_logits(s.student_logits.float(), hw)
        loss_pl = weighted_ce(logits_d, v.labels, v.weights, self.ignore)
        return {"rgbd_pl": loss_pl, "cross_modal": self.d.cross_modal_weight * self.cross_modal(s, logits, logits_d)}

    def cross_modal(self, s: Step, logits: torch.Tensor, logits_d: torch.Tensor) -> torch.Tensor:
        """CE of the RGB student toward the RGB-D teacher's pseudo-labels plus CE of the RGB-D student toward the RGB
        teacher's, each stream's labels from its own thresholds (CBST rule and curriculum as configured)."""
        p, v = self.cfg.pseudo, s.view
        targets = {}
        for name, probs in (("rgb", v.probs), ("rgbd", v.extra["rgbd_probs"])):
            tr = self.trackers[name]
            tr.fraction = kept_fraction(s.index, p.fraction, p.fraction_start, p.fraction_ramp_steps)
            th = tr.update(probs, v.valid) if p.class_balanced else p.threshold
            lab, m, _ = pseudo_label(probs, th, self.ignore, p.rule, v.valid)
            m = m.float()
            if s.strong.mix_masks is not None:
                lab, m = mix(lab, s.strong.mix_masks), mix(m, s.strong.mix_masks)
            targets[name] = (lab, m)
        return (weighted_ce(logits, *targets["rgbd"], self.ignore) +
                weighted_ce(logits_d, *targets["rgb"], self.ignore))

    def after_update(self) -> None:
        self.teacher.update(self.model)
        if getattr(self, "step", None) is not None:
            self.step.logs.update(depth_weight_norm(self.model))  # the trained weights' norm, after the step
            self.step = None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "teacher": self.teacher.model.state_dict(),
                **{f"tracker_{n}": t.state_dict() for n, t in self.trackers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.model.load_state_dict(state["teacher"])
        for n, t in self.trackers.items():
            t.load_state_dict(state[f"tracker_{n}"])
