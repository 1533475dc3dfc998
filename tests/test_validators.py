"""Label-free validators on hand-built predictions, the candidate scoring on a real tiny model, and the rules."""

import math

import pytest
import torch

from segadapt.adapt import validators as V
from segadapt.adapt.selection import RULES, last_save, pick, signed_scores, verdict


def one_hot_probs(labels: torch.Tensor, k: int, sharp: float = 0.97) -> torch.Tensor:
    """(B, K, H, W) probabilities with ``sharp`` on each pixel's label and the rest spread evenly."""
    p = torch.full((labels.shape[0], k, *labels.shape[1:]), (1 - sharp) / (k - 1))
    return p.scatter_(1, labels[:, None], sharp)


@pytest.fixture
def truth():
    g = torch.Generator().manual_seed(0)
    lab = torch.zeros(2, 16, 16, dtype=torch.long)  # four class blocks per frame, varied per frame
    lab[:, :8, 8:], lab[:, 8:, :8], lab[:, 8:, 8:] = 1, 2, 3
    lab[1] = (lab[1] + 1) % 4
    noise = torch.randint(0, 4, lab.shape, generator=g)
    return torch.where(torch.rand(lab.shape, generator=g) < 0.05, noise, lab)


def test_a_collapsed_model_scores_worse_than_a_sharp_diverse_one(truth):
    sharp = one_hot_probs(truth, 4)
    collapsed = one_hot_probs(torch.zeros_like(truth), 4)  # one class everywhere, just as confident
    uniform = torch.full_like(sharp, 0.25)
    assert V.information_maximization(sharp) > 0.7 > 0.0 >= V.information_maximization(collapsed) - 1e-6
    assert V.mean_entropy(sharp) < V.mean_entropy(uniform) == pytest.approx(1.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    scattered = torch.distributions.Dirichlet(torch.ones(4)).sample((2, 16, 16)).permute(0, 3, 1, 2)
    assert V.snd(sharp, generator=g()) > V.snd(scattered, generator=g())  # dense clusters beat scattered outputs
    # but SND is no collapse detector: one class everywhere is the densest neighbourhood there is (log(n - 1))
    assert V.snd(collapsed, generator=g()) == pytest.approx(math.log(2 * 16 * 16 - 1), rel=1e-4)
    # drift and agreement against the true map: the collapsed one moved the class shares and disagrees
    assert V.class_share_drift(sharp.argmax(1), truth, 4) < 0.05 < V.class_share_drift(collapsed.argmax(1), truth, 4)
    assert V.agreement(sharp.argmax(1), truth) == 1.0 and V.agreement(collapsed.argmax(1), truth) < 0.4


def test_padding_never_counts(truth):
    p = one_hot_probs(truth, 4)
    valid = torch.ones_like(truth, dtype=torch.bool)
    valid[:, :, 12:] = False  # a padded right border
    junk = p.clone()
    junk[:, :, :, 12:] = 0.25  # anything at all on the padding: here uniform, with argmax 0
    for f in (V.mean_entropy, V.information_maximization):
        assert f(p, valid) == pytest.approx(f(junk, valid))
        assert f(p) != pytest.approx(f(junk))  # and without the mask the padding would change it
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert V.snd(p, valid, pixels=50, generator=g()) == pytest.approx(V.snd(junk, valid, pixels=50, generator=g()))
    a, b = p.argmax(1), junk.argmax(1)
    assert V.agreement(a, b, valid) == 1.0 > V.agreement(a, b)
    assert V.class_share_drift(a, b, 4, valid) == 0.0 < V.class_share_drift(a, b, 4)
    with pytest.raises(ValueError, match="valid mask has shape"):
        V.mean_entropy(p, valid[:, :8])


def test_mixval_mixes_exactly_and_counts_intra_and_inter_pairs():
    a = torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)
    b = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    assert torch.equal(V.mix_frames(a, b), torch.full((1, 3, 2, 2), 0.55 * 200 + 0.45 * 100))
    with pytest.raises(ValueError):
        V.mix_frames(a, b, lam=0.4)  # b would dominate
    la = torch.tensor([[[0, 1], [2, 3]]])
    lb = torch.tensor([[[0, 1], [0, 0]]])  # same class on the top row (intra), different below (inter)
    pred = torch.tensor([[[0, 5], [2, 0]]])  # intra: 1 of 2 right; inter: 1 of 2 right (the pixel of b's class: no)
    assert V.mixval_accuracy(pred, la, lb) == ((1, 2), (1, 2))
    valid = torch.tensor([[[True, False], [True, True]]])
    assert V.mixval_accuracy(pred, la, lb, valid) == ((1, 1), (1, 2))


def test_entropy_and_im_values():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 4, 1, 1).repeat(1, 1, 2, 2)
    assert V.mean_entropy(p) == pytest.approx(math.log(2) / math.log(4))
    assert V.information_maximization(p) == pytest.approx(0.0, abs=1e-6)  # mean = each: no diversity beyond them
    q = torch.cat([one_hot_probs(torch.zeros(1, 1, 2, dtype=torch.long), 4, 1.0),
                   one_hot_probs(torch.ones(1, 1, 2, dtype=torch.long), 4, 1.0)], dim=2)
    assert V.information_maximization(q) == pytest.approx(math.log(2) / math.log(4))


def cands(**kw):
    """Candidates with one validator each: {name: {"im": v, "agreement": a}}."""
    return {n: {"im": v[0], "agreement": v[1], "miou": 0.0} for n, v in kw.items()}


def test_rules_pick_what_they_say():
    c = cands(source=(0.30, 0.8), adabn_0_75=(0.35, 1.0), step_000050=(0.45, 0.9), step_000100=(0.40, 0.85))
    c["adabn_0.75"] = c.pop("adabn_0_75")
    assert last_save(c) == "step_000100"
    assert pick(c, "last").name == "step_000100"
    assert pick(c, "max:im").name == "step_000050"
    assert pick(c, "reference").name == "adabn_0.75"  # agreement 1: AdaBN at the run's blend
    assert pick(c, "guard:im").name == "step_000100"  # the last save beats the reference on IM
    c["step_000100"]["im"] = 0.2  # now it does not: fall back to the best model that did not self-train
    assert pick(c, "guard:im").name == "adabn_0.75"
    with pytest.raises(ValueError, match="unknown selection rule"):
        pick(c, "max:nonsense")
    assert all(pick(c, r).name in c for r in RULES if not r.startswith("max:") or r[4:] in ("im", "agreement"))


def test_verdict_follows_the_bootstrap_interval_of_the_intra_accuracy():
    from segadapt.adapt.selection import intra_interval

    frames = 12
    src = [[80, 100]] * frames  # the source model: ICE_intra 0.80 on every frame
    up = [[90, 100]] * frames  # +0.10 on every frame: the interval is +0.10 .. +0.10
    mixed = [[95, 100], [70, 100]] * (frames // 2)  # +0.15 / -0.10 alternating: the interval straddles 0
    c = {"source": {"im": 0.3, "mixval_intra_counts": src}, "step_000010": {"im": 0.5, "mixval_intra_counts": up},
         "step_000020": {"im": 0.4, "mixval_intra_counts": [[70, 100]] * frames}}
    v = verdict(c, pick(c, "max:im"))
    assert (v.verdict, v.margin, v.interval) == ("better", pytest.approx(0.10), (pytest.approx(0.10),) * 2)
    assert verdict(c, pick(c, "last")).verdict == "no better"  # -0.10 on every frame
    c["step_000020"]["mixval_intra_counts"] = mixed
    v = verdict(c, pick(c, "last"))
    assert v.verdict == "uncertain" and v.interval[0] < 0 < v.interval[1] and "cannot tell" in v.reason
    assert verdict(c, pick(c, "source")).verdict == "no better"
    del c["source"]["mixval_intra_counts"]
    assert verdict(c, pick(c, "max:im")).verdict == "uncertain"  # nothing to compare with
    d, lo, hi = intra_interval(mixed, src, 0.9, seed=3)
    assert d == pytest.approx(0.025) and lo < d < hi and (lo, hi) == intra_interval(mixed, src, 0.9, seed=3)[1:]
    narrow = intra_interval(mixed, src, 0.5, seed=3)
    assert lo < narrow[1] <= narrow[2] < hi  # a lower confidence gives a narrower interval
    with pytest.raises(ValueError, match="per-frame counts"):
        intra_interval(src, src[:3])


def test_mixval_rule_sums_the_two_ranks_and_ties_share_them():
    from segadapt.adapt.selection import average_ranks

    c = {"source": {"mixval_intra": 0.90, "mixval_inter": 0.55},  # ranks (intra + inter): 0 + 2
         "step_000010": {"mixval_intra": 0.95, "mixval_inter": 0.53},  # 2 + 1
         "step_000020": {"mixval_intra": 0.93, "mixval_inter": 0.50}}  # 1 + 0
    p = pick(c, "mixval")
    assert p.name == "step_000010" and p.validator == "mixval"
    assert signed_scores(c, "mixval")["step_000010"] == pytest.approx(3 / 4)  # rank sum / 2 (N - 1)
    c["source"]["mixval_intra"] = 0.99  # the source model first on both: it is kept, no better
    assert pick(c, "mixval").name == "source" and verdict(c, pick(c, "mixval")).verdict == "no better"
    # ties share their mean rank, NaN ranks lowest: four identical candidates are not told apart
    assert list(average_ranks([1.0, 1.0, float("nan"), 0.5])) == [2.5, 2.5, 0.0, 1.0]
    same = {n: {"mixval_intra": 1.0, "mixval_inter": float("nan")} for n in ("step_000001", "source", "step_000002")}
    assert pick(same, "mixval").name == "source" and verdict(same, pick(same, "mixval")).verdict == "no better"


def test_confidence_rules_follow_their_direction():
    c = {"source": {"entropy": 0.3}, "step_000001": {"entropy": 0.1}, "step_000002": {"entropy": 0.2}}
    assert pick(c, "max:entropy").name == "step_000001"  # lower entropy is taken as better
