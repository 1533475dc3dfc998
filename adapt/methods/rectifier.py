"""IR2F's pseudo-label rectification (Gong et al., CVPR 2023) as a component: a per-pixel reliability r of the
pseudo-labels the student trains on, which turns the loop's pseudo-label loss into the rectification-aware mixture
loss ``-log(r p(y|x) + (1 - r) / K)`` (:func:`segadapt.adapt.losses.mixture_loss`).

By default r is the teacher-anchor confidence prior (ours): the mean of the EMA teacher's and the frozen anchor's
(the source model after AdaBN) probability of the label, nothing learned. With ``rectifier.inr`` an implicit neural
head (LIIF-style, :class:`~segadapt.adapt.models.rectifier.ImplicitRectifier`) on the teacher's features corrects
the prior, trained by BCE toward what is observable on the target: the pseudo-label agrees with the anchor, a
flipped or photometric view, views the head never sees, and with depth the RGB-D teacher
(:mod:`segadapt.adapt.methods.rectifier_signals`). IR2F learns r in a setting with labelled source data; a
source-free run has no labels that show where a pseudo-label is right. The prior, the targets and the mixture form
are our design, not the paper's (see docs/method-notes.md, IR2F).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from segadapt.adapt.augment import normalize_float, photometric
from segadapt.adapt.methods.base import Component, RunContext, Step
from segadapt.adapt.methods.heads import labels_at
from segadapt.adapt.methods.rectifier_signals import (agreement_target, masked_bce, rectifier_feature_channels,
                                                      rectifier_input, view_consensus_probs)
from segadapt.adapt.models.rectifier import ImplicitRectifier, confidence_prior
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.training.train_utils import autocast

__all__ = ["RECTIFIER_PRIORS", "Rectifier", "load_run", "make_rectifier", "rectification"]

RECTIFIER_PRIORS = ("none", "teacher", "teacher_anchor")


def make_rectifier(cfg, feature_channels: int, num_classes: int) -> ImplicitRectifier:
    """The implicit head as an :class:`~segadapt.adapt.config.AdaptConfig` configures it: its latent grid reads the
    teacher's features and class probabilities (and the anchor's with ``rectifier.anchor_consistency``)."""
    k = num_classes * (2 if cfg.rectifier.anchor_consistency else 1)
    return ImplicitRectifier(feature_channels, k, cfg.rectifier.latent_dim, cfg.rectifier.hidden, cfg.rectifier.layers,
                             prior_residual=cfg.rectifier.prior != "none")


def rectification(cfg, rect: Optional[ImplicitRectifier], features: Optional[torch.Tensor], logits: torch.Tensor,
                  anchor_logits: Optional[torch.Tensor], out_size, labels: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """r on an ``out_size`` grid from the teacher's output, as configured.

    Args:
        rect: from :func:`make_rectifier`, or None for the confidence prior alone.
        features: (B, D, h', w') teacher features from :func:`rectifier_input` (None with ``rect`` None).
        logits: (B, K, h, w) teacher logits; anchor_logits: (B, K, h, w) the anchor's, or None.
        out_size: (H, W) query grid.
        labels: (B, H, W) int64 labels r is the reliability of (at ``out_size``; ignore = the teacher's argmax);
            None = the teacher's argmax.

    Returns:
        (B, H, W) float in (0, 1); gradients reach only the head's parameters.

    Raises:
        ValueError: ``rect`` None with ``rectifier.prior`` "none" (nothing to give r).
    """
    rc, prior = cfg.rectifier, None
    if rc.prior != "none":
        with torch.no_grad():
            pt = F.softmax(upsample_logits(logits.detach().float(), out_size), 1)
            pn = None
            if rc.prior == "teacher_anchor":
                pn = F.softmax(upsample_logits(anchor_logits.detach().float(), out_size), 1)
            prior = confidence_prior(pt, pn, labels)
    if rect is None:
        if prior is None:
            raise ValueError("rectifier.inr off needs a prior (rectifier.prior teacher or teacher_anchor)")
        return prior
    grid = tuple(features.shape[-2:])
    probs = F.softmax(upsample_logits(logits.detach().float(), grid), 1)
    if rc.anchor_consistency:
        probs = torch.cat([probs, F.softmax(upsample_logits(anchor_logits.detach().float(), grid), 1)], 1)
    return rect(features.detach().float(), probs, out_size, prior=prior)


class Rectifier(Component):
    """The component (module docstring); on by default (``rectifier.enabled``). r enters the loss after
    ``rectifier.warmup_steps``; the implicit head's BCE (``rectifier_bce``) trains from the first step."""

    name = "rectifier"

    @staticmethod
    def enabled(cfg) -> bool:
        return cfg.rectifier.enabled

    def __init__(self, cfg):
        self.cfg, self.rc = cfg, cfg.rectifier
        self.needs_anchor = self.rc.prior == "teacher_anchor" or (self.rc.inr and self.rc.anchor_consistency)
        self.head: Optional[ImplicitRectifier] = None

    def setup(self, run: RunContext) -> None:
        self.run = run
        if self.rc.inr:
            d = rectifier_feature_channels(run.teacher.model, self.rc)
            self.head = make_rectifier(self.cfg, d, run.num_classes).to(run.device)

    def param_groups(self) -> list:
        if self.head is None:
            return []
        return [{"params": list(self.head.parameters()), "lr": self.rc.lr, "weight_decay": 0.0}]

    def teacher_view(self, s: Step) -> None:
        """With the implicit head: its latent features (a low-level pass when ``rectifier.features`` asks) and the
        teacher's probabilities on the target views that are enabled."""
        if self.head is None:
            return
        rc, v, model, run = self.rc, s.view, self.run.teacher.model, self.run
        hw = tuple(s.image.shape[-2:])
        with torch.no_grad(), autocast(run.device, self.cfg.amp):
            self.features = v.features if rc.features == "decoder" else rectifier_input(model, v.x, rc)[1]
            softmax = lambda x: F.softmax(upsample_logits(model(x).float(), hw), 1)  # noqa: E731
            self.targets = [v.anchor_probs if rc.anchor_consistency else None, v.extra.get("rgbd_probs")]
            if rc.flip_consistency:
                self.targets.append(softmax(v.x.flip(-1)).flip(-1))
            if rc.photometric_consistency:
                x01 = photometric(s.image.float() / 255.0, self.cfg.strong)
                self.targets.append(softmax(normalize_float(x01, run.mean, run.std)))
            if rc.view_consensus:
                self.targets.append(view_consensus_probs(model, s.image, run.mean, run.std, rc, self.cfg.strong))

    def reliability(self, s: Step):
        """r of the refined pseudo-labels at the input size (None before the warm-up; ``view.extra["reliability"]``
        always, for the debug grid), and the head's BCE toward the agreement target over real pixels."""
        v, pl, hw = s.view, s.labels, tuple(s.image.shape[-2:])
        use = s.index >= self.rc.warmup_steps
        if self.head is None:
            pn = v.anchor_probs if self.rc.prior == "teacher_anchor" else None
            v.extra["reliability"] = r = confidence_prior(v.probs, pn, pl.labels)  # shown in the debug grid
            return (r if use else None), {}
        qs = max(1, self.rc.query_stride)
        small = (max(1, hw[0] // qs), max(1, hw[1] // qs))
        r_small = rectification(self.cfg, self.head, self.features, v.logits, v.anchor_logits, small,
                                labels_at(pl.labels, small))
        label = torch.where(pl.mask, pl.labels, v.probs.argmax(1))  # where nothing is kept: the teacher's label
        loss = masked_bce(r_small, agreement_target(label, self.targets), v.valid)
        r = F.interpolate(r_small[:, None].detach(), size=hw, mode="bilinear", align_corners=False)[:, 0]
        v.extra["reliability"] = r
        return (r if use else None), {"rectifier_bce": self.rc.loss_weight * loss}

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict()} if self.head is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.head is not None:
            self.head.load_state_dict(state["head"])


def load_run(run: str | Path):
    """A finished ``segadapt adapt`` run rebuilt from ``<run>/last`` for analysis (benchmarks): its EMA teacher, its
    anchor (rebuilt from the source checkpoint with the run's AdaBN settings when the run kept none; None for a
    video target) and its implicit head, with the run's own saved config.

    Returns:
        (teacher in eval mode, anchor in eval mode or None, implicit head in eval mode or None, checkpoint metadata,
        the run's :class:`~segadapt.adapt.config.AdaptConfig`).

    Raises:
        FileNotFoundError: ``<run>/last/training_state.pt`` is missing.
    """
    from segadapt.adapt.adabn import adabn_source_model
    from segadapt.adapt.config import AdaptConfig, from_dict
    from segadapt.adapt.data.datasets import ImageFolder, is_video
    from segadapt.adapt.data.transforms import Resize
    from segadapt.adapt.models.checkpoint import load_checkpoint

    d = Path(run) / "last"
    if not (d / "training_state.pt").is_file():
        raise FileNotFoundError(f"{d / 'training_state.pt'}: not found; expected the output folder of a finished "
                                "`segadapt adapt` run")
    st = torch.load(d / "training_state.pt", map_location="cpu", weights_only=True)
    student, meta = load_checkpoint(d)
    cfg = from_dict(AdaptConfig, meta.info["config"])
    teacher = copy.deepcopy(student)
    teacher.load_state_dict(st["teacher"])
    anchor = head = None
    if "anchor" in st:
        anchor = copy.deepcopy(student)
        anchor.load_state_dict(st["anchor"])
    elif cfg.checkpoint and Path(cfg.checkpoint).exists() and not is_video(cfg.target):
        frames = ImageFolder(cfg.target, transform=Resize(tuple(meta.input_size)))
        anchor = adabn_source_model(cfg.checkpoint, frames, "cpu", cfg.adabn_alpha, cfg.adabn_layers, cfg.adabn)[0]
    saved = st.get("components", {}).get(Rectifier.name, {})
    if "head" in saved:
        head = make_rectifier(cfg, rectifier_feature_channels(student, cfg.rectifier), meta.classes.num_classes)
        head.load_state_dict(saved["head"])
        head.eval()
    return teacher.eval(), anchor.eval() if anchor is not None else None, head, meta, cfg
