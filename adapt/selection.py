"""Picking the adapted model without labels, and the verdict against the source model.

After training, every candidate (the source model, AdaBN blends, the run's saves) has been scored by the validators
(:mod:`segadapt.adapt.selection_scores`). A *rule* maps those scores to one candidate; the *verdict* says whether
that candidate is expected to be better than the source model: ``better``, ``no better`` or ``uncertain``, from a
bootstrap interval over the frames of MixVal's ICE_intra difference (:func:`verdict`). Candidates are given as
``{name: {validator: value, ...}}``; names are ``source``, ``adabn_<blend>`` and ``step_<NNNNNN>`` (a save; the
highest step is the run's last).

Rules (``RULES``):

- ``last``: the last save (what ``--select last`` keeps); ``source``: the source model; ``reference``: AdaBN at the
  run's blend;
- ``max:<validator>``: the candidate with the best value of one validator (direction from
  :data:`~segadapt.adapt.validators.HIGHER_IS_BETTER`);
- ``mixval``: MixVal's rank combination (Hu et al., NeurIPS 2023): the sum of each candidate's ranks by
  ICE_intra and by ICE_inter, the highest sum wins;
- ``guard:<validator>``: the last save unless the validator finds it worse than the reference (AdaBN at the run's
  blend), then the best of the candidates that did not self-train (our design); ``guard:mixval_intra`` is the
  product's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from segadapt.adapt.validators import HIGHER_IS_BETTER

__all__ = ["Pick", "RULES", "Verdict", "average_ranks", "intra_interval", "last_save", "pick", "signed_scores",
           "verdict"]

_SCORED = ("entropy", "im", "snd", "mixval_intra", "mixval_inter", "agreement", "drift")
#: bootstrap resamples of the frames behind the verdict's interval
RESAMPLES = 2000
RULES: List[str] = (["last", "source", "reference", "mixval"] + [f"max:{v}" for v in _SCORED]
                    + [f"guard:{v}" for v in ("entropy", "im", "snd", "mixval_intra", "mixval_inter", "mixval")])


@dataclass
class Pick:
    """The rule's choice: the candidate's ``name``, the ``rule`` and the ``validator`` it compared on (None for
    ``last``/``source``/``reference``)."""

    name: str
    rule: str
    validator: str | None = None


@dataclass
class Verdict:
    """``verdict``: ``better``, ``no better`` or ``uncertain``; ``margin``: MixVal's ICE_intra of the pick minus the
    source model's (accuracy in [-1, 1]; + favours the pick); ``reason``: one sentence for the user; ``interval``:
    the bootstrap interval of ``margin`` (None when not computed)."""

    verdict: str
    margin: float
    reason: str
    interval: Optional[Tuple[float, float]] = None


def last_save(cands: Dict[str, dict]) -> str:
    """The save with the highest step.

    Raises:
        ValueError: no ``step_*`` candidate."""
    saves = sorted(n for n in cands if n.startswith("step_"))
    if not saves:
        raise ValueError("no saves among the candidates")
    return saves[-1]


def signed_scores(cands: Dict[str, dict], v: str) -> Dict[str, float]:
    """{name: value of ``v``, signed so that higher is better}, NaN values left out; ``v = "mixval"``: MixVal's rank
    sum divided by its maximum, 2 (N - 1), in [0, 1]."""
    if v == "mixval":
        r = _mixval_ranks(cands)
        return {n: x / max(1, 2 * (len(r) - 1)) for n, x in r.items()}
    s = 1.0 if HIGHER_IS_BETTER[v] else -1.0
    return {n: s * c[v] for n, c in cands.items() if v in c and not np.isnan(c[v])}


def _reference(cands: Dict[str, dict]) -> str:
    """The reference candidate: the one with agreement 1 (AdaBN at the run's blend), else ``source``."""
    return next((n for n, c in cands.items() if c.get("agreement") == 1.0 and n != "source"), "source")


def average_ranks(x) -> np.ndarray:
    """Ranks 0..n-1 of ``x`` (ascending), tied values sharing their mean rank; NaN ranks lowest (tied)."""
    x = np.nan_to_num(np.asarray(x, float), nan=-np.inf)
    order = x.argsort(kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        same = x == v
        r[same] = r[same].mean()
    return r


def _mixval_ranks(cands: Dict[str, dict]) -> Dict[str, float]:
    """{name: rank by ICE_intra + rank by ICE_inter} (ties share their mean rank, NaN lowest)."""
    names = list(cands)
    total = np.zeros(len(names))
    for v in ("mixval_intra", "mixval_inter"):
        total += average_ranks([cands[n].get(v, np.nan) for n in names])
    return dict(zip(names, total.tolist()))


def pick(cands: Dict[str, dict], rule: str) -> Pick:
    """The candidate ``rule`` picks (module docstring).

    Raises:
        ValueError: an unknown rule, or a rule that needs a save when there is none."""
    if rule == "last":
        return Pick(last_save(cands), rule)
    if rule == "source":
        return Pick("source", rule)
    if rule == "reference":
        return Pick(_reference(cands), rule)
    if rule == "mixval":
        r = _mixval_ranks(cands)  # a tie with the source model keeps the source model: no evidence for a change
        return Pick(max(r, key=lambda n: (r[n], n == "source")), rule, "mixval")
    kind, _, v = rule.partition(":")
    if v not in (*HIGHER_IS_BETTER, "mixval") or kind not in ("max", "guard"):
        raise ValueError(f"unknown selection rule {rule!r} (one of: {', '.join(RULES)})")
    s = signed_scores(cands, v)
    if kind == "max":
        return Pick(max(s, key=s.get), rule, v)
    last, ref = last_save(cands), _reference(cands)
    if s.get(last, -np.inf) >= s.get(ref, -np.inf):
        return Pick(last, rule, v)
    untrained = {n: x for n, x in s.items() if not n.startswith("step_")}
    return Pick(max(untrained, key=untrained.get), rule, v)


def intra_interval(pick_counts, source_counts, confidence: float = 0.8, resamples: int = RESAMPLES,
                   seed: int = 0) -> Tuple[float, float, float]:
    """ICE_intra of the pick minus the source model's, and its two-sided ``confidence`` interval from a paired
    bootstrap over the frames (Efron and Tibshirani, 1993, ch. 13: the same resampled frames for both models).

    Args:
        pick_counts, source_counts: per frame [correct, total] intra pixel counts, (N, 2) ints each (the
            ``mixval_intra_counts`` of :func:`~segadapt.adapt.selection_scores.score_model`).
        confidence: interval coverage in (0, 1).
        resamples: bootstrap resamples; ``seed`` seeds them (the verdict is reproducible).

    Returns:
        (difference, low, high), in ICE_intra units (accuracy in [-1, 1]).

    Raises:
        ValueError: counts of different shapes, not (N, 2), or N = 0.
    """
    a, b = np.asarray(pick_counts, dtype=float), np.asarray(source_counts, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2 or not len(a):
        raise ValueError(f"per-frame counts must both be (N, 2) with N >= 1, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))

    def ice(c, rows):
        return c[rows, 0].sum(-1) / np.maximum(c[rows, 1].sum(-1), 1.0)

    whole = np.arange(len(a))
    d = ice(a, idx) - ice(b, idx)
    q = (1.0 - confidence) / 2.0
    return float(ice(a, whole) - ice(b, whole)), float(np.quantile(d, q)), float(np.quantile(d, 1.0 - q))


def verdict(cands: Dict[str, dict], p: Pick, confidence: float = 0.8, seed: int = 0) -> Verdict:
    """Whether the pick is expected to be better than the source model, whichever rule picked it: by MixVal's
    ICE_intra (Hu et al., NeurIPS 2023, sec. 3) of the pick minus the source model's, with a paired bootstrap
    interval over the scored frames (:func:`intra_interval`). ``better``: the interval lies above 0; ``no better``:
    it lies below 0, or the pick is the source model; ``uncertain``: it contains 0, or the per-frame counts are
    missing. A few frames, or a pick that differs little from the source model, give ``uncertain``: the frames
    cannot tell the two apart.

    Args:
        cands: {name: scores}; the pick's and ``source``'s scores need ``mixval_intra_counts`` ((N, 2) ints).
        p: the rule's pick; ``confidence``: interval coverage in (0, 1); ``seed``: the resampling's seed.

    Returns:
        a :class:`Verdict` (``margin`` in ICE_intra units, NaN without counts).

    Raises:
        ValueError: the two models' counts have different shapes (scored on different frames)."""
    if p.name == "source":
        return Verdict("no better", 0.0, "the source model scored best: adaptation is not expected to help here")
    a = cands.get(p.name, {}).get("mixval_intra_counts")
    b = cands.get("source", {}).get("mixval_intra_counts")
    if a is None or b is None:
        return Verdict("uncertain", float("nan"), "no per-frame MixVal counts to compare the pick with the source "
                                                  "model")
    d, lo, hi = intra_interval(a, b, confidence, seed=seed)
    what = (f"{p.name}'s MixVal intra-class accuracy is {d:+.3f} against the source model's "
            f"({confidence:.0%} interval over the frames {lo:+.3f} to {hi:+.3f})")
    if lo > 0:
        return Verdict("better", d, what, (lo, hi))
    if hi < 0:
        return Verdict("no better", d, what, (lo, hi))
    return Verdict("uncertain", d, what + ": the frames cannot tell the two apart", (lo, hi))
