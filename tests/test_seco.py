"""SeCo's pseudo-label pass (methods.md 3): PSA purity rule, SCC median-loss drop, merge modes, SAM regions from a
tiny random local model (no download), the fixed labels through the transforms and in ``segadapt adapt``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segadapt.adapt.methods.seco.regions import paint_by_purity, psa_masks, psa_superpixels
from segadapt.adapt.methods.seco.scc import apply_decisions, extract_components, scc_decisions

IGN = 9  # ignore id for the hand-built maps (classes 0..3: 0, 1 stuff; 2, 3 things)
STUFF = [True, True, False, False]


def test_purity_rule_on_hand_built_counts_and_masks():
    counts = np.array([[2, 0, 8, 0],   # stuff 0 holds 0.2 of the labelled pixels: not above 0.20 -> none
                       [3, 0, 7, 0],   # 0.3 -> stuff 0 (a thing majority does not stop a stuff mask)
                       [0, 0, 0, 0],   # nothing labelled -> none
                       [3, 4, 0, 3]])  # the larger stuff share wins -> stuff 1
    assert paint_by_purity(counts, np.array(STUFF), 0.2).tolist() == [-1, 0, -1, 1]
    assert paint_by_purity(counts, ~np.array(STUFF), 0.5).tolist() == [2, 2, -1, -1]

    lab = np.full((4, 10), IGN)
    lab[0, :3] = 0           # row 0: 3 of 10 labelled pixels are stuff 0, the rest thing 2
    lab[0, 3:] = 2
    lab[1, :2] = 0           # row 1: 2 of 10 -> below the rule
    lab[1, 2:] = 3
    lab[3, 0] = 1            # row 3: labelled, but no mask covers it -> ignore in the output
    rows = [np.zeros((4, 10), bool) for _ in range(3)]
    rows[0][0], rows[1][1] = True, True
    rows[2][2, 5:], rows[2][0, 5:] = True, True  # 5 labelled pixels, all thing 2: no stuff class passes
    thing = np.zeros((4, 10), bool)
    thing[0, 8:] = True      # a thing prompt mask overwrites the stuff
    out = psa_masks(rows, [(2, thing)], lab, STUFF, IGN, purity=0.2)
    assert out[0, :8].tolist() == [0] * 8 and out[0, 8:].tolist() == [2, 2]
    assert (out[1] == IGN).all() and (out[2] == IGN).all() and (out[3] == IGN).all()
    rows[2][:] = False
    rows[2][3, 0], rows[2][0, 3:6] = True, True  # stuff 1 at 1 of 4 labelled pixels (0.25): paints over mask 0
    out = psa_masks(rows, [(2, thing)], lab, STUFF, IGN, purity=0.2)
    assert out[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 2, 2] and out[3, 0] == 1
    assert psa_masks(rows, [], lab, STUFF, IGN, purity=0.25)[0].tolist() == [0] * 10  # 0.25 is not above 0.25


def test_superpixel_psa_paints_regions_by_purity():
    regions = np.repeat(np.arange(4), 5)[None].repeat(3, 0)  # 3 x 20, four 3 x 5 regions
    lab = np.full((3, 20), IGN)
    lab[0, 0:2] = 0                 # region 0: stuff 0 at 2 of 2 labelled -> whole region 0
    lab[0, 5], lab[1, 5:9] = 1, 2   # region 1: thing 2 at 4 of 5 (> 0.5) overwrites stuff 1 (0.2, not above)
    lab[0, 10:12], lab[0, 12:15] = 1, 3  # region 2: stuff 1 at 0.4; thing 3 at 0.6 -> thing 3
    lab[0, 15], lab[0, 16:18] = 0, 2     # region 3: stuff 0 at 1/3 > 0.2, thing 2 at 2/3 -> thing 2 overwrites
    out = psa_superpixels(regions, lab, STUFF, IGN, purity=0.2, thing_purity=0.7)
    assert (out[:, 0:5] == 0).all()
    assert (out[:, 5:10] == 2).all()       # 0.8 > 0.7
    assert (out[:, 10:15] == 1).all()      # thing 3 at 0.6 is below 0.7: the stuff rule (0.4 > 0.2) holds
    assert (out[:, 15:20] == 0).all()      # thing 2 at 0.67 < 0.7 -> stuff 0 at 0.33
    out = psa_superpixels(regions, lab, STUFF, IGN, purity=0.5, thing_purity=0.5)
    assert (out[:, 10:15] == 3).all() and (out[:, 15:20] == 2).all()


def test_psa_keeps_thin_thing_pixels_inside_stuff_regions():
    """``keep_things``: a one-pixel-wide thing (a pole) labelled inside a region that the stuff rule paints keeps
    its class; without it the region absorbs it (both region sources)."""
    regions = np.zeros((4, 6), np.int64)  # one region
    lab = np.full((4, 6), 0)  # stuff 0 everywhere ...
    lab[:, 2] = 2  # ... and a thin thing 2 (4 of 24 pixels, under thing_purity)
    plain = psa_superpixels(regions, lab, STUFF, IGN, purity=0.2, thing_purity=0.5)
    kept = psa_superpixels(regions, lab, STUFF, IGN, purity=0.2, thing_purity=0.5, keep_things=True)
    assert (plain == 0).all()
    assert (kept[:, 2] == 2).all() and (np.delete(kept, 2, axis=1) == 0).all()
    mask = np.ones((4, 6), bool)
    assert (psa_masks([mask], [], lab, STUFF, IGN)[:, 2] == 0).all()
    assert (psa_masks([mask], [], lab, STUFF, IGN, keep_things=True)[:, 2] == 2).all()


def test_scc_median_loss_drop_on_hand_built_components():
    preds = np.array([0, 0, 0, 0, 1, 1, 1])
    labels = np.array([0, 0, 1, 0, 1, 0, 1])
    losses = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 1.0, 3.0])
    # both_loss: t_0 = median(.1 .2 .3 .35) = .25, t_1 = median(.8 1 3) = 1, global = (4 * .25 + 3 * 1) / 7 = .571:
    # only 3.0 exceeds both its class median and the global one (.3 and .35 exceed t_0 only)
    assert scc_decisions(losses, labels, preds, "both_loss").tolist() == [0, 0, 0, 0, 1, 1, -1]
    assert scc_decisions(losses, labels, preds, "both_loss", relabel=False).tolist() == [0, 0, 1, 0, 1, 0, -1]
    # class_median by PSA label: label 0 (.1 .2 .35 1.0) median .275 drops .35 and 1.0; label 1 (.3 .8 3) drops 3
    assert scc_decisions(losses, labels, preds, "class_median").tolist() == [0, 0, 0, -1, 1, -1, -1]
    with pytest.raises(ValueError, match="unknown SCC rule"):
        scc_decisions(losses, labels, preds, "mean")

    lab = np.full((6, 8), IGN)
    lab[0:2, 0:2] = 0        # component 0
    lab[4:6, 6:8] = 0        # component 1 (same class, not connected)
    lab[2:4, 3:5] = 1        # component 2
    lab[5, 0] = 1            # component 3, one pixel (no minimum area)
    comps = extract_components([lab], 4, IGN)
    assert len(comps) == 4 and sorted(comps.area.tolist()) == [1, 4, 4, 4]
    assert comps.cls.tolist() == [0, 0, 1, 1]
    new = np.array([0, -1, 3, 1])  # keep, drop, relabel, keep
    out = apply_decisions(comps, new, IGN)[0]
    assert (out[0:2, 0:2] == 0).all() and (out[4:6, 6:8] == IGN).all() and (out[2:4, 3:5] == 3).all()
    assert out[5, 0] == 1 and (out[lab == IGN] == IGN).all()


def test_scc_classifier_gives_mislabelled_components_higher_early_loss():
    """Early-loss statistics on a synthetic set: red squares are class 0, blue ones class 1, and a fifth of the
    components carry the wrong PSA class; after a brief training their mean loss is above the clean ones'."""
    from segadapt.adapt.methods.seco.scc import train_and_score

    rng = np.random.default_rng(0)
    images, maps = [], []
    for f in range(8):
        img = np.full((48, 64, 3), 90, np.uint8)
        lab = np.full((48, 64), IGN)
        for k in range(4):
            y, x = 4 + 22 * (k // 2), 4 + 30 * (k % 2)
            c = int(rng.integers(0, 2))
            img[y:y + 16, x:x + 20] = (200, 30, 30) if c == 0 else (30, 30, 200)
            lab[y:y + 16, x:x + 20] = c
        images.append(img)
        maps.append(lab)
    comps = extract_components(maps, 2, IGN)
    true = comps.cls.copy()
    noisy = rng.random(len(comps)) < 0.2
    comps.cls = np.where(noisy, 1 - true, true)
    losses, preds = train_and_score(images, comps, 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_hw=(32, 64),
                                    iterations=40, batch=16, lr=0.01)
    assert noisy.any() and losses[noisy].mean() > losses[~noisy].mean()
    assert (preds == true).mean() > 0.8


def test_merge_modes():
    from segadapt.adapt.methods.seco.labels import merge_fixed

    labels = torch.tensor([[[0, 1, IGN, IGN]]])
    mask = labels != IGN
    weights = torch.tensor([[[0.5, 2.0, 0.0, 0.0]]])
    fixed = torch.tensor([[[0, 2, 3, IGN]]])
    lab, m, w = merge_fixed(labels, mask, weights, fixed, "fill", 0.7, IGN)
    assert lab.tolist() == [[[0, 1, 3, IGN]]] and m.tolist() == [[[True, True, True, False]]]
    assert torch.allclose(w, torch.tensor([[[0.5, 2.0, 0.7, 0.0]]]))
    lab, m, w = merge_fixed(labels, mask, weights, fixed, "agree", 0.7, IGN)
    assert lab.tolist() == [[[0, IGN, IGN, IGN]]] and m.tolist() == [[[True, False, False, False]]]
    assert torch.allclose(w, torch.tensor([[[0.5, 0.0, 0.0, 0.0]]]))
    lab, m, w = merge_fixed(labels, mask, weights, fixed, "replace", 0.7, IGN)
    assert lab.tolist() == [[[0, 2, 3, IGN]]] and m.tolist() == [[[True, True, True, False]]]
    assert torch.allclose(w, torch.tensor([[[0.7, 0.7, 0.7, 0.0]]]))
    with pytest.raises(ValueError, match="seco.merge"):
        merge_fixed(labels, mask, weights, fixed, "union", 1.0, IGN)


def test_fixed_labels_follow_crop_padding_and_flip(tmp_path):
    import cv2

    from segadapt.adapt.data.datasets import Sample
    from segadapt.adapt.data.transforms import train_transform
    from segadapt.adapt.methods.seco.labels import FixedLabels

    h, w = 12, 16
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    cv2.imwrite(str(tmp_path / "f.png"), cols)  # fixed label = the column index
    img = np.stack([cols * 10] * 3, -1).astype(np.uint8)
    t = FixedLabels(tmp_path, train_transform((14, 18), None, (1.0, 1.0), IGN))  # crop larger than the frame: pads
    seen_flip = seen_plain = False
    for _ in range(20):
        s = t(Sample(image=img.copy(), name="f"))
        fl, im = s.fixed_pseudo_label, s.image[..., 0].astype(int)
        assert fl.shape == (14, 18)
        real = s.valid if s.valid is not None else np.ones_like(fl, bool)
        assert (fl[~real] == IGN).all() and real.sum() == h * w
        assert (fl[real] * 10 == im[real]).all()  # the label moved with the image
        flipped = fl[real].reshape(h, w)[0, 0] == w - 1
        seen_flip |= bool(flipped)
        seen_plain |= not flipped
    assert seen_flip and seen_plain


def _tiny_sam(directory: Path) -> Path:
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig, SamPromptEncoderConfig,
                                                           SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vc = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, output_channels=16,
                         image_size=128, patch_size=16, global_attn_indexes=[1], window_size=4, num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=128, patch_size=16, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                              iou_head_hidden_dim=16)
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=vc.to_dict(), prompt_encoder_config=pc.to_dict(),
                               mask_decoder_config=mc.to_dict()))
    with torch.no_grad():  # random init gives mask logits of ~1e-5; scale them to a trained model's order (~10)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(1e6)
    model.save_pretrained(directory)
    ip = SamImageProcessorPil(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    SamProcessor(image_processor=ip).save_pretrained(directory)
    return directory


def test_tiny_random_sam_from_a_local_directory_produces_regions(tmp_path):
    from segadapt.adapt.methods.seco.regions import SamRegions, thing_prompts

    sam = SamRegions(_tiny_sam(tmp_path / "sam"))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    lab = np.full((48, 64), IGN)
    lab[:20] = 0
    lab[30:40, 10:25] = 2
    lab[30:42, 40:50] = 3
    prompts = thing_prompts(lab, 2, 4, IGN)
    assert len(prompts) == 1
    (x0, y0, x1, y1), pts = prompts[0]
    assert x0 < 10 and y0 < 30 and x1 > 24 and y1 > 39  # the unclipped box encloses the component
    assert all(lab[int(y), int(x)] == 2 for x, y in pts)
    emb = sam.embed(img)
    auto = sam.auto_masks(img, emb, points_per_side=4, iou_thresh=-1.0, stability_thresh=0.0)
    assert auto and all(m.shape == (48, 64) and m.dtype == bool for m in auto)
    assert [int(m.sum()) for m in auto] == sorted((int(m.sum()) for m in auto), reverse=True)
    out, n = sam.psa(img, lab, STUFF, IGN, points_per_side=4, iou_thresh=-1.0, stability_thresh=0.0)
    assert n >= len(auto) + 2 and out.shape == lab.shape and (out != IGN).any()
    with pytest.raises(FileNotFoundError, match="sam-dir"):
        SamRegions(tmp_path / "missing")


def test_stuff_flags_default_for_camvid_and_from_the_class_file(tiny_classes):
    from segadapt.runtime.classes import ClassInfo

    flags = dict(zip(tiny_classes.names, tiny_classes.stuff_flags()))
    assert flags["Road"] and flags["Sky"] and flags["Tree"] and not flags["Car"] and not flags["Pedestrian"]
    d = tiny_classes.to_dict()
    assert "stuff" not in d  # backward compatible: nothing new unless given
    d["stuff"] = [False] * len(tiny_classes.names)
    c = ClassInfo.from_dict(d)
    assert c.stuff_flags() == (False,) * 11 and ClassInfo.from_dict(c.to_dict()).stuff == c.stuff
    with pytest.raises(ValueError, match="stuff"):
        ClassInfo(("Road", "Widget"), ((0, 0, 0), (1, 1, 1)), 255).stuff_flags()
    with pytest.raises(ValueError, match="flags"):
        ClassInfo(("Road",), ((0, 0, 0),), 255, stuff=(True, False))


def test_adapt_with_seco_writes_reuses_and_trains_on_the_labels(tiny_checkpoint, tiny, tmp_path):
    from segadapt.adapt.config import AdaptConfig, RectifierConfig, SecoConfig
    from segadapt.adapt.engine import adapt

    cfg = AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                      select="last", steps=1, batch_size=4, num_workers=0, debug_every=0, log_every=1, save_every=1,
                      rectifier=RectifierConfig(enabled=False),
                      seco=SecoConfig(enabled=True, scc_iterations=5, scc_batch=8, scc_crop=(32, 64), merge="replace"))
    logs = []
    adapt(cfg, log=logs.append)
    d = Path(cfg.out) / "seco_labels"
    pngs = sorted(d.glob("*.png"))
    assert len(pngs) == len(list((tiny / "target" / "images").iterdir()))
    meta = json.loads((d / "seco.json").read_text())
    assert meta["stats"]["region_source"] == "superpixels:slic" and meta["stats"]["components"] > 0
    assert 0 < meta["stats"]["coverage"] <= meta["stats"]["coverage_psa"]
    cov = [json.loads(x) for x in (Path(cfg.out) / "coverage.jsonl").read_text().splitlines()]
    assert cov[-1]["kept"] > 0  # replace mode: the step trained on SeCo's labels
    first = {p.name: p.read_bytes() for p in pngs}
    logs.clear()
    cfg.out = str(tmp_path / "ad")
    adapt(cfg, log=logs.append)
    assert any("reusing" in x for x in logs) and {p.name: p.read_bytes() for p in d.glob("*.png")} == first
    cfg.seco.purity = 0.5
    logs.clear()
    adapt(cfg, log=logs.append)
    assert any("rebuilding" in x for x in logs)
