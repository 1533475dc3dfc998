"""The rectifier's inputs and target (issue #12): stride-4/8 features, the view-consensus target that the rectifier
cannot compute from its own inputs, BCE over real pixels only, and a tiny adaptation run with the new target."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.adapt.config import AdaptConfig, PhotometricConfig, RectifierConfig
from conftest import tiny_model

NO_PHOTOMETRIC = PhotometricConfig(brightness=0, contrast=0, saturation=0, hue=0, gamma=0, jitter_p=0, blur_p=0)


@pytest.mark.parametrize("arch", ["segformer", "deeplabv3-mobilenetv2"])
@pytest.mark.parametrize("features,stride", [("stride4", 4), ("stride8", 8)])
def test_low_level_features_have_the_stride_and_feed_the_rectifier(arch, features, stride):
    from segadapt.adapt.methods.rectifier_signals import rectifier_feature_channels, rectifier_input
    from segadapt.adapt.methods.rectifier import make_rectifier, rectification

    torch.manual_seed(0)
    m = tiny_model(arch).eval()
    x = torch.randn(2, 3, 60, 84)  # not multiples of 8: grids round up
    cfg = AdaptConfig(rectifier=RectifierConfig(features=features, anchor_consistency=False, prior="teacher"))
    with torch.no_grad():
        logits, feats = rectifier_input(m, x, cfg.rectifier)
        ref_logits, dec = m.forward_features(x)
    h, w = -(-60 // stride), -(-84 // stride)
    assert feats.shape == (2, rectifier_feature_channels(m, cfg.rectifier), h, w)
    assert feats.shape[1] == m.feature_channels + m.low_level_channels(stride)
    assert torch.allclose(logits, ref_logits)  # the same forward pass, only more of it kept
    # the decoder part is the decoder features upsampled; the rest are backbone features (not a copy of them)
    up = F.interpolate(dec, size=(h, w), mode="bilinear", align_corners=False)
    assert torch.allclose(feats[:, :m.feature_channels], up, atol=1e-6)
    assert feats[:, m.feature_channels:].abs().sum() > 0
    rect = make_rectifier(cfg, feats.shape[1], 11)
    r = rectification(cfg, rect, feats, logits, None, (30, 42))
    assert r.shape == (2, 30, 42) and 0 < float(r.min()) and float(r.max()) < 1
    with pytest.raises(ValueError, match="stride 4 or 8"):
        m.forward_low_level(x, 16)


class _ScaleFlipper(nn.Module):
    """A 'teacher' whose label at the native size is class 0 whatever the image, and on larger inputs class 0 on
    bright images and class 1 on dark ones: what the rectifier reads (the native-size output) is identical for a
    bright and a dark image, the view-consensus target is not."""

    def __init__(self, native_w: int):
        super().__init__()
        self.native_w = native_w

    def forward(self, x):
        b, _, h, w = x.shape
        out = torch.zeros(b, 3, h, w)
        if w == self.native_w:
            out[:, 0] = 5.0
        else:
            bright = (x.mean((1, 2, 3)) > 0).float()[:, None, None]
            out[:, 0] = 5.0 * bright
            out[:, 1] = 5.0 * (1 - bright)
        return out


def test_view_consensus_target_is_not_a_function_of_the_rectifier_inputs():
    from segadapt.adapt.methods.rectifier_signals import agreement_target, view_consensus_probs

    teacher = _ScaleFlipper(native_w=16)
    img = torch.stack([torch.full((3, 12, 16), 230, dtype=torch.uint8), torch.full((3, 12, 16), 20, dtype=torch.uint8)])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = (img.float() / 255 - 0.5) / 0.25
    native = teacher(x)
    assert torch.equal(native[0], native[1])  # identical inputs to the rectifier (logits; features alike)
    rc = RectifierConfig(view_consensus=True, view_scale=1.5, view_flip_photometric=False)
    pv = view_consensus_probs(teacher, img, mean, std, rc, NO_PHOTOMETRIC)
    assert pv.shape == (2, 3, 12, 16)
    target = agreement_target(native.argmax(1), [pv])
    assert bool(target[0].all()) and not bool(target[1].any())  # ... yet the targets differ
    # the anchor target of before issue #12 was computable: anchor probabilities are among the rectifier's inputs
    assert view_consensus_probs(teacher, img, mean, std, RectifierConfig(view_scale=0, view_flip_photometric=False),
                                NO_PHOTOMETRIC) is None


def test_flipped_view_is_mapped_back_to_the_weak_view():
    from segadapt.adapt.methods.rectifier_signals import agreement_target, view_consensus_probs

    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 4, 1)  # per-pixel classifier: flip-equivariant
    img = torch.randint(0, 256, (2, 3, 10, 14), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rc = RectifierConfig(view_consensus=True, view_scale=0, view_flip_photometric=True)
    pv = view_consensus_probs(teacher, img, mean, std, rc, NO_PHOTOMETRIC)
    native = F.softmax(teacher((img.float() / 255 - 0.5) / 0.25), 1)
    assert torch.allclose(pv, native, atol=1e-5)
    assert bool(agreement_target(native.argmax(1), [pv]).all())


def _rectifier_step(cfg: AdaptConfig, logits, probs, valid, labels, head=None, features=None, targets=()):
    """The Rectifier component with ``head`` and its teacher-side inputs set by hand, and a Step at step 100 whose
    teacher view has ``logits``/``probs`` and whose pseudo-labels are ``labels`` (255 = dropped)."""
    from segadapt.adapt.methods.base import PseudoLabels, Step, TeacherView
    from segadapt.adapt.methods.rectifier import Rectifier

    comp = Rectifier(cfg)
    comp.head, comp.features, comp.targets = head, features, list(targets)
    b, _, h, w = probs.shape
    img = torch.zeros(b, 3, h, w, dtype=torch.uint8)
    view = TeacherView(image=img, x=img.float(), logits=logits, features=features, probs=probs, valid=valid)
    pl = PseudoLabels(labels, labels != 255, (labels != 255).float(), 0.9, valid)
    return comp, Step(index=100, steps=200, num_classes=probs.shape[1], ignore_index=255, batch={}, image=img,
                      valid=valid, view=view, labels=pl)


def test_rectifier_bce_leaves_out_crop_padding():
    from segadapt.adapt.methods.rectifier import make_rectifier
    from segadapt.adapt.methods.rectifier_signals import masked_bce

    torch.manual_seed(0)
    r = torch.rand(2, 6, 8) * 0.98 + 0.01
    target = torch.rand(2, 6, 8) > 0.5
    valid = torch.ones(2, 6, 8, dtype=torch.bool)
    valid[:, :, 5:] = False  # padded right border
    ref = F.binary_cross_entropy(r[valid], target[valid].float())
    assert torch.allclose(masked_bce(r, target, valid), ref, atol=1e-6)
    target2 = target.clone()
    target2[~valid] = ~target2[~valid]
    assert torch.allclose(masked_bce(r, target2, valid), ref, atol=1e-6)
    assert not torch.allclose(masked_bce(r, target2), masked_bce(r, target))

    # through the component's reliability hook: the view's `valid` (when it has one) masks the target
    K, H, W = 4, 16, 24
    cfg = AdaptConfig(rectifier=RectifierConfig(anchor_consistency=False, prior="teacher", view_consensus=True,
                                                query_stride=1, inr=True))
    head = make_rectifier(cfg, 8, K)
    logits = torch.randn(1, K, 4, 6)
    probs = F.softmax(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False), 1)
    other = torch.roll(probs, 1, dims=1)  # disagrees with the teacher's label everywhere
    valid = torch.zeros(1, H, W, dtype=torch.bool)
    valid[:, :, :12] = True
    feats = torch.randn(1, 8, 4, 6, generator=torch.Generator().manual_seed(1))

    def bce(view_probs, v=valid):
        comp, s = _rectifier_step(cfg, logits, probs, v, probs.argmax(1), head, feats, [view_probs])
        r, terms = comp.reliability(s)
        return terms["rectifier_bce"], r

    mixed = probs.clone()
    mixed[..., 12:] = other[..., 12:]  # disagreement in the padding only
    same, r_full = bce(probs)
    padded, _ = bce(mixed)
    assert r_full.shape == (1, H, W)
    assert torch.allclose(same, padded)
    assert not torch.allclose(bce(mixed, None)[0], same)  # no mask: it counts


def test_prior_is_the_reliability_of_the_label_trained_on():
    """r (the confidence prior, the default) is the teacher's probability of the pseudo-label the student trains on:
    where a refinement (the CBST rule, dual-head fusion, SeCo's fill, BiDA's vote) gave a pixel another class than
    the teacher's argmax, r is that class's probability, not the argmax's."""
    K, H, W = 4, 8, 10
    torch.manual_seed(3)
    probs = F.softmax(3 * torch.randn(1, K, H, W), 1)
    labels = probs.argmax(1)
    labels[:, :, :5] = (labels[:, :, :5] + 1) % K  # half the pixels handed to another class
    labels[:, 0, 0] = 255  # a dropped pixel: no label, r of the argmax
    cfg = AdaptConfig(rectifier=RectifierConfig(inr=False, prior="teacher", warmup_steps=0))
    comp, s = _rectifier_step(cfg, None, probs, None, labels)
    r, terms = comp.reliability(s)
    assert terms == {}
    expect = probs.gather(1, torch.where(labels == 255, probs.argmax(1), labels)[:, None])[:, 0]
    assert torch.allclose(r, expect, atol=1e-6)
    assert not torch.allclose(r, probs.max(1).values, atol=1e-3)  # the argmax's confidence would differ
    comp, s = _rectifier_step(AdaptConfig(rectifier=RectifierConfig(inr=False, prior="teacher", warmup_steps=200)),
                              None, probs, None, labels)
    assert comp.reliability(s)[0] is None  # before the warm-up: plain weighted CE


def test_tiny_adaptation_with_view_consensus_target_and_low_level_features(tiny_checkpoint, tiny, tmp_path):
    from segadapt.adapt.models.checkpoint import load_training_state
    from segadapt.adapt.methods.rectifier_signals import rectifier_input
    from segadapt.adapt.engine import adapt
    from segadapt.adapt.methods.rectifier import load_run, rectification

    rc = RectifierConfig(warmup_steps=1, features="stride8", view_consensus=True, anchor_consistency=False, inr=True)
    cfg = AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                      select="last",
                      steps=2, batch_size=2, num_workers=0, debug_every=0, log_every=1, save_every=2, rectifier=rc)
    s = adapt(cfg, log=lambda *_: None)
    assert s["steps"] == 2 and s["last_losses"]["loss_rectifier_bce"] > 0
    teacher, anchor, rect, _, cfg2 = load_run(cfg.out)
    st = load_training_state(Path(cfg.out) / "last")
    d_in = teacher.feature_channels + teacher.low_level_channels(8)
    assert st["components"]["rectifier"]["head"]["proj.weight"].shape[1] == d_in + 11  # + teacher probs, no anchor's
    assert rect is not None and cfg2.rectifier.features == "stride8" and anchor is not None  # anchor: the prior
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        logits, feats = rectifier_input(teacher, x, cfg2.rectifier)
        r = rectification(cfg2, rect, feats, logits, anchor(x), (96, 128))
    assert feats.shape[-2:] == (12, 16) and r.shape == (1, 96, 128)
    # the prior alone: no rectifier is trained or saved, r still reaches the mixture loss
    cfg.out, cfg.rectifier.inr = str(tmp_path / "prior"), False
    s = adapt(cfg, log=lambda *_: None)
    assert "loss_rectifier_bce" not in s["last_losses"]
    assert load_training_state(Path(cfg.out) / "last")["components"]["rectifier"] == {}
    cfg.rectifier.prior = "none"
    with pytest.raises(ValueError, match="inr false needs"):
        adapt(cfg, log=lambda *_: None)
