"""RCCR: region-wise contrastive consistency (Zhou et al., ICME 2022), source-free and UDA forms.

What the authors' code does (qianyuzqy/RCCR): a CutMix box pastes the target crop's region into a source crop;
student embeddings (projection head, 128-d, L2-normalised) inside the box are anchors, the *positive* of each is the
teacher's embedding (momentum projection head = EMA of the student's) at the same location of the un-augmented
target, the negatives are entries of a FIFO memory bank of detached student and teacher embeddings whose label differs
from the anchor's pseudo-label (class-filtered), InfoNCE with temperature 0.1, anchors gated by teacher confidence
> 0.75, loss weight ramped as ``0.01 exp(-5 (1 - sqrt(t / T)))``.

Source-free form (our design, not the paper's: see docs/method-notes.md, RCCR; configurable in
:class:`~segadapt.adapt.methods.config.RCCRConfig`):

* No second student forward: the loop's strong view is target-to-target ClassMix + photometric, so every strong-view
  pixel comes from one of two target frames at the *same* location (``augment.mix``). Its positive is the teacher's
  weak-view embedding mixed with the same masks (``mix(e_T, m)``), i.e. the un-augmented teacher features of the frame
  it came from. Decoder cells straddling a mask edge (pooled mask not 0 or 1) are not anchors.
* Every pixel may be an anchor (``anchors="all"``; both images are target), or only the pasted region
  (``anchors="pasted"``, the analogue of the box).
* Bank labels are the teacher's argmax (no threshold), mixed like the strong view for student entries; the bank and
  the samples per step are smaller than the code's 24000 / 4000 because our feature maps are small.

UDA form (``--source-data``, :mod:`segadapt.adapt.methods.uda`; the form of the authors' code): per frame a CutMix
box (area ratio r ~ U(0, 1) = Beta(1, 1), side ratio sqrt(r), on the decoder's grid: the code's 8-pixel grid
is its output stride) of the weak target view replaces the same box of a source frame; colour jitter and blur; one
more student pass on it. Anchors are the student's embeddings in the box (cells wholly inside, real, teacher
confidence > ``confidence``), positives the teacher's at the same location of the un-augmented target; bank labels of
the student entries are the source labels (nearest-downsampled; void ones kept, as in the code: they are negatives
to every anchor) outside the box and the teacher's argmax inside. Our design in it: one box per frame (the code
draws one per batch), crop padding never an anchor or a bank entry.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from segadapt.adapt.augment import mix
from segadapt.adapt.methods.base import Component, RunContext, Step

from segadapt.adapt.methods.heads import ProjectionHead, ema_, labels_at, momentum_copy, real_cells

__all__ = ["RCCR", "MemoryBank", "cutmix_boxes", "info_nce", "ramp_weight"]


def cutmix_boxes(n: int, grid: Tuple[int, int], device="cpu") -> torch.Tensor:
    """RCCR's CutMix boxes on a (h, w) grid (the authors' code, its first step): per frame an area ratio r ~ U(0, 1)
    (Beta(1, 1)), sides floor(sqrt(r) * side) (at least 1 cell), a uniform position (global torch RNG).

    Returns:
        (n, h, w) bool, True inside each frame's box.
    """
    h, w = grid
    r = torch.rand(n).sqrt()
    bh, bw = (r * h).floor().clamp(1, h).long(), (r * w).floor().clamp(1, w).long()
    y0 = (torch.rand(n) * (h - bh + 1)).floor().long()
    x0 = (torch.rand(n) * (w - bw + 1)).floor().long()
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    box = ((ys >= y0[:, None, None]) & (ys < (y0 + bh)[:, None, None]) &
           (xs >= x0[:, None, None]) & (xs < (x0 + bw)[:, None, None]))
    return box.to(device)


def ramp_weight(weight: float, step: int, steps: int, ramp: bool = True) -> float:
    """RCCR's weight ramp ``w exp(-5 (1 - sqrt(t / T)))`` (the authors' code); ``w`` when ``ramp`` is off."""
    if not ramp:
        return weight
    t = min(max(step, 0) / max(steps, 1), 1.0)
    return weight * math.exp(-5.0 * (1.0 - math.sqrt(t)))


class MemoryBank:
    """FIFO ring buffer of detached (N, E) embeddings and their int64 labels (RCCR's memory bank).

    ``push`` overwrites the oldest entries once ``size`` are held; ``features``/``labels`` return copies of the held
    entries.
    """

    def __init__(self, size: int, dim: int, device="cpu"):
        self.size = int(size)
        self.feats = torch.zeros(self.size, dim, device=device)
        self.labs = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr, self.count = 0, 0

    def push(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Append (n, E) float embeddings and (n,) labels (detached); with n > size only the last size are kept."""
        feats, labels = feats.detach()[-self.size:], labels.detach()[-self.size:]
        n = feats.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.feats.device)) % self.size
        self.feats[idx] = feats.to(self.feats)
        self.labs[idx] = labels.to(self.labs)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    @property
    def features(self) -> torch.Tensor:
        """(count, E) copy of the held embeddings (a copy: the loss graph keeps it while the bank moves on)."""
        return self.feats[:self.count].clone()

    @property
    def labels(self) -> torch.Tensor:
        return self.labs[:self.count].clone()

    def to(self, device) -> "MemoryBank":
        self.feats, self.labs = self.feats.to(device), self.labs.to(device)
        return self

    def state_dict(self) -> dict:
        return {"feats": self.feats.clone(), "labels": self.labs.clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, st: dict) -> None:
        self.feats.copy_(st["feats"])
        self.labs.copy_(st["labels"])
        self.ptr, self.count = int(st["ptr"]), int(st["count"])


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, anchor_labels: torch.Tensor, bank_feats: torch.Tensor,
             bank_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-anchor InfoNCE with one positive and the class-filtered bank as negatives (RCCR's loss, as in its code).

    Args:
        anchors, positives: (N, E) unit vectors (positives detached); anchor_labels: (N,) int64.
        bank_feats: (M, E) unit vectors; bank_labels: (M,) int64. Entries with the anchor's label are not negatives.

    Returns:
        (N,) float losses ``-log(exp(s+/t) / (exp(s+/t) + sum exp(s-/t)))`` (0 for an anchor without negatives).
    """
    s_pos = (anchors * positives).sum(1, keepdim=True) / temperature
    s_neg = anchors @ bank_feats.t() / temperature
    s_neg = s_neg.masked_fill(bank_labels[None, :] == anchor_labels[:, None], float("-inf"))
    logits = torch.cat([s_pos, s_neg], 1)
    return torch.logsumexp(logits, 1) - s_pos[:, 0]


class RCCR(Component):
    """The RCCR component (module docstring): the projection head trains with the student (the head's learning
    rate), its momentum copy follows it at the EMA teacher's momentum after each step; :meth:`loss` also pushes the
    step's embeddings into the memory bank after computing the loss (negatives from the next step on)."""

    name = "rccr"

    @staticmethod
    def enabled(cfg) -> bool:
        return cfg.rccr.enabled

    def __init__(self, cfg):
        self.adapt_cfg, self.cfg = cfg, cfg.rccr
        self.uda = bool(cfg.source_data)

    def setup(self, run: RunContext) -> None:
        cfg = self.cfg
        self.momentum = run.teacher.alpha
        self.head = ProjectionHead(run.teacher.model.feature_channels, cfg.proj_dim, cfg.proj_hidden).to(run.device)
        self.head_t = momentum_copy(self.head)
        self.bank = MemoryBank(cfg.bank_size, cfg.proj_dim, run.device)

    def param_groups(self) -> list:
        a = self.adapt_cfg
        return [{"params": list(self.head.parameters()), "lr": a.learning_rate() * a.head_lr_mult,
                 "weight_decay": a.weight_decay}]

    def _targets(self, s: Step, hw: Tuple[int, int]):
        """Teacher embeddings (B, E, h, w), label and confidence (B, h, w) of the weak view; positives, labels and
        confidence mixed like the strong view; (B, h, w) bool cells that may be anchors (no crop padding in them);
        (B, h, w) bool real (padding-free) cells of the weak and of the strong view."""
        with torch.no_grad():
            e_t = self.head_t(s.view.features.float())
            conf, lab = torch.softmax(s.view.logits.float(), 1).max(1)
            real = real_cells(s.view.valid, hw, lab)[:, None]
            if s.strong.mix_masks is None:
                return e_t, lab, e_t, lab, conf, real[:, 0], real[:, 0], real[:, 0]
            m = F.adaptive_avg_pool2d(s.strong.mix_masks.float(), hw)  # (B, 1, h, w) share pasted
            pure = (m < 1e-6) | (m > 1 - 1e-6)
            mr = (m > 0.5).float()
            real_s = mix(real, mr)[:, 0]
            region = pure[:, 0] & real_s
            if self.cfg.anchors == "pasted":
                region &= mr[:, 0] > 0
            return e_t, lab, mix(e_t, mr), mix(lab, mr), mix(conf, mr), region, real[:, 0], real_s

    def loss(self, s: Step) -> dict:
        """``{"rccr": weighted InfoNCE over confident anchors}``; logs ``rccr_raw`` (unweighted), ``rccr_anchors``
        and ``rccr_weight``."""
        cfg = self.cfg
        if self.uda and s.source is not None:
            return self._loss_uda(s)
        e_s = self.head(s.student_features.float())  # (B, E, h, w)
        hw = tuple(e_s.shape[-2:])
        e_t, lab_t, e_pos, lab_m, conf_m, region, real, real_s = self._targets(s, hw)
        raw, n = self._anchored(e_s, e_pos, lab_m, region & (conf_m > cfg.confidence))
        r, rs = real.reshape(-1), real_s.reshape(-1)  # bank entries from real cells only
        self._enqueue(_flat(e_s.detach())[rs], lab_m.reshape(-1)[rs], _flat(e_t)[r], lab_t.reshape(-1)[r])
        return self._weighted(s, raw, n)

    def _anchored(self, e_s: torch.Tensor, e_pos: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        """(mean InfoNCE over at most ``max_anchors`` of the (B, h, w) ``valid`` cells, or 0 with a gradient path
        when there is none; the number of anchors)."""
        idx = valid.reshape(-1).nonzero()[:, 0]
        if idx.numel() > self.cfg.max_anchors:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:self.cfg.max_anchors]]
        if not idx.numel():
            return e_s.sum() * 0.0, 0
        return info_nce(_flat(e_s)[idx], _flat(e_pos)[idx], labels.reshape(-1)[idx], self.bank.features,
                        self.bank.labels, self.cfg.temperature).mean(), idx.numel()

    def _weighted(self, s: Step, raw: torch.Tensor, anchors: int) -> dict:
        w = ramp_weight(self.cfg.weight, s.index, s.steps, self.cfg.ramp)
        s.logs.update(rccr_raw=float(raw.detach()), rccr_anchors=int(anchors), rccr_weight=w)
        return {"rccr": w * raw}

    def _loss_uda(self, s: Step) -> dict:
        """The paper form (module docstring): the source-crop-with-target-box view, one more student pass."""
        cfg, src = self.cfg, s.source
        with torch.no_grad():
            e_t = self.head_t(s.view.features.float())  # (B, E, h, w)
            hw = tuple(e_t.shape[-2:])
            conf, lab_t = torch.softmax(s.view.logits.float(), 1).max(1)
            b, (hh, ww) = e_t.shape[0], src.target_image.shape[-2:]
            idx = torch.arange(b, device=e_t.device) % src.image.shape[0]
            box = F.interpolate(cutmix_boxes(b, hw, e_t.device)[:, None].float(), size=(hh, ww), mode="nearest")
            x_m = box * src.target_image + (1 - box) * src.image[idx]
            share = F.adaptive_avg_pool2d(box, hw)[:, 0]  # (B, h, w) share of each cell inside the box
            inside, outside = share > 1 - 1e-6, share < 1e-6
            real_t = real_cells(s.view.valid, hw, lab_t)
            real_src = real_cells(src.valid[idx], hw, lab_t)
            lab_m = torch.where(inside, lab_t, labels_at(src.labels[idx], hw))
            real_m = torch.where(inside, real_t, real_src) & (inside | outside)
        _, f_m = src.student_forward(src.prepare(x_m))
        e_s = self.head(f_m.float())  # (B, E, h, w)
        raw, n = self._anchored(e_s, e_t, lab_t, inside & real_t & (conf > cfg.confidence))
        rm, rt = real_m.reshape(-1), real_t.reshape(-1)
        self._enqueue(_flat(e_s.detach())[rm], lab_m.reshape(-1)[rm], _flat(e_t)[rt], lab_t.reshape(-1)[rt])
        return self._weighted(s, raw, n)

    def _enqueue(self, fs, ls, ft, lt) -> None:
        """Random ``bank_samples`` of the student's and of the teacher's embeddings of this step into the bank."""
        n = self.cfg.bank_samples
        for f, lab in ((fs, ls), (ft, lt)):
            pick = torch.randperm(f.shape[0], device=f.device)[:n]
            self.bank.push(f[pick], lab[pick])

    def after_update(self) -> None:
        ema_(self.head_t, self.head, self.momentum)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "head_t": self.head_t.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_t.load_state_dict(state["head_t"])
        self.bank.load_state_dict(state["bank"])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, E, h, w) -> (B h w, E)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
