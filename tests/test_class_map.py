"""Scoring across class sets (``segadapt evaluate --map``) and sizes at the target's aspect (``--keep-aspect``)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.adapt.class_map import ClassMap, evaluation_mapping, load_class_map
from segadapt.adapt.data import cityscapes as cs
from segadapt.cli import main
from segadapt.runtime.classes import ClassInfo, default_palette

# CamVid-11 class -> one Cityscapes-19 class it comes from (the built-in map sends each of these back to it)
CAMVID_TO_CS19 = {"Sky": "sky", "Building": "building", "Pole": "pole", "Road": "road", "Pavement": "sidewalk",
                  "Tree": "vegetation", "SignSymbol": "traffic sign", "Fence": "fence", "Car": "car",
                  "Pedestrian": "person", "Bicyclist": "bicycle"}


def cs19() -> ClassInfo:
    names = cs.train_class_names()
    return ClassInfo(tuple(names), tuple(tuple(p) for p in default_palette(len(names))), 255)


class FixedPredictions(torch.nn.Module):
    """A 'segmenter' whose logits are one-hot maps of given predictions, one frame per call (batch size 1)."""

    def __init__(self, preds, k):
        super().__init__()
        self.preds, self.k, self.i = preds, k, 0

    def forward(self, x):
        p = torch.as_tensor(self.preds[self.i])
        self.i += 1
        return torch.nn.functional.one_hot(p, self.k).permute(2, 0, 1)[None].float() * 10


def _split(root, images, labels, classes: ClassInfo):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / "images" / f"f{i}.png")
        Image.fromarray(lab.astype(np.uint8)).save(root / "labels" / f"f{i}.png")
    (root / "classes.json").write_text(json.dumps(classes.to_dict()))
    return root


def test_cityscapes19_predictions_scored_on_camvid_labels(tmp_path, camvid):
    """Forward direction, worked by hand: truck counts as Car; terrain and wall (no CamVid counterpart) are wrong."""
    from segadapt.adapt.data.datasets import LabeledImageFolder
    from segadapt.adapt.evaluate import evaluate

    camvid_cls = ClassInfo.load(camvid / "classes.json")
    cv = {n: i for i, n in enumerate(camvid_cls.names)}
    c19 = {n: i for i, n in enumerate(cs.train_class_names())}
    lab = np.array([[cv["Road"]] * 4, [cv["Car"]] * 4, [cv["Tree"]] * 4, [cv["Sky"], cv["Sky"], 11, 11]])
    pred = np.array([[c19["road"]] * 4,
                     [c19["car"], c19["truck"], c19["bus"], c19["road"]],
                     [c19["vegetation"], c19["vegetation"], c19["terrain"], c19["terrain"]],
                     [c19["wall"], c19["sky"], c19["sky"], c19["train"]]])
    ds = LabeledImageFolder(_split(tmp_path / "s", [np.zeros((4, 4, 3), np.uint8)], [lab], camvid_cls))
    mapping = evaluation_mapping(load_class_map("cityscapes-camvid11"), cs19(), camvid_cls)
    assert mapping.direction == "predictions -> labels"
    assert set(mapping.unscored) == {"wall", "terrain", "train"}
    m = evaluate(FixedPredictions([pred], 19), ds, (0, 0, 0), (1, 1, 1), batch_size=1, mapping=mapping)
    iou = dict(zip(m["classes"], m["iou"]))
    assert iou["Road"] == pytest.approx(100 * 4 / 5)  # 4 right, 1 Car pixel predicted road
    assert iou["Car"] == pytest.approx(100 * 3 / 4)
    assert iou["Tree"] == pytest.approx(100 * 2 / 4)  # terrain: a miss, no false positive anywhere
    assert iou["Sky"] == pytest.approx(100 * 1 / 2)  # wall on sky is a miss; sky on ignore is not counted
    assert iou["Fence"] is None  # never labelled, never predicted
    assert m["miou"] == pytest.approx(np.mean([80, 75, 50, 50]))
    assert m["pixel_acc"] == pytest.approx(100 * 10 / 14)


def test_camvid_model_scored_on_cityscapes_labels_through_the_map(tiny_checkpoint, tiny, camvid, tmp_path, capsys):
    """Backward direction with a real model: CamVid labels rewritten as Cityscapes-19 train ids score exactly as the
    CamVid labels themselves (the map sends each of those Cityscapes classes back)."""
    from segadapt.adapt.evaluate import evaluate_checkpoint

    camvid_cls = ClassInfo.load(camvid / "classes.json")
    c19 = {n: i for i, n in enumerate(cs.train_class_names())}
    lut = np.full(256, 255, np.uint8)
    for i, n in enumerate(camvid_cls.names):
        lut[i] = c19[CAMVID_TO_CS19[n]]
    files = sorted((tiny / "target" / "labels").iterdir())[:6]
    imgs = [np.array(Image.open(tiny / "target" / "images" / f.name)) for f in files]
    labs = [np.array(Image.open(f)) for f in files]
    cs_split = _split(tmp_path / "cs", imgs, [lut[a] for a in labs], cs19())
    cv_split = _split(tmp_path / "cv", imgs, labs, camvid_cls)
    plain = evaluate_checkpoint(tiny_checkpoint, cv_split, progress=False)
    rc = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(cs_split), "--map",
               "cityscapes-camvid11", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    mapped = json.loads((tmp_path / "m.json").read_text())
    assert mapped["map"]["direction"] == "labels -> predictions" and mapped["classes"] == list(camvid_cls.names)
    assert mapped["iou"] == pytest.approx(plain["iou"]) and mapped["miou"] == pytest.approx(plain["miou"])
    assert "labels -> predictions" in capsys.readouterr().out
    # a map that covers neither side is refused in one line, before the model loads
    (tmp_path / "bad.json").write_text(json.dumps({"map": {"road": "Road"}}))
    rc = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(cs_split), "--map",
               str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.json" in err and "cover neither" in err and len(err.strip().splitlines()) == 1


def test_map_rules():
    camvid = ClassInfo(tuple(CAMVID_TO_CS19), tuple(tuple(p) for p in default_palette(11)), 11)
    with pytest.raises(ValueError, match="not classes of the labels"):
        evaluation_mapping(ClassMap({**{n: "road" for n in map(str.lower, camvid.names)}, "road": "Roads"}, "m"),
                           camvid, cs19())
    # identical class sets: forward; unmapped (null) model classes count as wrong, unreached label classes ignored
    m = evaluation_mapping(ClassMap({n.lower(): (None if n == "Sky" else n.lower()) for n in camvid.names}, "m"),
                           camvid, camvid)
    assert m.direction == "predictions -> labels" and m.unscored == ("Sky", "Sky")
    assert m.pred_lut[0] == 10 and m.label_lut[0] == 255 and m.label_lut[11] == 255 and m.pred_lut[3] == 2


def test_keep_aspect_for_evaluate_and_adapt(tiny_checkpoint, shared_data, tmp_path):
    """KITTI frames (621x187, 3.3:1) with a 96x128 CamVid model: --keep-aspect 96 runs at 96x320 (stride 16)."""
    from segadapt.adapt.aspect import keep_aspect_size
    from segadapt.adapt.config import AdaptConfig, RectifierConfig
    from segadapt.adapt.evaluate import evaluate_checkpoint
    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.adapt.engine import adapt

    assert keep_aspect_size(120, 621 / 187, 16) == (120, 400) and keep_aspect_size(120, 0.5, 8) == (240, 120)
    src = shared_data / "kitti-semantics" / "target_adapt"
    split = tmp_path / "k"
    for sub in ("images", "labels"):
        (split / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:4]:
            shutil.copy(f, split / sub / f.name)
    shutil.copy(src / "classes.json", split / "classes.json")
    m = evaluate_checkpoint(tiny_checkpoint, split, keep_aspect=96, progress=False)
    assert m["size"] == [96, 320] and m["num_images"] == 4
    with pytest.raises(ValueError, match="exclude each other"):
        evaluate_checkpoint(tiny_checkpoint, split, size=(96, 320), keep_aspect=96, progress=False)
    cfg = AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(split), out=str(tmp_path / "ad"), keep_aspect=96,
                      select="last", steps=2, batch_size=2, num_workers=0, debug_every=0, save_every=2,
                      rectifier=RectifierConfig(enabled=False))
    s = adapt(cfg, log=lambda *_: None)
    assert s["size"] == [96, 320]
    _, meta = load_segmenter(tmp_path / "ad" / "adapted")
    assert tuple(meta.input_size) == (96, 320)  # evaluate's default size for the adapted model
    rc = main(["adapt", "--print-config", "--keep-aspect", "96", "--size", "96", "320"])
    assert rc == 2


def test_pipeline_adapts_and_scores_the_target_at_its_aspect(tiny_checkpoint, tiny, shared_data, camvid, tmp_path):
    """--keep-aspect: adaptation and the target's evaluation at 96x320 on KITTI frames; source_val at the model's
    own size; report and summary say which size was used."""
    import os

    from segadapt.pipeline import PipelineConfig, run_pipeline

    d = tmp_path / "data"
    (d / "target_adapt").mkdir(parents=True)
    os.symlink(tiny / "source", d / "source_val")
    os.symlink(camvid / "classes.json", d / "classes.json")
    src = shared_data / "kitti-semantics" / "target_adapt"
    for sub in ("images", "labels"):
        (d / "target_adapt" / sub).mkdir()
        for f in sorted((src / sub).iterdir())[:3]:
            os.symlink(f, d / "target_adapt" / sub / f.name)
    cfg = PipelineConfig(data=str(d), out=str(tmp_path / "run"), source_checkpoint=str(tiny_checkpoint),
                         size=(96, 128), keep_aspect=96, adapt_steps=2, until="evaluate", device="cpu")
    rep = run_pipeline(cfg, log=lambda *_: None)
    assert rep["adapt_size"] == [96, 320] and rep["size"] == [96, 128]
    metrics = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "run" / "metrics").glob("*.json")}
    assert metrics["source_only_target_adapt"]["size"] == [96, 320] == metrics["adapted_target_adapt"]["size"]
    assert metrics["source_only_source_val"]["size"] == [96, 128]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["adapt_size"] == [96, 320]
    assert "[96, 320]" in (tmp_path / "run" / "report.md").read_text()
