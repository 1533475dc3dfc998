"""Rare-class sampling (DAFormer sec. 3.3) and the balanced / OHEM source losses: the class distribution against the
softmax formula, crops that show the drawn class, seeded and resumable draws, the class statistics file, the loss
weights on hand-built batches, and defaults that leave source training as it was."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segadapt.adapt.data.rare_class import (ClassCrops, ClassStats, RareClassBatchSampler, compute_class_stats,
                                            rare_class_loader, rare_class_probabilities, rarest_classes,
                                            run_class_stats)
from segadapt.adapt.source_losses import balanced_ce, median_frequency_weights, ohem_ce, ohem_mask

IGNORE = 3
NAMES = ["road", "car", "pole"]


@pytest.fixture()
def label_set(tmp_path):
    """10 label files of 10x10 pixels, K = 3 (ignore 3): 'pole' covers 1 % of the labelled pixels (5 pixels in each
    of frames 2 and 7), 'car' 39 %, 'road' 60 %; frame 0 also holds 20 ignored pixels."""
    d = tmp_path / "labels"
    d.mkdir()
    paths = []
    for i in range(10):
        lab = np.zeros((10, 10), np.uint8)
        lab[:4] = 1  # 40 car pixels
        if i in (2, 7):
            lab[9, :5] = 2  # 5 pole pixels
        if i == 0:
            lab[8:] = IGNORE  # 20 ignored pixels
        paths.append(d / f"f{i}.png")
        cv2.imwrite(str(paths[-1]), lab)
    return paths


def test_frequencies_exclude_the_ignore_index_and_name_a_bad_file(label_set, tmp_path):
    st = compute_class_stats(label_set, NAMES, IGNORE)
    assert st.counts.shape == (10, 3) and st.counts.sum() == 980
    assert st.counts[2].tolist() == [55, 40, 5] and st.counts[0].tolist() == [40, 40, 0]
    np.testing.assert_allclose(st.frequencies(), np.array([570, 400, 10]) / 980)
    assert [n for n, _ in rarest_classes(st.frequencies(), NAMES, 2)] == ["pole", "car"]
    bad = tmp_path / "labels" / "f3.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="f3.png"):
        compute_class_stats(label_set, NAMES, IGNORE)


def test_class_draws_follow_the_softmax(label_set):
    st = compute_class_stats(label_set, NAMES, IGNORE)
    f = st.frequencies()
    for t in (0.01, 0.5):
        classes, p, frames = rare_class_probabilities(st, t, min_pixels=1)
        z = np.exp((1 - f) / t)
        np.testing.assert_allclose(p, z / z.sum(), rtol=1e-12)
        assert classes.tolist() == [0, 1, 2] and p.argmax() == 2  # the rarest class is drawn most often
        assert frames[2].tolist() == [2, 7] and frames[0].tolist() == list(range(10))
    # empirical class frequencies over 2000 draws at T = 0.5 match the formula within 4 standard errors
    sampler = RareClassBatchSampler(st, batch_size=50, seed=3, temperature=0.5, min_pixels=1)
    keys = [k for b in range(40) for k in sampler.draws(b)]
    drawn = np.bincount([c for _, _, c in keys], minlength=3) / len(keys)
    _, p, _ = rare_class_probabilities(st, 0.5, 1)
    assert np.all(np.abs(drawn - p) < 4 * np.sqrt(p * (1 - p) / len(keys))), (drawn, p)
    assert drawn[2] > drawn[1] > drawn[0]
    assert {i for i, (_, fr, c) in enumerate(keys) if c == 2} and {fr for _, fr, c in keys if c == 2} == {2, 7}
    # a class whose frames hold fewer than min_pixels pixels of it is left out; none left is an error
    classes, p, _ = rare_class_probabilities(st, 0.01, min_pixels=6)
    assert classes.tolist() == [0, 1] and p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no class"):
        rare_class_probabilities(st, 0.01, min_pixels=1000)


def test_draws_are_seeded_and_a_started_sampler_continues_the_stream(label_set):
    st = compute_class_stats(label_set, NAMES, IGNORE)

    def batches(seed, start, n):
        it = iter(RareClassBatchSampler(st, 4, seed, 0.5, 1, start=start))
        return [next(it) for _ in range(n)]

    full = batches(0, 0, 6)
    assert full == batches(0, 0, 6) and full != batches(1, 0, 6)
    assert batches(0, 4, 2) == full[4:]  # resumed at batch 4: the draws of the uninterrupted stream
    # data-parallel: the ranks' shares are disjoint and together the one-process stream of batch 2 * 4
    one = iter(RareClassBatchSampler(st, 8, 0, 0.5, 1))
    r0, r1 = (iter(RareClassBatchSampler(st, 4, 0, 0.5, 1, rank=r, world_size=2)) for r in (0, 1))
    b, a0, a1 = next(one), next(r0), next(r1)
    assert sorted(a0 + a1) == sorted(b) and not set(a0) & set(a1)


def test_the_crop_shows_the_drawn_class_and_the_loader_is_seeded(tiny):
    from segadapt.adapt.data.datasets import LabeledImageFolder, collate
    from segadapt.adapt.data.sampling import SeededSamples
    from segadapt.adapt.data.transforms import train_transform

    ds = LabeledImageFolder(tiny / "source", transform=train_transform((32, 48), (48, 64), (0.75, 1.25), 11))
    st = compute_class_stats(ds.labels, ds.classes.names, 11)
    keys = [k for b in range(10) for k in RareClassBatchSampler(st, 8, 0, 0.01, 16).draws(b)]
    rare = set(np.flatnonzero(st.frequencies() < 0.02).tolist())  # Pole, SignSymbol, Fence, Pedestrian, Bicyclist
    assert len(rare) == 5 and sum(c in rare for _, _, c in keys) > 0.9 * len(keys)  # T = 0.01: rare classes
    # each crop seeded by its key (SeededSamples), whatever the process's RNGs hold
    shown = {t: sum(bool((SeededSamples(ClassCrops(ds, t), 0)[k]["label"] == k[2]).any()) for k in keys)
             for t in (1, 10)}
    assert shown[10] == len(keys) and shown[1] < len(keys), shown  # the retry is what makes every crop show c

    def first_batches(start, n=2):
        it = iter(rare_class_loader(ds, st, 4, 0, start, 0.01, 16, 10, collate_fn=collate))
        return [next(it) for _ in range(n)]

    a, b = first_batches(0, 3), first_batches(0, 3)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b))
    c = first_batches(2, 1)[0]  # a loader resumed at batch 2 reads batch 2 of the uninterrupted one
    assert torch.equal(c["image"], a[2]["image"]) and c["name"] == a[2]["name"]


def test_class_stats_are_written_once_and_read_back_on_resume(tiny, tmp_path):
    from segadapt.adapt.data.datasets import LabeledImageFolder

    ds = LabeledImageFolder(tiny / "source")
    st = run_class_stats(tmp_path, ds, resume=False, log=lambda *_: None)
    obj = json.loads((tmp_path / "class_stats.json").read_text())
    assert obj["classes"] == list(ds.classes.names) and len(obj["frames"]) == len(ds) == st.counts.shape[0]
    obj["counts"][0][0] += 1000  # what a resumed run reads is the stored file, not a new count
    (tmp_path / "class_stats.json").write_text(json.dumps(obj))
    assert run_class_stats(tmp_path, ds, resume=True).counts[0, 0] == st.counts[0, 0] + 1000
    assert run_class_stats(tmp_path, ds, resume=False, log=lambda *_: None).counts[0, 0] == st.counts[0, 0]
    obj["frames"][0] = "other.png"
    (tmp_path / "class_stats.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="class_stats.json"):
        run_class_stats(tmp_path, ds, resume=True)
    assert isinstance(ClassStats.from_json(json.loads(json.dumps(st.to_json()))), ClassStats)


def test_median_frequency_weights_and_the_balanced_loss():
    # frame 0: 90 class-0 and 10 class-1 pixels; frame 1: 50 class-0 and 50 class-2 pixels; class 3 absent
    counts = np.array([[90, 10, 0, 0], [50, 0, 50, 0]])
    # freq = pixels / labelled pixels of the frames holding the class: 140/200, 10/100, 50/100; median 0.5
    w = median_frequency_weights(counts)
    np.testing.assert_allclose(w, [0.5 / 0.7, 0.5 / 0.1, 1.0, 1.0], rtol=1e-6)
    assert w[1] > w[2] > w[0]  # the rarest class weighs most
    np.testing.assert_allclose(median_frequency_weights(counts, 0.5), np.sqrt(w), rtol=1e-6)  # tempered
    np.testing.assert_allclose(median_frequency_weights(counts, 0.0), np.ones(4), rtol=1e-6)
    logits = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, IGNORE + 1]).repeat(2, 3, 1)
    labels[0, 0, 0] = 1
    wt = torch.from_numpy(w)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE + 1, reduction="none")
    valid = labels != IGNORE + 1
    pw = wt[labels.clamp(max=3)] * valid
    expect = (ce * pw).sum() / pw.sum()
    assert balanced_ce(logits, labels, wt, IGNORE + 1).item() == pytest.approx(expect.item(), rel=1e-6)
    assert not math.isclose(balanced_ce(logits, labels, wt, IGNORE + 1).item(),
                            F.cross_entropy(logits, labels, ignore_index=IGNORE + 1).item(), rel_tol=1e-3)


def test_train_source_raises_the_balanced_weights_to_class_weight_power(tiny, tmp_path):
    """--class-weight-power 0.5: the loss's class weights are the square roots of the median-frequency weights of
    the run's own class statistics (not the weights themselves)."""
    from segadapt.adapt.config import ModelConfig, SourceTrainConfig
    from segadapt.adapt.train_source import train_source

    logs = []
    cfg = SourceTrainConfig(data=str(tiny), train_split="source", val_split="", out=str(tmp_path / "run"),
                            size=(48, 64), crop=(32, 48), batch_size=2, steps=1, warmup_steps=0, num_workers=0,
                            device="cpu", model=ModelConfig(variant="0.35"), loss="balanced", class_weight_power=0.5)
    train_source(cfg, log=logs.append)
    line = next(m for m in logs if m.startswith("balanced loss"))
    logged = [float(x.rsplit(" ", 1)[1]) for x in line.split(": ", 1)[1].split(", ")]
    stats = ClassStats.from_json(json.loads((tmp_path / "run" / "class_stats.json").read_text()))
    full = median_frequency_weights(stats.counts)
    np.testing.assert_allclose(logged, np.sqrt(full), atol=0.006)  # logged with 2 decimals
    assert np.abs(np.asarray(logged) - full).max() > 0.1


def test_ohem_keeps_only_hard_pixels_and_at_least_min_kept():
    # 2 frames x 1 x 4 pixels, K = 2, with these true-class probabilities; pixel 3 of frame 0 is ignored
    p_true = torch.tensor([[0.9, 0.2, 0.9, 0.5], [0.2, 0.8, 0.6, 0.95]])
    labels = torch.tensor([[0, 1, 0, 9], [1, 0, 1, 0]])[:, None]
    lt = torch.log(p_true / (1 - p_true))  # logit of the true class against the other
    logits = torch.zeros(2, 2, 1, 4)
    logits.scatter_(1, labels.clamp(max=1)[:, None], lt[:, None, None])
    keep = ohem_mask(logits, labels, 9, thresh=0.7, min_kept=0)[:, 0]
    assert keep.tolist() == [[False, True, False, False], [True, False, True, False]]  # p < 0.7, never ignored
    ce = F.cross_entropy(logits, labels, ignore_index=9, reduction="none")[:, 0]
    assert ohem_ce(logits, labels, 9, 0.7, 0).item() == pytest.approx(ce[keep].mean().item(), rel=1e-6)
    # min_kept 2 per frame: the 4 hardest of the 7 labelled pixels are kept although thresh 0.1 keeps none
    keep = ohem_mask(logits, labels, 9, thresh=0.1, min_kept=2)[:, 0]
    assert keep.tolist() == [[False, True, False, False], [True, True, True, False]]
    assert ohem_mask(logits, labels, 9, thresh=1.0, min_kept=0)[:, 0].sum() == 7  # thresh 1: plain CE's pixels
    assert ohem_ce(logits, torch.full_like(labels, 9), 9).item() == 0.0


def test_defaults_leave_source_training_unchanged(tiny, tmp_path, monkeypatch):
    """Defaults: uniform frames and plain cross-entropy; nothing of the rare-class code runs and no statistics file
    is written (the default loss is F.cross_entropy itself)."""
    import segadapt.adapt.train_source as ts
    from segadapt.adapt.config import AdaptConfig, ModelConfig, SourceTrainConfig

    d = SourceTrainConfig()
    assert (d.loss, d.rare_class_sampling, AdaptConfig().rare_class_sampling) == ("ce", False, False)
    logits, labels = torch.randn(2, 11, 6, 8), torch.randint(0, 12, (2, 12, 16))
    assert torch.equal(ts.supervised_loss(logits, labels, 11),
                       F.cross_entropy(ts.upsample_logits(logits, (12, 16)), labels, ignore_index=11))

    def never(*a, **k):
        raise AssertionError("rare-class code ran with the default config")

    for name in ("rare_class_loader", "run_class_stats", "balanced_ce", "ohem_ce", "median_frequency_weights"):
        monkeypatch.setattr(ts, name, never)
    cfg = SourceTrainConfig(data=str(tiny), train_split="source", val_split="", out=str(tmp_path / "run"),
                            size=(48, 64), crop=(32, 48), batch_size=2, steps=1, warmup_steps=0, num_workers=0,
                            device="cpu", model=ModelConfig(variant="0.35"))
    assert ts.train_source(cfg, log=lambda *_: None)["steps"] == 1
    assert not (tmp_path / "run" / "class_stats.json").exists()
    with pytest.raises(ValueError, match="--source-data"):
        AdaptConfig(checkpoint="c", target="t", rare_class_sampling=True).check()
