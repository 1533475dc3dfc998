"""The adaptation engine and its component protocol: the loop knows no method by name, the components are listed in
one place, the default loop trains with the rectification-aware mixture loss, class-frequency weights follow the
final labels, the gradient-share diagnostic, and CrossMatch's RGB-D stream (dual-head agreement, cross-modal
targets, the RGB-D teacher's own momentum)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segadapt.adapt.config import AdaptConfig, BiDAConfig, DepthConfig, RCCRConfig, RectifierConfig, SecoConfig
from segadapt.adapt.methods.base import Component, PseudoLabels, Step, StrongView, TeacherView
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 11


def test_the_loop_names_no_method_and_the_components_are_listed_once():
    """engine.py imports no method module and names none in its code; classes stay small; the list of components
    is the one place that knows them all."""
    from segadapt.adapt.methods.components import COMPONENTS, build_components

    src = (ROOT / "adapt" / "engine.py").read_text()
    tree = ast.parse(src)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    methods = {"bida", "rccr", "rectifier", "rgbd_stream", "seco", "uda"}
    assert not [m for m in imported if m and m.split(".")[-1] in methods]
    code = "\n".join(line.split("#")[0] for line in src.splitlines())
    code = re.sub(r'""".*?"""', "", code, flags=re.S)
    assert not re.search(r"\b(rccr|bida|seco|rectifier|uda|rgbd|crossmatch)\b", code, re.I), "a method named"
    assert len(src.splitlines()) <= 450
    for path in (ROOT / "adapt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                assert n <= 300, f"{path.relative_to(ROOT)}: class {node.name} has {n} lines"
    assert [type(c).__name__ for c in build_components(AdaptConfig())] == ["Rectifier"]  # the default
    every = AdaptConfig(source_data="s", rccr=RCCRConfig(enabled=True), bida=BiDAConfig(enabled=True),
                        seco=SecoConfig(enabled=True))
    assert [type(c) for c in build_components(every)] == [c for c in COMPONENTS if c.__name__ != "RGBDStream"]
    assert all(issubclass(c, Component) and c.name != Component.name for c in COMPONENTS)
    assert len({c.name for c in COMPONENTS}) == len(COMPONENTS)


@pytest.fixture()
def engine(tiny_checkpoint, tiny, tmp_path):
    from segadapt.adapt.engine import Engine

    def make(**kw):
        base = dict(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                    steps=2, batch_size=2, num_workers=0, size=(48, 64), debug_every=0, log_every=1)
        e = Engine(AdaptConfig(**{**base, **kw}), log=lambda *_: None)
        e.setup_training()
        return e
    return make


def test_default_loop_trains_with_the_mixture_loss(engine, monkeypatch):
    """With the rectifier on (the default) and past its warm-up the pseudo-label loss is the rectification-aware
    mixture loss with r; with it off, plain weighted cross-entropy."""
    import segadapt.adapt.engine as eng

    calls = {"mixture": 0, "ce": 0}
    real_mix, real_ce = eng.mixture_loss, eng.weighted_ce

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(eng, "mixture_loss", spy("mixture", real_mix))
    monkeypatch.setattr(eng, "weighted_ce", spy("ce", real_ce))
    e = engine(rectifier=RectifierConfig(warmup_steps=0))
    s = e.train_step(next(e.batches), 0)
    assert calls == {"mixture": 1, "ce": 0} and s.strong.reliability is not None
    e = engine(rectifier=RectifierConfig(enabled=False))
    e.train_step(next(e.batches), 0)
    assert calls == {"mixture": 1, "ce": 1}


class _Relabel(Component):
    """A test component whose refinement hands every kept pixel of the left half to class 6 (a rare class)."""

    name = "relabel"

    def refine(self, s, pl):
        labels = pl.labels.clone()
        w = labels.shape[-1] // 2
        labels[..., :w] = torch.where(pl.mask[..., :w], torch.full_like(labels[..., :w], 6), labels[..., :w])
        return PseudoLabels(labels, pl.mask, pl.weights, pl.threshold, pl.valid)


def test_class_frequency_weights_follow_the_labels_after_every_refinement(engine):
    """Class-frequency statistics count the labels the student trains on (after the components' refinements), and
    each kept pixel's weight is its final class's weight."""
    e = engine()
    e.components.append(_Relabel())
    b = next(e.batches)
    img = b["image"]
    s = Step(index=0, steps=2, num_classes=e.K, ignore_index=IGNORE, batch=b, image=img, valid=b.get("valid"))
    s.view = e.teacher_view(s)
    pl = e.pseudo_labels(s)
    kept = pl.labels != IGNORE
    counts = torch.bincount(pl.labels[kept], minlength=e.K).float()
    assert torch.allclose(e.class_weights.freq, counts / counts.sum(), atol=1e-6)
    assert float(e.class_weights.freq[6]) > 0.3  # the relabelled half
    w = e.class_weights.class_weights()
    assert torch.allclose(pl.weights[kept], w[pl.labels[kept]], atol=1e-6)


def test_gradient_shares_measure_each_term_against_the_pseudo_label_loss(engine):
    """``grad_share``: a term's backbone gradient norm over the pseudo-label loss's; a term twice the pseudo-label
    loss has share 2, a term without a path to the backbone 0; in a run, RCCR's share is logged, 0 at weight 0."""
    from segadapt.adapt.training.run_log import gradient_shares

    e = engine(rectifier=RectifierConfig(enabled=False))
    b = next(e.batches)
    s = Step(index=0, steps=2, num_classes=e.K, ignore_index=IGNORE, batch=b, image=b["image"], valid=b.get("valid"))
    s.view = e.teacher_view(s)
    s.labels = e.pseudo_labels(s)
    s.strong = e.class_mix_view(s)
    pl = e.pseudo_label_loss(s)
    head = [p for n, p in e.student.named_parameters() if n.startswith(e.student.HEAD_PREFIX)]
    head_only = sum(p.sum() for p in head)  # no path to the backbone
    shares = gradient_shares({"pl": pl, "double": 2 * pl, "head": head_only}, e.student, s, IGNORE)
    assert shares["pl"] == pytest.approx(1.0) and shares["double"] == pytest.approx(2.0, rel=1e-4)
    assert shares["head"] == 0.0

    runs = {}
    for w in (0.0, 1.0):
        e = engine(out=str(Path(e.cfg.out).parent / f"w{w}"), steps=2, grad_share_every=1,
                   rectifier=RectifierConfig(enabled=False),
                   rccr=RCCRConfig(enabled=True, weight=w, ramp=False, confidence=0.0))
        e.run()
        recs = [json.loads(line) for line in (e.out / "coverage.jsonl").read_text().splitlines()]
        runs[w] = [r["grad_share"] for r in recs if "grad_share" in r]
    assert len(runs[1.0]) == 2 and all(g["pl"] == pytest.approx(1.0) for g in runs[1.0])
    # step 1 has an empty memory bank (no negatives, loss 0); at step 2 the term pulls on the backbone
    assert runs[1.0][0]["rccr"] < 1e-6 < runs[1.0][1]["rccr"] and runs[0.0][1]["rccr"] == 0.0


# ---- CrossMatch's RGB-D stream -------------------------------------------------------------------------------------
K, H, W = 11, 32, 48


def _rgbd(teacher_alpha=0.99, **depth):
    """An RGBDStream set up from a tiny RGB model, and a Step of 2 frames whose RGB teacher says class 0 on the
    left half and class 1 on the right, the RGB-D teacher class 0 everywhere."""
    from segadapt.adapt.methods.rgbd_stream import RGBDStream

    cfg = AdaptConfig(depth=DepthConfig(provider="files", directory="d", teacher_alpha=teacher_alpha, **depth))
    comp = RGBDStream(cfg)
    torch.manual_seed(0)
    student = tiny_model("deeplabv3-mobilenetv2")
    comp.setup(SimpleNamespace(num_classes=K, ignore_index=IGNORE, device=torch.device("cpu"), student=lambda: student))
    img = torch.zeros(2, 3, H, W, dtype=torch.uint8)
    p_rgb = torch.full((2, K, H, W), 0.01)
    conf = torch.linspace(0.5, 0.85, H)[None, :, None]  # confidence varies by row: a threshold below the cap
    p_rgb[:, 0, :, : W // 2] = conf
    p_rgb[:, 1, :, W // 2:] = conf
    p_d = torch.full((2, K, H, W), 0.01)
    p_d[:, 0] = 0.9
    view = TeacherView(image=img, x=img.float(), logits=None, features=None, probs=p_rgb, extra={"rgbd_probs": p_d})
    s = Step(index=0, steps=10, num_classes=K, ignore_index=IGNORE, batch={}, image=img, view=view)
    comp.depth = torch.rand(2, 2, H, W)
    return comp, s


def test_dual_head_refinement_keeps_only_pixels_where_the_teachers_agree():
    comp, s = _rgbd()
    fused = comp.label_probs(s, s.view.probs)
    assert torch.allclose(fused, 0.5 * (s.view.probs + s.view.extra["rgbd_probs"]))
    ones = torch.ones(2, H, W)
    pl = comp.refine(s, PseudoLabels(fused.argmax(1), ones.bool(), ones, 0.9))
    assert bool(pl.mask[..., : W // 2].all()) and not bool(pl.mask[..., W // 2:].any())
    assert bool((pl.labels[..., W // 2:] == IGNORE).all()) and float(pl.weights[..., W // 2:].sum()) == 0
    assert s.logs["rgbd_removed"] == pytest.approx(0.5)


def test_cross_modal_targets_are_the_other_teachers_own_labels_with_their_own_thresholds():
    """Each student learns the other stream's teacher's labels (a swap raises the loss), and each stream's labels
    come from its own class-balanced thresholds (the RGB side does not use the fused distribution's)."""
    from segadapt.adapt.pseudo_label import class_balanced_thresholds

    comp, s = _rgbd()
    s.strong = StrongView(torch.zeros(2, 3, H, W), torch.zeros(2, H, W, dtype=torch.long), torch.ones(2, H, W))
    to_rgbd_labels = torch.full((2, K, H, W), -5.0)
    to_rgbd_labels[:, 0] = 5.0  # says what the RGB-D teacher says
    to_rgb_labels = torch.log(s.view.probs) * 10  # says what the RGB teacher says
    right = comp.cross_modal(s, to_rgbd_labels, to_rgb_labels)
    for t in comp.trackers.values():
        t.value = None
    swapped = comp.cross_modal(s, to_rgb_labels, to_rgbd_labels)
    assert float(right) < 0.1 < float(swapped)
    th_rgb = class_balanced_thresholds(s.view.probs, comp.cfg.pseudo.fraction, comp.cfg.pseudo.threshold)
    assert torch.allclose(comp.trackers["rgb"].value, th_rgb)
    assert not torch.allclose(comp.trackers["rgb"].value, comp.trackers["rgbd"].value)


def test_rgbd_teacher_follows_at_its_own_momentum():
    comp, _ = _rgbd(teacher_alpha=0.9)
    with torch.no_grad():
        for p in comp.model.parameters():
            p.add_(0.1)
    before = [p.clone() for p in comp.teacher.model.parameters()]
    comp.after_update()
    for a, b, c in zip(before, comp.model.parameters(), comp.teacher.model.parameters()):
        assert torch.allclose(c, 0.9 * a + 0.1 * b, atol=1e-6)


def test_stereo_depth_invalidates_the_left_margin_and_matches_outside_the_right_view(monkeypatch):
    import numpy as np

    from segadapt.adapt.data.depth import StereoDepth

    sd = StereoDepth(right_dir="unused", num_disparities=32)
    h, w = 8, 64
    raw = np.full((h, w), 5 * 16, np.int16)  # disparity 5 px everywhere, as OpenCV's fixed point
    raw[0, 40] = 50 * 16  # a match 50 px to the left of column 40: outside the right view
    monkeypatch.setattr(sd, "_sgbm", SimpleNamespace(compute=lambda a, b: raw))
    img = np.zeros((h, w, 3), np.uint8)
    disp, valid = sd.disparity(img, img)
    assert not valid[:, :31].any() and valid[1:, 31:].all()  # the first num_disparities - 1 columns
    assert not valid[0, 40] and float(disp[0, 40]) == 0.0
