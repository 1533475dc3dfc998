"""BiDA: bi-directional pixel-prototype contrast (Lee et al., ECCV 2022), source-free and UDA forms.

The paper pulls target pixel features toward the *source* prototype of their class and source pixel features toward
the *target* prototypes, transfers labels to target pixels from the nearest source prototype, and calibrates
class-wise domain biases of the prototypes. The authors' code (cvlab-yonsei/DASS) has no calibration, no momentum
prototypes and leaves the label transfer unused, so this component is built from the paper's text; every detail
below is our design, not the paper's (see docs/method-notes.md, BiDA):

* Embeddings: a projection head on the decoder features (1x1 conv, ReLU, 1x1 conv, L2-norm); the teacher embeds with
  an EMA copy of it (momentum head).
* Source side (source-free): the source model as adaptation starts (after AdaBN) provides *source samples* in its
  decoder-feature space, ``source_prototypes="features"``: up to ``source_per_class`` of its confident (max softmax >=
  ``source_confidence``) decoder features per class on ``source_frames`` target frames; ``"classifier"``: its
  classifier's weight rows, rescaled to the features' mean norm, one per class. Each step the momentum head
  embeds them; P^s_c = normalised mean of the class's embeddings.
* Target prototypes P^t_c: EMA (``proto_momentum``) of the mean teacher embedding under the kept pseudo-labels.
* Calibration: b_c <- m b_c + (1 - m)(mean teacher embedding under the label-transfer label c - P^s_c); the
  calibrated prototype is normalise(P^s_c + b_c).
* Label transfer (:meth:`BiDA.vote`): the nearest calibrated prototype of the teacher's embedding; the loop drops
  pseudo-label pixels where it names another class (classes without a source prototype are not judged).
* Loss: CE over [z_student . P^s / t] with the strong view's pseudo-labels (target -> source prototypes) +
  ``reverse_weight`` CE over [head(source samples) . P^t / t] with their classes (source -> target prototypes; the
  gradient reaches the projection head only, the samples are stored features). Classes without a prototype on the
  other side are left out of the logits and the labels.

UDA form (``--source-data``, :mod:`segadapt.adapt.methods.uda`; as in the paper, with source labels):

* Source prototypes P^s_c: EMA (``proto_momentum``) of the mean momentum-head embedding of the EMA teacher's decoder
  features on the step's source frames under their labels (nearest-downsampled; void skipped), updated at the start
  of each step (before the vote, so that step 0 has prototypes; teacher features, as for P^t: our design); no pass over
  target frames, no stored source samples.
* Source -> target-prototype term: CE over [head(student features on the source frames) . P^t / t] with the source
  labels: the gradient reaches the student (the paper's T->S term), not only the head.
* Target -> source-prototype term: on the strong view's target pixels only (DACS-pasted source pixels left out).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from segadapt.adapt.data.target import normalised_batches
from segadapt.adapt.methods.base import Component, PseudoLabels, RunContext, Step

from segadapt.adapt.methods.heads import ProjectionHead, ema_, labels_at, momentum_copy, real_cells

__all__ = ["BiDA", "class_means", "prototype_logits"]

_ABSENT = -1e4  # logit of a class without a prototype (exp underflows to 0; finite, so interpolation stays finite)


def class_means(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of (N, E) embeddings under (N,) int64 labels (labels outside [0, K) are skipped).

    Returns:
        ((K, E) float means, zero for absent classes; (K,) float counts).
    """
    ok = (labels >= 0) & (labels < num_classes)
    emb, labels = emb[ok].float(), labels[ok]
    sums = torch.zeros(num_classes, emb.shape[1], device=emb.device).index_add_(0, labels, emb)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return sums / counts.clamp(min=1)[:, None], counts


def prototype_logits(z: torch.Tensor, protos: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine logits of (B, E, h, w) unit embeddings against (K, E) unit prototypes, divided by ``temperature``;
    classes with ``valid`` False get a large negative logit. Returns (B, K, h, w) float."""
    out = torch.einsum("behw,ke->bkhw", z, protos) / temperature
    return out.masked_fill(~valid[None, :, None, None], _ABSENT)


class BiDA(Component):
    """The BiDA component (module docstring). The projection head trains with the student (the head's learning
    rate); its momentum copy follows at the EMA teacher's momentum.

    Args:
        cfg: the run's :class:`~segadapt.adapt.config.AdaptConfig` (``bida`` section; ``source_data`` = UDA form).
    """

    name = "bida"

    @staticmethod
    def enabled(cfg) -> bool:
        return cfg.bida.enabled

    def __init__(self, cfg):
        self.adapt_cfg, self.cfg, self.uda = cfg, cfg.bida, bool(cfg.source_data)
        self.momentum = 0.999

    def setup(self, run: RunContext) -> None:
        """Heads, prototypes and bias; in a fresh source-free run the source samples from the source model after
        AdaBN on ``bida.source_frames`` target frames."""
        cfg, k, d = self.cfg, run.num_classes, run.teacher.model.feature_channels
        self.K, self.momentum, self.ignore = k, run.teacher.alpha, run.ignore_index
        self.head = ProjectionHead(d, cfg.proj_dim, cfg.proj_hidden).to(run.device)
        self.head_t = momentum_copy(self.head)
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=run.device)  # noqa: E731
        self.proto_s, self.valid_s = zeros(k, cfg.proj_dim), zeros(k, dtype=torch.bool)  # UDA form: P^s
        self._observed: Optional[int] = None  # UDA form: the step whose source batch P^s has seen
        self.src_feats, self.src_labels = zeros(0, d), zeros(0, dtype=torch.long)  # source samples (Ns, D)
        self.proto_t, self.valid_t = zeros(k, cfg.proj_dim), zeros(k, dtype=torch.bool)  # target prototypes
        self.bias = zeros(k, cfg.proj_dim)  # (K, E) calibration bias
        self._pending: Optional[tuple] = None
        if run.fresh and not self.uda:
            self.init_source(run.source_model(), normalised_batches(run.frames(), run.mean, run.std, run.device,
                                                                    cfg.source_frames))

    def param_groups(self) -> list:
        a = self.adapt_cfg
        return [{"params": list(self.head.parameters()), "lr": a.learning_rate() * a.head_lr_mult,
                 "weight_decay": a.weight_decay}]

    # ---- source side -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_source(self, model, batches: Iterable[torch.Tensor]) -> None:
        """Collect the source samples from ``model`` (the source model after AdaBN; ``forward_features`` in eval
        mode, restored afterwards) on normalised (B, 3, H, W) target batches.

        Raises:
            ValueError: the source model is confident on no pixel (no source prototypes).
        """
        cfg, dev = self.cfg, self.src_feats.device
        was = model.training
        model.eval()
        feats, labs, norms = [], [], []
        try:
            for x in batches:
                logits, f = model.forward_features(x.to(dev))
                conf, lab = torch.softmax(logits.float(), 1).max(1)
                keep = (conf >= cfg.source_confidence).reshape(-1)
                f = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                feats.append(f[keep])
                labs.append(lab.reshape(-1)[keep])
                norms.append(f.norm(dim=1))
        finally:
            model.train(was)
        f, lab = torch.cat(feats), torch.cat(labs)
        if cfg.source_prototypes == "classifier":  # weight rows at the features' mean norm, one sample per class
            w = classifier_weight(model).float().to(dev)  # (K, D)
            self.src_feats = F.normalize(w, dim=1) * torch.cat(norms).mean()
            self.src_labels = torch.arange(self.K, device=dev)
            return
        if not f.shape[0]:
            raise ValueError(f"BiDA: the source model reaches --bida.source-confidence {cfg.source_confidence} on no "
                             "pixel of the target frames; lower it (or use --bida.source-prototypes classifier)")
        pick = []
        for c in range(self.K):
            idx = (lab == c).nonzero()[:, 0]
            pick.append(idx[torch.randperm(idx.numel(), device=dev)[:cfg.source_per_class]])
        idx = torch.cat(pick)
        self.src_feats, self.src_labels = f[idx], lab[idx]

    def source_prototypes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """((K, E) unit source prototypes under the momentum head, (K,) bool valid), no grad."""
        if self.uda:
            return self.proto_s, self.valid_s
        with torch.no_grad():
            z = self.head_t(self.src_feats[:, :, None, None])[:, :, 0, 0]
            means, counts = class_means(z, self.src_labels, self.K)
        return F.normalize(means, dim=1), counts > 0

    # ---- label transfer ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def transfer(self, s: Step) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher embeddings (B, E, h, w), label-transfer logits (B, K, h, w) against the calibrated source
        prototypes, the (K, E) source prototypes and their (K,) validity."""
        z_t = self.head_t(s.view.features.float())
        p_s, valid_s = self.source_prototypes()
        cal = F.normalize(p_s + self.bias, dim=1)
        return z_t, prototype_logits(z_t, cal, valid_s, self.cfg.temperature), p_s, valid_s

    def refine(self, s: Step, pl: PseudoLabels) -> PseudoLabels:
        """Label transfer as a veto: drop the pixels whose pseudo-label names a class with a source prototype while
        the nearest calibrated prototype (logits upsampled to the input size) names another (from ``vote_start``,
        with ``vote``); logs ``bida_vetoed``, the share of real pixels dropped."""
        self.observe_source(s)
        if not self.cfg.vote or s.index < self.cfg.vote_start:
            return pl
        with torch.no_grad():
            _, logits, _, valid_s = self.transfer(s)
            nearest = F.interpolate(logits, size=tuple(pl.labels.shape[-2:]), mode="bilinear",
                                    align_corners=False).argmax(1)
        lab = pl.labels
        judged = (lab != self.ignore) & valid_s[lab.clamp(0, self.K - 1)]
        mask = pl.mask & (~judged | (nearest == lab))
        real = pl.valid if pl.valid is not None else torch.ones_like(mask)
        s.logs["bida_vetoed"] = float((pl.mask & ~mask & real).sum()) / max(1, int(real.sum()))
        labels = torch.where(mask, lab, torch.full_like(lab, self.ignore))
        return PseudoLabels(labels, mask, pl.weights * mask.float(), pl.threshold, pl.valid)

    # ---- loss and EMA ------------------------------------------------------------------------------------------
    def loss(self, s: Step) -> dict:
        """``{"bida": weight * (L_t->s + reverse_weight * L_s->t)}``; logs ``bida_ts``, ``bida_st`` (unweighted)."""
        cfg = self.cfg
        self.observe_source(s)
        z_s = self.head(s.student_features.float())  # (B, E, h, w)
        hw = tuple(z_s.shape[-2:])
        with torch.no_grad():
            z_t, tl, p_s, valid_s = self.transfer(s)
        lab = labels_at(s.strong.labels, hw)
        kept = labels_at((s.strong.weights > 0).long(), hw).bool() & (lab != self.ignore)
        if self.uda and s.source is not None and s.source.paste_masks is not None:  # target pixels only
            kept &= labels_at(s.source.paste_masks[:, 0].long(), hw) == 0
        lab = torch.where(kept & valid_s[lab.clamp(0, self.K - 1)], lab, torch.full_like(lab, -100))
        logits = prototype_logits(z_s, p_s, valid_s, cfg.temperature)
        l_ts = F.cross_entropy(logits, lab, ignore_index=-100) if (lab >= 0).any() else z_s.sum() * 0.0
        l_st = z_s.sum() * 0.0
        if self.uda:
            l_st = self._source_to_target(s, l_st)
        elif self.valid_t.any() and self.src_feats.shape[0]:
            z_src = self.head(self.src_feats[:, :, None, None])[:, :, 0, 0]
            ok = self.valid_t[self.src_labels]
            if ok.any():
                lg = prototype_logits(z_src[ok][:, :, None, None], self.proto_t, self.valid_t, cfg.temperature)
                l_st = F.cross_entropy(lg[:, :, 0, 0], self.src_labels[ok])
        self._stash(s, z_t, tl, p_s)
        s.logs.update(bida_ts=float(l_ts.detach()), bida_st=float(l_st.detach()))
        return {"bida": cfg.weight * (l_ts + cfg.reverse_weight * l_st)}

    def _source_to_target(self, s: Step, zero: torch.Tensor) -> torch.Tensor:
        """UDA form: CE over [head(student source features) . P^t / t] with the source labels (classes without a
        target prototype and void left out); ``zero`` when nothing is left."""
        src = s.source
        if src is None or src.features is None or not self.valid_t.any():
            return zero
        z = self.head(src.features.float())  # (Bs, E, h, w)
        lab = labels_at(src.labels, tuple(z.shape[-2:]))
        ok = (lab >= 0) & (lab < self.K)
        ok &= self.valid_t[lab.clamp(0, self.K - 1)]
        if not ok.any():
            return zero
        lab = torch.where(ok, lab, torch.full_like(lab, -100))
        return F.cross_entropy(prototype_logits(z, self.proto_t, self.valid_t, self.cfg.temperature), lab,
                               ignore_index=-100)

    @torch.no_grad()
    def observe_source(self, s: Step) -> None:
        """UDA form: update P^s from the step's source batch (EMA of the momentum-head embeddings of the teacher's
        decoder features under the source labels), once per step; a no-op in the source-free form."""
        if not self.uda or s.source is None or self._observed == s.index:
            return
        self._observed = s.index
        src = s.source
        _, f = src.teacher_forward(src.normalize(src.image))
        z = self.head_t(f.float())
        lab = labels_at(src.labels, tuple(z.shape[-2:])).reshape(-1)
        means, counts = class_means(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), lab, self.K)
        seen, new, m = counts > 0, F.normalize(means, dim=1), self.cfg.proto_momentum
        upd = torch.where(self.valid_s[:, None], F.normalize(m * self.proto_s + (1 - m) * new, dim=1), new)
        self.proto_s = torch.where(seen[:, None], upd, self.proto_s)
        self.valid_s = self.valid_s | seen

    @torch.no_grad()
    def _stash(self, s: Step, z_t, transfer_logits, p_s) -> None:
        """This batch's class means for :meth:`after_update`: teacher embeddings under the final pseudo-labels
        (target prototypes) and under the label-transfer labels of the real cells (calibration; crop padding left
        out)."""
        hw = tuple(z_t.shape[-2:])
        flat = z_t.permute(0, 2, 3, 1).reshape(-1, z_t.shape[1])
        lab = labels_at(s.labels.labels, hw).reshape(-1)
        lab = torch.where(lab == self.ignore, torch.full_like(lab, -1), lab)
        m_pl, n_pl = class_means(flat, lab, self.K)
        real = real_cells(s.view.valid, hw, z_t[:, 0]).reshape(-1)
        tr = torch.where(real, transfer_logits.argmax(1).reshape(-1), torch.full_like(lab, -1))
        m_tr, n_tr = class_means(flat, tr, self.K)
        self._pending = (m_pl, n_pl > 0, m_tr, n_tr > 0, p_s)

    @torch.no_grad()
    def after_update(self) -> None:
        """Momentum head EMA; target prototypes and calibration bias from the stashed batch means."""
        ema_(self.head_t, self.head, self.momentum)
        if self._pending is None:
            return
        m_pl, seen, m_tr, seen_tr, p_s = self._pending
        self._pending = None
        m = self.cfg.proto_momentum
        new = F.normalize(m_pl, dim=1)
        upd = torch.where(self.valid_t[:, None], F.normalize(m * self.proto_t + (1 - m) * new, dim=1), new)
        self.proto_t = torch.where(seen[:, None], upd, self.proto_t)
        self.valid_t = self.valid_t | seen
        mb = self.cfg.calibration_momentum
        self.bias = torch.where(seen_tr[:, None], mb * self.bias + (1 - mb) * (m_tr - p_s), self.bias)

    def state_dict(self) -> dict:
        st = {"head": self.head.state_dict(), "head_t": self.head_t.state_dict(), "src_feats": self.src_feats,
              "src_labels": self.src_labels, "proto_t": self.proto_t, "valid_t": self.valid_t, "bias": self.bias}
        if self.uda:
            st.update(proto_s=self.proto_s, valid_s=self.valid_s)
        return st

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_t.load_state_dict(state["head_t"])
        dev = self.proto_t.device
        uda = ("proto_s", "valid_s") if self.uda else ()
        for k in ("src_feats", "src_labels", "proto_t", "valid_t", "bias") + uda:
            setattr(self, k, state[k].to(dev))


def classifier_weight(model) -> torch.Tensor:
    """(K, D) weight of a :class:`~segadapt.adapt.models.segmenter.Segmenter`'s final 1x1 classifier."""
    c = model._classifier
    conv = c if isinstance(c, torch.nn.Conv2d) else c.convolution
    return conv.weight.detach()[:, :, 0, 0]
