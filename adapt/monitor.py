"""Label-free monitor of an adaptation run, its plot and a stopping rule.

A user adapting to footage without labels cannot see whether a long run (the CLI's 1000 steps, the ``full``
preset's 3000) drifted. At each logged step (``--log-every``) the monitor reads only what the loop already computed
on the weak view -- the EMA teacher's probabilities, the frozen AdaBN anchor's when the run keeps one (it does when
a component or ``pseudo.anchor_weight`` reads it: no extra forward pass is made for the monitor), the pseudo-labels
and the mask of real (non-padding) pixels -- and records:

- ``coverage`` per class: share of valid pixels carrying each class's pseudo-label (the plot's first panel; the
  ``coverage`` field of ``coverage.jsonl`` is the loop's own, over all pixels of the crop);
- ``entropy``: mean per-pixel entropy of the teacher, divided by log K (0 = one-hot, 1 = uniform);
- ``anchor_agreement``: share of valid pixels where the teacher's and the anchor's argmax agree (None without an
  anchor);
- ``class_drift``: total-variation distance ``0.5 * sum_c |s_teacher(c) - s_ref(c)|`` between the teacher's
  predicted (argmax) class shares and the reference's: the anchor's on the same batch, or, without an anchor, the
  teacher's at the first logged step (``drift_reference`` says which; that reference differs in batch too, so its
  drift has a floor of batch-to-batch variation). In [0, 1].

The new ``coverage.jsonl`` keys are ``entropy``, ``anchor_agreement``, ``class_drift``, ``drift_reference`` and
``teacher_shares`` (K floats; a resumed run reads its monitor history back from them).

Relative entropy floor (our design, not from a paper: see docs/method-notes.md, Label-free monitor;
``monitor.entropy_floor``, off by default): the run also stops when the teacher's mean entropy over the last
``patience`` logged steps has fallen to that share of its mean over the first ones (:func:`entropy_floor_reason`;
measured 2026-12-02: docs/changelog.md). Like the rule below it acts only with
``monitor.stop``; both rules are then checked.

Stopping rule (our design, no paper proposes it: see docs/method-notes.md, Label-free monitor; thresholds not
calibrated, off by default): a logged step *violates* when ``class_drift > max_drift`` or (with an anchor)
``anchor_agreement < min_agreement``; with ``monitor.stop`` the run stops, saving its checkpoint, after ``patience``
consecutive violating logged steps, and ``summary.json`` records the reason. Rationale: self-training failure modes
on a target without labels show up as the teacher's class distribution collapsing toward a few classes (drift up,
entropy down) and as the teacher leaving the source model's decisions on most pixels (agreement down); the anchor is
the label-free reference already kept for the rectifier (see docs/method-notes.md, IR2F). Both rise and fall during
healthy adaptation too, which is why the thresholds are loose, need ``patience`` and are for the user to tune.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from segadapt.adapt.config import MonitorConfig
from segadapt.runtime.files import write_atomic

__all__ = ["LabelFreeMonitor", "MonitorConfig", "class_shares", "entropy_floor_reason", "mean_entropy", "stop_reason",
           "total_variation", "write_monitor_plot"]

#: the coverage.jsonl keys the monitor adds
RECORD_KEYS = ("entropy", "anchor_agreement", "class_drift", "drift_reference", "teacher_shares")


def _valid_mask(probs: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, W) bool: ``valid`` or all True."""
    if valid is None:
        return torch.ones_like(probs[:, 0], dtype=torch.bool)
    if valid.shape != probs[:, 0].shape:
        raise ValueError(f"valid mask has shape {tuple(valid.shape)}, expected {tuple(probs[:, 0].shape)}")
    return valid.bool()


def mean_entropy(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """Mean per-pixel entropy of (B, K, H, W) probabilities over the valid pixels, divided by log K: in [0, 1]
    (0 = one-hot everywhere, 1 = uniform). ``valid``: (B, H, W) bool or None (all pixels). NaN with no valid
    pixel."""
    k = probs.shape[1]
    p = probs.float().clamp_min(1e-12)
    ent = -(p * p.log()).sum(1) / math.log(k)  # (B, H, W)
    m = _valid_mask(probs, valid)
    return float(ent[m].mean()) if m.any() else float("nan")


def class_shares(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of the valid pixels whose argmax is each class: (K,) float32 on the CPU, summing to 1 (all 0 with no
    valid pixel). ``probs``: (B, K, H, W) probabilities or logits; ``valid``: (B, H, W) bool or None."""
    k = probs.shape[1]
    pred = probs.argmax(1)[_valid_mask(probs, valid)]
    counts = torch.bincount(pred.reshape(-1), minlength=k).float().cpu()
    return counts / max(1, pred.numel())


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance ``0.5 * sum |p - q|`` of two (K,) distributions: in [0, 1], 0 when equal."""
    return 0.5 * float((p.float().cpu() - q.float().cpu()).abs().sum())


@dataclass
class MonitorStep:
    """One logged step of the monitor (see the module docstring for each signal)."""

    step: int
    coverage: List[float]  # (K,) pseudo-label share per class, valid pixels
    entropy: float
    anchor_agreement: Optional[float]
    class_drift: float
    teacher_shares: List[float]  # (K,)


class LabelFreeMonitor:
    """The label-free signals of an adaptation run over its logged steps, and the stopping rule on them.

    Args:
        num_classes: K.
        ignore_index: the pseudo-labels' ignore value (rejected pixels).
        cfg: thresholds of the stopping rule (:class:`~segadapt.adapt.config.MonitorConfig`).
    """

    def __init__(self, num_classes: int, ignore_index: int, cfg: Optional[MonitorConfig] = None):
        self.K, self.ignore = num_classes, ignore_index
        self.cfg = cfg or MonitorConfig()
        self.history: List[MonitorStep] = []
        self.first_shares: Optional[torch.Tensor] = None  # reference without an anchor

    def update(self, teacher_probs: torch.Tensor, anchor_probs: Optional[torch.Tensor], labels: torch.Tensor,
               valid: Optional[torch.Tensor] = None, step: Optional[int] = None) -> Dict[str, object]:
        """Record one logged step; no labels are read, only the teacher's output.

        Args:
            teacher_probs: (B, K, H, W) float EMA-teacher probabilities on the weak view.
            anchor_probs: (B, K, H, W) float probabilities of the frozen AdaBN anchor on the same view, or None.
            labels: (B, H, W) int64 pseudo-labels (``ignore_index`` where rejected).
            valid: (B, H, W) bool, False on crop padding (excluded everywhere), or None (all pixels).
            step: the step number (default: one more than the last recorded).

        Returns:
            the new ``coverage.jsonl`` keys: ``entropy``, ``anchor_agreement`` (None without an anchor) and
            ``class_drift`` (floats), ``drift_reference`` ("anchor" or "first_step") and ``teacher_shares`` (K
            floats); values rounded to 4 decimals.

        Raises:
            ValueError: shapes that do not match (named).
        """
        if teacher_probs.dim() != 4 or teacher_probs.shape[1] != self.K:
            raise ValueError(f"teacher_probs: expected (B, {self.K}, H, W), got {tuple(teacher_probs.shape)}")
        m = _valid_mask(teacher_probs, valid)
        shares = class_shares(teacher_probs, m)
        agreement = None
        if anchor_probs is not None:
            if anchor_probs.shape != teacher_probs.shape:
                raise ValueError(f"anchor_probs: shape {tuple(anchor_probs.shape)} differs from the teacher's "
                                 f"{tuple(teacher_probs.shape)}")
            same = teacher_probs.argmax(1) == anchor_probs.argmax(1)
            agreement = float(same[m].float().mean()) if m.any() else float("nan")
            ref = class_shares(anchor_probs, m)
        else:
            if self.first_shares is None:
                self.first_shares = shares
            ref = self.first_shares
        lab = labels[m]
        lab = lab[lab != self.ignore]
        cov = torch.bincount(lab.reshape(-1), minlength=self.K).float().cpu() / max(1, int(m.sum()))
        rec = MonitorStep(step=int(step) if step is not None else (self.history[-1].step + 1 if self.history else 1),
                          coverage=[round(float(c), 4) for c in cov], entropy=round(mean_entropy(teacher_probs, m), 4),
                          anchor_agreement=None if agreement is None else round(agreement, 4),
                          class_drift=round(total_variation(shares, ref), 4),
                          teacher_shares=[round(float(s), 4) for s in shares])
        self.history.append(rec)
        return {"entropy": rec.entropy, "anchor_agreement": rec.anchor_agreement, "class_drift": rec.class_drift,
                "drift_reference": "anchor" if anchor_probs is not None else "first_step",
                "teacher_shares": rec.teacher_shares}

    def stop_reason(self) -> Optional[str]:
        """The stopping rule (module docstring) on the history so far: a one-line reason, or None to go on. It is
        evaluated whether or not ``cfg.stop`` is set; the loop acts on it only when it is."""
        return stop_reason(self.history, self.cfg)

    def load_log(self, path: str | Path) -> int:
        """Rebuild the history from a ``coverage.jsonl`` written by an earlier part of the run (``--resume``):
        records with the monitor's keys, in order; the first one's ``teacher_shares`` becomes the reference when
        there is no anchor. Returns the number of records read (0 when the file is missing)."""
        p = Path(path)
        if not p.is_file():
            return 0
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict) or "class_drift" not in r:
                continue
            shares = [float(v) for v in r.get("teacher_shares", [])]
            if self.first_shares is None and r.get("drift_reference") == "first_step" and len(shares) == self.K:
                self.first_shares = torch.tensor(shares)
            self.history.append(MonitorStep(int(r["step"]), list(r.get("coverage", {}).values()), r["entropy"],
                                            r.get("anchor_agreement"), r["class_drift"], shares))
        return len(self.history)

    def summary(self) -> dict:
        """The last logged step's signals and the rule's verdict, for ``summary.json``."""
        last = self.history[-1] if self.history else None
        return {"logged_steps": len(self.history), "stop_rule": self.stop_reason(),
                "last": None if last is None else {"step": last.step, "entropy": last.entropy,
                                                   "anchor_agreement": last.anchor_agreement,
                                                   "class_drift": last.class_drift}}


def _violation(s: MonitorStep, cfg: MonitorConfig) -> Optional[str]:
    if s.class_drift > cfg.max_drift:
        return f"class-share drift {s.class_drift:.3f} > {cfg.max_drift}"
    if s.anchor_agreement is not None and s.anchor_agreement < cfg.min_agreement:
        return f"teacher-anchor agreement {s.anchor_agreement:.3f} < {cfg.min_agreement}"
    return None


def entropy_floor_reason(history: Sequence[MonitorStep], cfg: MonitorConfig) -> Optional[str]:
    """The relative entropy floor (our rule, measured 2026-12-02: docs/changelog.md):
    a reason when the teacher's mean entropy over the last ``cfg.patience`` logged steps is at most
    ``cfg.entropy_floor`` times its mean over the first ``cfg.patience`` logged steps, else None (also when
    ``cfg.entropy_floor`` is 0 = off, or fewer than 2 x patience steps are logged). Relative, so that it does not
    depend on a domain's entropy level."""
    n = cfg.patience
    if cfg.entropy_floor <= 0 or len(history) < 2 * n:
        return None
    first = sum(s.entropy for s in history[:n]) / n
    last = sum(s.entropy for s in history[-n:]) / n
    if not last <= cfg.entropy_floor * first:  # also None when a window's entropy is NaN (a step without pixels)
        return None
    return (f"label-free stopping rule: teacher entropy {last:.4f} (mean of steps {history[-n].step}-"
            f"{history[-1].step}) <= {cfg.entropy_floor} x {first:.4f} (steps {history[0].step}-{history[n - 1].step})")


def stop_reason(history: Sequence[MonitorStep], cfg: MonitorConfig) -> Optional[str]:
    """The label-free stopping rule (our design, module docstring): a reason when each of the last ``cfg.patience``
    logged steps violates (drift above ``cfg.max_drift`` or anchor agreement below ``cfg.min_agreement``), or when
    the relative entropy floor is reached (:func:`entropy_floor_reason`, with ``cfg.entropy_floor`` > 0), else
    None."""
    n = cfg.patience
    floor = entropy_floor_reason(history, cfg)
    if floor is not None:
        return floor
    if len(history) < n:
        return None
    reasons = [_violation(s, cfg) for s in history[-n:]]
    if any(r is None for r in reasons):
        return None
    return (f"label-free stopping rule: {n} consecutive logged steps violated it (steps {history[-n].step}-"
            f"{history[-1].step}; last: {reasons[-1]})")


def write_monitor_plot(history: Sequence[MonitorStep], path: str | Path, class_names: Sequence[str],
                       log: Callable[[str], None] = print,
                       palette: Optional[Sequence[Sequence[int]]] = None) -> Optional[Path]:
    """Plot the four signals against the step into a PNG at ``path``, written atomically (matplotlib, Agg canvas,
    no pyplot state). Pseudo-label coverage per class (one line each, in the class's ``palette`` colour: RGB
    0-255 triples), teacher entropy, teacher-anchor agreement (a note when there is no anchor) and class-share
    drift.

    Returns:
        the path, or None when there is nothing to plot or matplotlib is missing (logged once per call, the run
        goes on: the plot is not worth losing a finished adaptation for).
    """
    if not history:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log("monitor.png skipped: matplotlib is not installed (pip install 'segadapt[adapt]')")
        return None
    steps = [s.step for s in history]
    unit = (-0.02, 1.02)  # signals in [0, 1]; a line at 0 or 1 stays visible
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2, sharex=True)
    for c, name in enumerate(class_names):
        color = tuple(v / 255 for v in palette[c]) if palette is not None and c < len(palette) else None
        ax[0, 0].plot(steps, [s.coverage[c] if c < len(s.coverage) else float("nan") for s in history], label=name,
                      color=color)
    ax[0, 0].set(title="pseudo-label coverage per class", ylabel="share of pixels")
    ax[0, 0].legend(fontsize=6, ncol=2)
    ax[0, 1].plot(steps, [s.entropy for s in history], color="tab:purple")
    ax[0, 1].set(title="teacher entropy / log K", ylim=unit)
    agree = [s.anchor_agreement for s in history]
    if any(a is not None for a in agree):
        ax[1, 0].plot(steps, [float("nan") if a is None else a for a in agree], color="tab:green")
    else:
        ax[1, 0].text(0.5, 0.5, "no anchor in this run", ha="center", va="center", transform=ax[1, 0].transAxes)
    ax[1, 0].set(title="teacher-anchor argmax agreement", xlabel="step", ylim=unit)
    ax[1, 1].plot(steps, [s.class_drift for s in history], color="tab:red")
    ax[1, 1].set(title="class-share drift (total variation)", xlabel="step", ylim=unit)
    ax[1, 1].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all four panels
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    p = Path(path)
    write_atomic(p, buf.getvalue())
    return p
