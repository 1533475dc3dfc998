"""Source-free adaptation: components and a few real steps on tiny data."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segadapt.adapt.config import AdaptConfig, DepthConfig, RectifierConfig
from conftest import tiny_model


@pytest.mark.parametrize("arch", ["segformer", "deeplabv3-mobilenetv2"])
def test_auxiliary_stream_starts_equal_to_source(arch, tiny):
    from segadapt.adapt.models.rgbd_segmenter import depth_input_weight, make_rgbd_segmenter

    torch.manual_seed(0)
    src = tiny_model(arch).eval()
    aux = make_rgbd_segmenter(src).eval()
    assert aux.in_channels == 4
    x = torch.randn(2, 3, 64, 96)
    d = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        ref = src(x)
        scale = ref.abs().max().item()  # random-init MobileNetV2 logits are tiny: compare relative to their size
        diff = (aux(torch.cat([x, d], 1)) - ref).abs().max().item()
    assert diff <= 1e-5 * scale
    # and the depth channel is a real input: changing its weights changes the output
    with torch.no_grad():
        depth_input_weight(aux).normal_()  # (a constant would be removed by LayerNorm)
        assert (aux(torch.cat([x, d], 1)) - ref).abs().max().item() > 1e-3 * scale


def test_stereo_depth_matches_kitti_ground_truth(kitti):
    from segadapt.adapt.data.depth import FileDepth, StereoDepth

    sd = StereoDepth(str(kitti / "image_3"))
    gt_reader = FileDepth(str(kitti / "disp_occ_0"))
    epes = []
    for f in sorted((kitti / "image_2").iterdir()):
        left = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        right = cv2.cvtColor(cv2.imread(str(kitti / "image_3" / f.name)), cv2.COLOR_BGR2RGB)
        disp, valid = sd.disparity(left, right)
        gt = gt_reader.read_raw(f)
        both = valid & (gt > 0)
        assert both.sum() > 10000
        epes.append(float(np.abs(disp[both] - gt[both]).mean()))
        depth = sd.depth_m(disp, valid)
        assert 1.0 < np.median(depth[valid]) < 80.0  # street scenes: metres
        d, v = sd(f, left)
        assert d.dtype == np.float32 and d.min() >= 0 and d.max() <= 1 and (d[~v] == 0).all()
    assert np.mean(epes) < 2.5, epes


def test_file_depth_kitti_disparity_png(kitti):
    from segadapt.adapt.data.depth import FileDepth

    f = sorted((kitti / "image_2").iterdir())[0]
    raw16 = cv2.imread(str(kitti / "disp_occ_0" / f.name), cv2.IMREAD_UNCHANGED)
    fd = FileDepth(str(kitti / "disp_occ_0"))
    raw = fd.read_raw(f)
    assert raw16.dtype == np.uint16 and np.allclose(raw, raw16 / 256.0)
    img = cv2.imread(str(f))
    d, v = fd(f, img)
    assert np.array_equal(v, raw16 > 0) and d.max() <= 1 and (d[~v] == 0).all()
    with pytest.raises(FileNotFoundError, match="nothere"):
        fd(Path("nothere.png"), img)


def test_depth_follows_flip_and_crop_through_the_dataset(kitti):
    from segadapt.adapt.data.datasets import ImageFolder
    from segadapt.adapt.data.depth import FileDepth
    from segadapt.adapt.data.transforms import Compose, RandomCrop, RandomHFlip

    fd = FileDepth(str(kitti / "disp_occ_0"))
    plain = ImageFolder(kitti / "image_2", depth_provider=fd)
    s0 = plain.load(0)
    import random

    random.seed(5)
    t = Compose([RandomCrop((200, 400)), RandomHFlip(1.0)])
    random.seed(5)
    item = ImageFolder(kitti / "image_2", transform=t, depth_provider=fd)[0]
    # recover the crop window from the image itself, then check the depth took the same path
    img = item["image"].permute(1, 2, 0).numpy()[:, ::-1]
    res = cv2.matchTemplate(s0.image, np.ascontiguousarray(img), cv2.TM_SQDIFF)
    y, x = np.unravel_index(np.argmin(res), res.shape)
    assert np.array_equal(s0.image[y:y + 200, x:x + 400], img)  # the window is exactly located
    expect = s0.depth[y:y + 200, x:x + 400][:, ::-1]
    assert np.array_equal(item["depth"][0].numpy(), expect)
    assert np.array_equal(item["depth_valid"][0].numpy(), s0.depth_valid[y:y + 200, x:x + 400][:, ::-1])


def test_model_depth_provider_with_a_local_tiny_model(tmp_path, kitti):
    from transformers import DPTConfig, DPTForDepthEstimation

    from segadapt.adapt.data.depth import ModelDepth

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                    image_size=64, patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                    backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path / "dpt")
    md = ModelDepth(str(tmp_path / "dpt"), size=(64, 64))
    img = cv2.imread(str(sorted((kitti / "image_2").iterdir())[0]))[:, :, ::-1]
    d, v = md(None, np.ascontiguousarray(img))
    assert d.shape == img.shape[:2] and v.all() and 0 <= d.min() and d.max() <= 1 and d.std() > 0
    with pytest.raises(FileNotFoundError):
        ModelDepth(str(tmp_path / "missing"))


def test_rectifier_shape_range_and_continuity():
    from segadapt.adapt.models.rectifier import ImplicitRectifier

    torch.manual_seed(0)
    r = ImplicitRectifier(16, 5, latent_dim=8, hidden=16, layers=2)
    f, p = torch.randn(2, 16, 6, 8), torch.softmax(torch.randn(2, 5, 6, 8), 1)
    out = r(f, p, (24, 32))
    assert out.shape == (2, 24, 32) and out.min() > 0 and out.max() < 1
    # arbitrary continuous coordinates; the local ensemble makes the field continuous: close queries, close values
    q = torch.tensor([[[0.1, 0.2], [0.1 + 1e-4, 0.2]]]).expand(2, -1, -1)
    v = r.query(f, p, q, (2 / 24, 2 / 32))
    assert v.shape == (2, 2) and (v[:, 0] - v[:, 1]).abs().max() < 1e-2
    out.mean().backward()
    assert r.proj.weight.grad is not None


def test_rectifier_prior_starts_at_the_observable_confidence_and_learns_a_correction():
    from segadapt.adapt.models.rectifier import ImplicitRectifier, confidence_prior

    torch.manual_seed(0)
    pt, pn = torch.softmax(3 * torch.randn(2, 5, 24, 32), 1), torch.softmax(3 * torch.randn(2, 5, 24, 32), 1)
    prior = confidence_prior(pt, pn)
    label = pt.argmax(1, keepdim=True)
    assert torch.allclose(prior, 0.5 * (pt.max(1).values + pn.gather(1, label)[:, 0]))
    assert torch.equal(confidence_prior(pt), pt.max(1).values)
    r = ImplicitRectifier(16, 5, latent_dim=8, hidden=16, layers=2, prior_residual=True)
    f, p = torch.randn(2, 16, 6, 8), torch.softmax(torch.randn(2, 5, 6, 8), 1)
    out = r(f, p, (24, 32), prior=prior)
    assert torch.allclose(out, prior.clamp(1e-4, 1 - 1e-4), atol=1e-5)  # zero-initialised correction
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    target = torch.zeros(2, 24, 32)
    for _ in range(5):  # the correction is trainable: pushing every value toward 0 lowers them
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy(r(f, p, (24, 32), prior=prior), target).backward()
        opt.step()
    assert r(f, p, (24, 32), prior=prior).mean() < prior.mean() - 0.05
    with pytest.raises(ValueError, match="query grid"):
        r(f, p, (12, 16), prior=prior)


def test_mixture_loss_downweights_unreliable_pixels():
    from segadapt.adapt.losses import mixture_loss, weighted_ce

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    labels = torch.randint(0, 4, (1, 3, 3))
    w = torch.ones(1, 3, 3)
    l1 = mixture_loss(logits, labels, torch.ones(1, 3, 3), w, 255)
    assert torch.allclose(l1, weighted_ce(logits, labels, w, 255), atol=1e-5)  # r = 1: plain CE
    g_full = torch.autograd.grad(l1, logits)[0].abs().sum()
    l0 = mixture_loss(logits, labels, torch.full((1, 3, 3), 0.05), w, 255)
    g_low = torch.autograd.grad(l0, logits)[0].abs().sum()
    assert g_low < 0.5 * g_full
    r = torch.rand(1, 3, 3, requires_grad=True)
    mixture_loss(logits, labels, r, w, 255).backward()
    assert r.grad is None  # stop-gradient on r


def test_class_frequency_weights_lift_rare_classes():
    from segadapt.adapt.pseudo_label import ClassFrequencyWeights

    labels = torch.full((1, 10, 10), 255)
    labels[0, :9] = 0  # 90 pixels of class 0
    labels[0, 9, :9] = 1  # 9 of class 1
    labels[0, 9, 9] = 2  # 1 of class 2; class 3 never appears
    cw = ClassFrequencyWeights(4, power=0.5, momentum=0.5, max_weight=5.0)
    assert torch.equal(cw.class_weights(), torch.ones(4))
    w = cw.update(labels[:, :, :], 255)
    assert w[0] < 1 < w[1] < w[2] and w[2] <= 5.0 and w[3] == 5.0  # rarer = heavier, clipped
    f = torch.tensor([0.9, 0.09, 0.01, 0.0])
    assert torch.allclose((f * w).sum(), torch.tensor(1.0), atol=0.05)  # mean weight over kept pixels ~1 (clip)
    labels[0, 0, 0] = 255
    pw = cw.pixel_weights(labels, 255)
    assert pw.shape == (1, 10, 10) and pw[0, 0, 0] == 0 and torch.isclose(pw[0, 9, 9], w[2])
    cw2 = ClassFrequencyWeights(4, power=0.0)
    cw2.update(labels, 255)
    assert torch.allclose(cw2.class_weights(), torch.ones(4), atol=1e-5)  # power 0: no reweighting


def test_ema_teacher_update_and_dropout_off():
    from segadapt.adapt.teacher import EMATeacher

    torch.manual_seed(0)
    s = tiny_model("segformer")
    t = EMATeacher(s, alpha=0.9)
    assert all(m.p == 0 for m in t.model.modules() if isinstance(m, torch.nn.Dropout))
    before = [p.clone() for p in t.model.parameters()]
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    t.update(s)
    for b, tp, sp in zip(before, t.model.parameters(), s.parameters()):
        assert torch.allclose(tp, 0.9 * b + 0.1 * sp, atol=1e-6)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(t(x), t(x))  # deterministic


def test_class_balanced_thresholds_and_fusion():
    from segadapt.adapt.pseudo_label import class_balanced_thresholds, fuse_dual_head, pseudo_label

    probs = torch.zeros(1, 3, 1, 6)
    conf = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    probs[0, 0, 0, :4] = conf[:4]
    probs[0, 1, 0, 4:] = conf[4:]
    probs[0, 2] = 1 - probs[0, :2].sum(0)
    th = class_balanced_thresholds(probs, fraction=0.5, cap=0.9, floor=0.0)
    assert th[0] == pytest.approx(0.85, abs=1e-6)  # median of 0.95, 0.9, 0.8, 0.7
    assert th[1] == pytest.approx(0.55, abs=1e-6)  # rare class: its own, lower threshold
    assert th[2] == pytest.approx(0.9)  # never predicted: the cap
    lab, mask, _ = pseudo_label(probs, th, 255)
    assert lab[0, 0].tolist() == [0, 0, 255, 255, 1, 255]
    p1 = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    p2 = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    fused, agree = fuse_dual_head(p1, p2)
    assert torch.allclose(fused.sum(1), torch.ones(2, 4, 4))
    assert torch.equal(agree, p1.argmax(1) == p2.argmax(1))


def test_adabn_sets_target_statistics():
    from segadapt.adapt.adabn import adapt_batchnorm

    torch.manual_seed(0)
    m = tiny_model("deeplabv3-mobilenetv2")
    bn = next(x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d))
    conv = m.hf.mobilenet_v2.conv_stem.first_conv.convolution
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    batches = [{"image": imgs[:3]}, {"image": imgs[3:]}]
    adapt_batchnorm(m, batches, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")
    with torch.no_grad():
        feat = conv((imgs.float() / 255 - 0.5) / 0.25)
    assert torch.allclose(bn.running_mean, feat.mean((0, 2, 3)), atol=1e-4)
    assert not m.training


def _tiny_model_with_fixed_source_statistics():
    """A tiny DeepLabV3 whose BatchNorm layers hold source statistics no target batch could produce (7, 3)."""
    torch.manual_seed(0)
    m = tiny_model("deeplabv3-mobilenetv2")
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        b.running_mean.fill_(7.0)
        b.running_var.fill_(3.0)
    return m, bns


def test_adabn_on_the_first_layers_only_keeps_the_source_statistics_deeper():
    from segadapt.adapt.adabn import adapt_batchnorm

    m, bns = _tiny_model_with_fixed_source_statistics()
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    n = adapt_batchnorm(m, [{"image": imgs}], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu", layers=0.5)
    assert n == round(0.5 * len(bns)) and 0 < n < len(bns)
    assert all(not torch.all(b.running_mean == 7.0) for b in bns[:n])  # re-estimated on the target
    assert all(torch.all(b.running_mean == 7.0) and torch.all(b.running_var == 3.0) for b in bns[n:])
    assert all(not b.training for b in bns) and not m.training
    with pytest.raises(ValueError, match="outside"):
        adapt_batchnorm(m, [{"image": imgs}], (0.5,) * 3, (0.25,) * 3, "cpu", layers=1.5)


def test_adabn_alpha_blends_source_and_target_statistics():
    from segadapt.adapt.adabn import adapt_batchnorm

    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    stats = {}
    for alpha in (0.0, 0.25, 1.0):
        m, bns = _tiny_model_with_fixed_source_statistics()
        adapt_batchnorm(m, [{"image": imgs}], (0.5,) * 3, (0.25,) * 3, "cpu", alpha=alpha)
        stats[alpha] = bns[0].running_mean.clone(), bns[0].running_var.clone()
    # alpha 0 keeps the source statistics; alpha 0.25 is exactly (1 - alpha) * source + alpha * AdaBN's statistics
    # (the pass normalises with batch statistics, so every alpha measures the same target statistics)
    assert torch.all(stats[0.0][0] == 7.0) and torch.all(stats[0.0][1] == 3.0)
    assert not torch.allclose(stats[1.0][0], stats[0.0][0])
    assert torch.allclose(stats[0.25][0], 0.75 * 7.0 + 0.25 * stats[1.0][0], atol=1e-5)
    assert torch.allclose(stats[0.25][1], 0.75 * 3.0 + 0.25 * stats[1.0][1], atol=1e-5)
    with pytest.raises(ValueError, match="alpha 1.5 is outside"):
        adapt_batchnorm(m, [{"image": imgs}], (0.5,) * 3, (0.25,) * 3, "cpu", alpha=1.5)


@pytest.fixture()
def adapt_cfg(tiny_checkpoint, tiny, tmp_path):
    return AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                       select="last", steps=3, batch_size=4, num_workers=0, debug_every=2, log_every=1, save_every=2,
                       rectifier=RectifierConfig(warmup_steps=1, inr=True))


def test_adaptation_steps_change_student_and_teacher_is_ema(adapt_cfg):
    from segadapt.adapt.adabn import adapt_batchnorm  # noqa: F401 - documents what the reference below applies
    from segadapt.adapt.models.checkpoint import load_checkpoint, load_training_state
    from segadapt.adapt.engine import adapt

    adapt_cfg.teacher.alpha = 0.5
    adapt_cfg.steps = 1
    s = adapt(adapt_cfg, log=lambda *_: None)
    assert s["steps"] == 1
    out = Path(adapt_cfg.out)
    # reference: AdaBN-only model = the teacher before the step
    ref_cfg = AdaptConfig(**{**adapt_cfg.__dict__, "out": str(out.parent / "ref"), "self_training": False})
    adapt(ref_cfg, log=lambda *_: None)
    t0, _ = load_checkpoint(out.parent / "ref" / "adapted")
    student, _ = load_checkpoint(out / "last")
    teacher, meta = load_checkpoint(out / "adapted")
    changed = 0
    for (n, a), b, c in zip(t0.named_parameters(), student.parameters(), teacher.parameters()):
        assert torch.allclose(c, 0.5 * a + 0.5 * b, atol=1e-6), n
        changed += int(not torch.equal(a, b))
    assert changed > 10  # the student moved
    # the rectifier's anchor is the frozen AdaBN model: saved with the training state, untouched by the step
    anchor = load_training_state(out / "last")["anchor"]
    for n, v in t0.state_dict().items():
        assert torch.equal(anchor[n], v), n
    assert meta.info["command"] == "adapt" and len(meta.info["source_checkpoint_sha256"]) == 64
    cov = [json.loads(line) for line in (out / "coverage.jsonl").read_text().splitlines()]
    assert cov[-1]["step"] == 1 and set(cov[-1]["coverage"]) == set(meta.classes.names)
    assert 0 < cov[-1]["kept"] <= 1
    grid = cv2.imread(str(out / "debug" / "step_000001.png"))
    assert grid.shape[1] == 3 * 128  # image | pseudo-label | rectification map, at the 96x128 input size


@pytest.mark.parametrize("seco", [False, True], ids=["plain", "seco"])
def test_adapt_never_reads_target_labels(adapt_cfg, monkeypatch, seco):
    import segadapt.adapt.data.datasets as dsmod
    from segadapt.adapt.config import SecoConfig
    from segadapt.adapt.engine import adapt

    if seco:  # SeCo's pass (methods.md 3) labels the frames itself and must not open target labels either
        adapt_cfg.seco = SecoConfig(enabled=True, scc_iterations=5, scc_batch=8, scc_crop=(32, 64))

    opened = []
    real = cv2.imread

    def spy(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(dsmod.cv2, "imread", spy)

    def no_labels(*a, **k):
        raise AssertionError("read_label called during adaptation")

    monkeypatch.setattr(dsmod, "read_label", no_labels)
    adapt(adapt_cfg, log=lambda *_: None)
    assert opened, "the spy saw no reads"
    assert all("/labels/" not in p for p in opened)
    assert (Path(adapt_cfg.target) / "labels").is_dir()  # the labels were there to be (not) read
    assert any("/seco_labels/" in p for p in opened) == seco  # the training frames carried SeCo's own labels


def test_adapt_resume_and_depth_path(adapt_cfg, kitti, tmp_path):
    from segadapt.adapt.models.checkpoint import load_training_state
    from segadapt.adapt.engine import adapt

    adapt(adapt_cfg, log=lambda *_: None)
    anchor_before = load_training_state(Path(adapt_cfg.out) / "last")["anchor"]
    adapt_cfg.steps, adapt_cfg.resume = 4, True
    adapt_cfg.rectifier.photometric_consistency = True  # the extra teacher pass for the rectifier's target
    msgs = []
    s = adapt(adapt_cfg, log=msgs.append)
    assert any("resuming" in m for m in msgs) and s["steps"] == 4
    st = load_training_state(Path(adapt_cfg.out) / "last")
    assert st["step"] == 4
    assert all(torch.equal(st["anchor"][k], v) for k, v in anchor_before.items())  # restored, not re-estimated
    # class-frequency loss weights (on by default) keep their running frequencies in the training state
    assert st["class_weights"]["freq"].shape == (11,) and abs(float(st["class_weights"]["freq"].sum()) - 1) < 1e-4
    # RGB-D auxiliary stream on real stereo
    cfg = AdaptConfig(checkpoint=adapt_cfg.checkpoint, target=str(kitti / "image_2"), out=str(tmp_path / "kd"),
                      select="last", size=(96, 320), steps=2, batch_size=2, num_workers=0, debug_every=1,
                      depth=DepthConfig(provider="stereo", right_dir=str(kitti / "image_3")))
    s = adapt(cfg, log=lambda *_: None)
    assert "loss_cross_modal" in s["last_losses"] and "rgbd_stream" in s["methods"]
    st = load_training_state(tmp_path / "kd" / "last")
    # the RGB-D stem (depth + validity inputs, their own parameter) was trained
    rgbd = st["components"]["rgbd_stream"]["model"]
    assert any(k.endswith("original1") and v.shape[1] == 2 for k, v in rgbd.items())
    grid = cv2.imread(str(tmp_path / "kd" / "debug" / "step_000001.png"))
    assert grid.shape[1] == 4 * 320  # image | labels | rectification | depth


def test_adapt_on_video_and_cli(tiny_checkpoint, video_path, tmp_path, capsys):
    from segadapt.cli import main

    rc = main(["adapt", "--checkpoint", str(tiny_checkpoint), "--target", str(video_path), "--out",
               str(tmp_path / "v"), "--steps", "2", "--batch-size", "2", "--num-workers", "0",
               "--video-stride", "50", "--rectifier.enabled", "false"])
    assert rc == 0
    s = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert s["steps"] == 2 and "rectifier" not in s["methods"]
    rc = main(["adapt", "--checkpoint", str(tiny_checkpoint), "--target", str(tmp_path / "none"), "--out",
               str(tmp_path / "x")])
    assert rc == 2 and "none" in capsys.readouterr().err


def test_load_run_rebuilds_the_anchor_with_the_one_adabn_function(adapt_cfg):
    """A run without a saved anchor gets the source model after AdaBN rebuilt by the function the loop uses
    (:func:`~segadapt.adapt.adabn.adabn_source_model`), equal to an AdaBN-only run's model."""
    from segadapt.adapt.models.checkpoint import load_checkpoint
    from segadapt.adapt.engine import adapt
    from segadapt.adapt.methods.rectifier import load_run

    adapt_cfg.steps = 1
    adapt_cfg.rectifier.enabled = False  # nothing keeps the anchor: load_run must rebuild it
    adapt(adapt_cfg, log=lambda *_: None)
    ref = AdaptConfig(**{**adapt_cfg.__dict__, "out": str(Path(adapt_cfg.out).parent / "ref"), "self_training": False})
    adapt(ref, log=lambda *_: None)
    adabn, _ = load_checkpoint(Path(ref.out) / "adapted")
    teacher, anchor, rect, meta, _ = load_run(adapt_cfg.out)
    assert rect is None and anchor is not None and not teacher.training
    for k, v in adabn.state_dict().items():
        assert torch.allclose(anchor.state_dict()[k].float(), v.float(), atol=1e-5), k
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        load_run(Path(adapt_cfg.out).parent / "nothing")
