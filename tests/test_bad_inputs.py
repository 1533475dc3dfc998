"""Bad inputs to every command: one line ``error: ...`` naming the file or flag, exit 2, before any model loads.

The commands run in-process (``segadapt.cli.main``). Every module that would build or load a model, or start the
work, is replaced by a stand-in that fails the test when touched (:func:`no_work`), so each case also proves that the
problem was found first. The inputs are real frames of ``../shared/data`` copied into a temporary folder and then
damaged; checkpoints and ONNX graphs are small stand-ins with the real file formats (a safetensors file, an ONNX
graph with metadata), which is all the checks read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from segadapt.cli import main

IMPL_MODULES = ("segadapt.adapt.train_source", "segadapt.adapt.engine", "segadapt.adapt.evaluate",
                "segadapt.adapt.metrics", "segadapt.adapt.models.checkpoint", "segadapt.adapt.models.segmenter",
                "segadapt.export.onnx_export", "segadapt.export.bench", "segadapt.export.tensorrt_build",
                "segadapt.export.triton", "segadapt.demo.app", "segadapt.adapt.data.camvid")


def _stand_in(name: str) -> types.ModuleType:
    m = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def called(*a, **k):
            raise AssertionError(f"{name}.{attr} ran before the inputs were checked")
        return called
    m.__getattr__ = __getattr__
    return m


@pytest.fixture()
def no_work(monkeypatch):
    """Every implementation module (training, adaptation, evaluation, export, bench, demo, model building and
    loading) is a stand-in that fails when used; so are the runtime's Predictor and backends."""
    for name in IMPL_MODULES:
        monkeypatch.setitem(sys.modules, name, _stand_in(name))
    import segadapt.pipeline as pl
    import segadapt.runtime.backends as be
    import segadapt.runtime.predictor as pr

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(pr.Predictor, "__init__", boom)
    monkeypatch.setattr(pr, "open_backend", boom)
    monkeypatch.setattr(be, "open_backend", boom)
    monkeypatch.setattr(pl, "run_pipeline", boom)


# -- the world of inputs ---------------------------------------------------------------------------------------

def _fake_checkpoint(d: Path, names, weights_k=None, bias_elems: int = 0) -> Path:
    """A checkpoint folder with the real file formats: config.json and a safetensors file with a classifier."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True)
    k = len(names)
    wk = weights_k or k
    cfg = {"format": "segadapt-checkpoint", "format_version": 1, "arch": "deeplabv3-mobilenetv2", "in_channels": 3,
           "output_stride": 16, "hf_config": {"model_type": "mobilenet_v2", "id2label": {str(i): n for i, n in
                                                                                       enumerate(names)}},
           "classes": list(names), "palette": [[i * 20, 0, 0] for i in range(k)], "ignore_index": 11 if k <= 11
           else 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": [96, 128],
           "info": {}}
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = {"hf.segmentation_head.classifier.convolution.bias": np.zeros(wk, np.float32),
               "hf.segmentation_head.classifier.convolution.weight": np.zeros((wk, 8, 1, 1), np.float32)}
    if bias_elems:
        tensors["hf.backbone.big"] = np.zeros(bias_elems, np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def _onnx_model(path: Path, names, sidecar_names=None) -> Path:
    """A tiny ONNX graph (uint8 NHWC in, uint8 class map out) with segadapt metadata inside and beside it."""
    import onnx
    from onnx import TensorProto, helper

    from segadapt.runtime.metadata import ModelMetadata, metadata_path

    x = helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 96, 128, 3])
    y = helper.make_tensor_value_info("class_map", TensorProto.UINT8, [1, 96, 128])
    node = helper.make_node("ReduceMax", ["images"], ["class_map"], axes=[3], keepdims=0)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])

    def meta(ns):
        return ModelMetadata(classes=list(ns), palette=[[i, i, i] for i in range(len(ns))], ignore_index=255,
                             input_size=(96, 128))
    e = model.metadata_props.add()
    e.key, e.value = "segadapt", json.dumps(meta(names).to_dict())
    onnx.save(model, str(path))
    meta(sidecar_names or names).save(metadata_path(path))
    return path


def _copy_split(src: Path, dst: Path, n: int = 3) -> Path:
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:n]:
            shutil.copy(f, dst / sub / f.name)
    return dst


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.fixture(scope="module")
def w(tmp_path_factory, camvid, tiny, video_path):
    """Paths of good and damaged inputs (module scope: made once, about a second)."""
    root = tmp_path_factory.mktemp("bad")
    names = json.loads((camvid / "classes.json").read_text())["classes"]
    p = {"root": root}
    data = root / "data"
    for split in ("train", "val", "label_value", "label_size", "zero_img", "trunc_img", "no_label"):
        _copy_split(tiny / "source", data / split)
    shutil.copy(camvid / "classes.json", data / "classes.json")
    p["data"] = data
    lab = _first(data / "label_value" / "labels")
    a = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
    a[0, 0] = 40
    cv2.imwrite(str(lab), a)
    p["label_value"] = lab
    lab = _first(data / "label_size" / "labels")
    cv2.imwrite(str(lab), cv2.resize(cv2.imread(str(lab), cv2.IMREAD_UNCHANGED), (80, 60),
                                     interpolation=cv2.INTER_NEAREST))
    p["label_size"] = lab
    img = _first(data / "zero_img" / "images")
    img.write_bytes(b"")
    p["zero_img"] = img
    img = _first(data / "trunc_img" / "images")
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    p["trunc_img"] = img
    lab = _first(data / "no_label" / "labels")
    lab.unlink()
    p["no_label"] = lab
    # a split whose class file names 5 classes (its labels hold ids 0-10: evaluate must say the counts differ)
    five = _copy_split(tiny / "target", root / "five" / "split")
    (root / "five" / "classes.json").write_text(json.dumps({"classes": names[:5], "ignore_index": 11}))
    p["five"] = five
    for kind, text in (("notjson", "{classes: [Sky"), ("dup", json.dumps({"classes": ["Sky", "Sky"]})),
                       ("palette", json.dumps({"classes": ["Sky", "Road"], "palette": [[1, 2, 3]]})),
                       ("ignore", json.dumps({"classes": ["Sky", "Road"], "ignore_index": 1}))):
        d = _copy_split(tiny / "source", root / f"cls_{kind}" / "train")
        shutil.copytree(d, d.parent / "val")
        (d.parent / "classes.json").write_text(text)
        p[f"cls_{kind}"] = d.parent
    # target frames
    tgt = root / "target"
    tgt.mkdir()
    for f in sorted((tiny / "target" / "images").iterdir())[:3]:
        shutil.copy(f, tgt / f.name)
    p["target"] = tgt
    tz = root / "target_zero"
    shutil.copytree(tgt, tz)
    _first(tz).write_bytes(b"")
    p["target_zero"] = _first(tz)
    depth = root / "depth"
    depth.mkdir()
    f0 = _first(tgt)
    cv2.imwrite(str(depth / f0.name), np.ones(cv2.imread(str(f0)).shape[:2], np.uint16))  # only the first frame
    p["depth"] = depth
    # checkpoints
    p["ckpt"] = _fake_checkpoint(root / "ckpt", names)
    p["ckpt5"] = _fake_checkpoint(root / "ckpt5", names[:5], weights_k=11)  # config says 5, weights 11
    p["ckpt7"] = _fake_checkpoint(root / "ckpt7", names[:7])
    p["ckpt_trunc"] = _fake_checkpoint(root / "ckpt_trunc", names)
    wf = p["ckpt_trunc"] / "model.safetensors"
    wf.write_bytes(wf.read_bytes()[:-20])
    p["ckpt_big"] = _fake_checkpoint(root / "ckpt_big", names, bias_elems=1_000_000)  # 4 MB of weights
    # exported models
    p["onnx"] = _onnx_model(root / "m.onnx", names)
    p["onnx5"] = _onnx_model(root / "m5.onnx", names, sidecar_names=names[:5])
    p["onnx_other"] = _onnx_model(root / "other.onnx", names[:5])
    (root / "zero.onnx").write_bytes(b"")
    p["zero_onnx"] = root / "zero.onnx"
    (root / "junk.onnx").write_bytes(os.urandom(2000))
    p["junk_onnx"] = root / "junk.onnx"
    # videos
    data_v = video_path.read_bytes()
    (root / "trunc.mp4").write_bytes(data_v[: len(data_v) * 3 // 10])
    p["trunc_mp4"] = root / "trunc.mp4"
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    p["text_mp4"] = root / "text.mp4"
    (root / "afile").write_text("x")
    p["afile"] = root / "afile"
    (root / "bad.json").write_text("{not json")
    p["bad_json"] = root / "bad.json"
    (root / "nan.json").write_text('{"lr": NaN}')
    p["nan_json"] = root / "nan.json"
    st = root / "run_state"
    st.mkdir()
    (st / "state.json").write_text("{truncated")
    p["bad_state"] = st / "state.json"
    return p


def S(x) -> str:
    return str(x)


# (argv builder, things the message must name); each runs in a fresh no_work
CASES = {
    # train-source
    "train-missing-data": (lambda w: ["train-source", "--data", S(w["root"] / "nope")], ["nope", "--data"]),
    "train-label-value": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "label_value",
                                     "--val-split", "val"], [lambda w: w["label_value"].name, "[40]"]),
    "train-label-size": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "label_size",
                                    "--val-split", "val"], [lambda w: w["label_size"].name, "differs"]),
    "train-zero-byte-image": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "zero_img",
                                         "--val-split", "val"], [lambda w: w["zero_img"].name, "0 bytes"]),
    "train-truncated-image": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "trunc_img",
                                         "--val-split", "val"], [lambda w: w["trunc_img"].name]),
    "train-missing-label": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "no_label",
                                       "--val-split", "val"], [lambda w: w["no_label"].name, "missing"]),
    "train-val-split-missing": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "train",
                                           "--val-split", "valx"], ["valx", "--val-split"]),
    "train-classes-not-json": (lambda w: ["train-source", "--data", S(w["cls_notjson"]), "--train-split", "train",
                                          "--val-split", "val"], ["classes.json", "JSON"]),
    "train-classes-duplicate": (lambda w: ["train-source", "--data", S(w["cls_dup"]), "--train-split", "train",
                                           "--val-split", "val"], ["classes.json", "Sky"]),
    "train-classes-palette": (lambda w: ["train-source", "--data", S(w["cls_palette"]), "--train-split", "train",
                                         "--val-split", "val"], ["classes.json", "palette"]),
    "train-classes-ignore": (lambda w: ["train-source", "--data", S(w["cls_ignore"]), "--train-split", "train",
                                        "--val-split", "val"], ["classes.json", "ignore"]),
    "train-out-is-file": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "train",
                                     "--val-split", "val", "--out", S(w["afile"])], ["afile", "--out"]),
    "train-pretrained-classes": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "train",
                                            "--val-split", "val", "--model.pretrained", S(w["ckpt7"])],
                                 ["ckpt7", "7 classes", "11"]),
    "train-lr-nan": (lambda w: ["train-source", "--lr", "nan"], ["--lr"]),
    "train-size-below-stride": (lambda w: ["train-source", "--data", S(w["data"]), "--train-split", "train",
                                           "--val-split", "val", "--size", "8", "8"], ["--size", "stride"]),
    "train-config-not-json": (lambda w: ["train-source", "--config", S(w["bad_json"])], ["bad.json"]),
    "train-config-nan": (lambda w: ["train-source", "--config", S(w["nan_json"])], ["lr", "finite"]),
    # adapt
    "adapt-ckpt-5-classes": (lambda w: ["adapt", "--checkpoint", S(w["ckpt5"]), "--target", S(w["target"])],
                             ["ckpt5", "5 classes", "11"]),
    "adapt-ckpt-truncated": (lambda w: ["adapt", "--checkpoint", S(w["ckpt_trunc"]), "--target", S(w["target"])],
                             ["model.safetensors", "--checkpoint"]),
    "adapt-ckpt-missing": (lambda w: ["adapt", "--checkpoint", S(w["root"] / "gone"), "--target", S(w["target"])],
                           ["gone", "--checkpoint"]),
    "adapt-ckpt-is-file": (lambda w: ["adapt", "--checkpoint", S(w["afile"]), "--target", S(w["target"])],
                           ["afile", "folder"]),
    "adapt-zero-byte-frame": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target",
                                         S(w["target_zero"].parent)], [lambda w: w["target_zero"].name, "--target"]),
    "adapt-truncated-video": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["trunc_mp4"]),
                                         "--video-max-frames", "0"], ["trunc.mp4", "truncated", "221"]),
    "adapt-text-as-video": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["text_mp4"])],
                            ["text.mp4", "--target"]),
    "adapt-depth-missing": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]),
                                       "--depth", "files", "--depth.directory", S(w["depth"])],
                            ["--depth.directory", "2 of 3"]),
    "adapt-right-views-missing": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]),
                                             "--depth", "stereo", "--depth.right-dir", S(w["root"] / "R")],
                                  ["--depth.right-dir"]),
    "adapt-fraction-2": (lambda w: ["adapt", "--pseudo.fraction", "2"], ["--pseudo.fraction", "[0, 1]"]),
    "adapt-steps-negative": (lambda w: ["adapt", "--steps", "-5"], ["--steps", ">= 1"]),
    "adapt-batch-0": (lambda w: ["adapt", "--batch-size", "0"], ["--batch-size"]),
    "adapt-max-minutes-inf": (lambda w: ["adapt", "--max-minutes", "inf"], ["--max-minutes"]),
    "adapt-out-is-file": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]), "--out",
                                     S(w["afile"])], ["afile", "--out"]),
    "adapt-crop-below-stride": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]),
                                           "--crop", "8", "8"], ["--crop", "stride 16"]),
    # evaluate
    "evaluate-label-value": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt"]), "--data",
                                        S(w["data"] / "label_value")], [lambda w: w["label_value"].name]),
    "evaluate-class-count": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt"]), "--data", S(w["five"])],
                             ["5 classes", "ckpt"]),
    "evaluate-json-is-dir": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt"]), "--data", S(w["data"] / "train"),
                                        "--json", S(w["root"])], ["--json"]),
    "evaluate-overlays-is-file": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt"]), "--data",
                                             S(w["data"] / "train"), "--overlays", S(w["afile"])], ["--overlays"]),
    "evaluate-data-missing": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt"]), "--data", S(w["root"] / "nod")],
                              ["nod", "--data"]),
    "evaluate-ckpt-5-classes": (lambda w: ["evaluate", "--checkpoint", S(w["ckpt5"]), "--data",
                                           S(w["data"] / "train")], ["ckpt5"]),
    # export
    "export-calib-missing": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--int8", "--calib",
                                        S(w["root"] / "nocalib")], ["nocalib", "--calib"]),
    "export-ckpt-5-classes": (lambda w: ["export", "--checkpoint", S(w["ckpt5"]), "--parity-data",
                                         S(w["target"])], ["ckpt5", "5 classes"]),
    "export-batch-0": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--batch", "0"], ["--batch"]),
    "export-imgsz-below-stride": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--imgsz", "8", "8",
                                             "--parity-data", S(w["target"])], ["--imgsz", "stride"]),
    "export-corrupt-parity-frame": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--parity-data",
                                               S(w["target_zero"].parent)], [lambda w: w["target_zero"].name]),
    "export-out-is-file": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--parity-data", S(w["target"]),
                                      "--out", S(w["afile"])], ["afile", "--out"]),
    "export-workspace-inf": (lambda w: ["export", "--checkpoint", S(w["ckpt"]), "--workspace", "inf"],
                             ["--workspace"]),
    # label-free selection and rare-class options
    "adapt-selection-confidence-range": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]),
                                                    "--selection.confidence", "0.3"], ["--selection.confidence"]),
    "adapt-selection-rule-unknown": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]),
                                                "--selection.rule", "max:nonsense"], ["max:nonsense"]),
    "adapt-rare-class-without-source": (lambda w: ["adapt", "--checkpoint", S(w["ckpt"]), "--target",
                                                   S(w["target"]), "--rare-class-sampling", "true"],
                                        ["--rare-class-sampling", "--source-data"]),
    "train-rare-class-temperature-zero": (lambda w: ["train-source", "--data", S(w["data"]),
                                                     "--rare-class-temperature", "0"], ["--rare-class-temperature"]),
    "train-class-weight-power-negative": (lambda w: ["train-source", "--data", S(w["data"]), "--loss", "balanced",
                                                    "--class-weight-power", "-0.5"], ["--class-weight-power"]),
    # predict
    "predict-sidecar-5-classes": (lambda w: ["predict", "--model", S(w["onnx5"]), "--source", S(w["target"]),
                                             "--out", S(w["root"] / "p1")], ["m5.json", "5 classes", "11"]),
    "predict-truncated-video": (lambda w: ["predict", "--model", S(w["onnx"]), "--source", S(w["trunc_mp4"]),
                                           "--out", S(w["root"] / "p2")], ["trunc.mp4", "221", "--source"]),
    "predict-zero-byte-image": (lambda w: ["predict", "--model", S(w["onnx"]), "--source",
                                           S(w["target_zero"].parent), "--out", S(w["root"] / "p3")],
                                [lambda w: w["target_zero"].name, "--source"]),
    "predict-zero-byte-model": (lambda w: ["predict", "--model", S(w["zero_onnx"]), "--source", S(w["target"]),
                                           "--out", S(w["root"] / "p4")], ["zero.onnx", "--model"]),
    "predict-junk-model": (lambda w: ["predict", "--model", S(w["junk_onnx"]), "--source", S(w["target"]),
                                      "--out", S(w["root"] / "p5")], ["junk.onnx", "--model"]),
    "predict-out-is-file": (lambda w: ["predict", "--model", S(w["onnx"]), "--source", S(w["target"]), "--out",
                                       S(w["afile"])], ["afile", "--out"]),
    "predict-size-static": (lambda w: ["predict", "--model", S(w["onnx"]), "--source", S(w["target"]), "--out",
                                       S(w["root"] / "p6"), "--size", "64", "64"], ["--size", "96 128"]),
    "predict-alpha-nan": (lambda w: ["predict", "--model", "m", "--source", "s", "--out", "o", "--alpha", "nan"],
                          ["--alpha"]),
    # bench
    "bench-corrupt-frame": (lambda w: ["bench", "--checkpoint", S(w["ckpt"]), "--frames", S(w["target_zero"].parent)],
                            [lambda w: w["target_zero"].name, "--frames"]),
    "bench-truncated-video": (lambda w: ["bench", "--checkpoint", S(w["ckpt"]), "--frames", S(w["target"]),
                                         "--video", S(w["trunc_mp4"])], ["trunc.mp4", "--video"]),
    "bench-json-is-dir": (lambda w: ["bench", "--checkpoint", S(w["ckpt"]), "--frames", S(w["target"]), "--json",
                                     S(w["root"])], ["--json"]),
    "bench-ckpt-5-classes": (lambda w: ["bench", "--checkpoint", S(w["ckpt5"]), "--frames", S(w["target"])],
                             ["ckpt5"]),
    # pipeline
    "pipeline-data-missing": (lambda w: ["pipeline", "--data", S(w["root"] / "nodata"), "--out",
                                         S(w["root"] / "pl1")], ["nodata"]),
    "pipeline-truncated-video": (lambda w: ["pipeline", "--data", S(w["data"]), "--target-split", "train",
                                            "--source-checkpoint", S(w["ckpt"]), "--video", S(w["trunc_mp4"]),
                                            "--out", S(w["root"] / "pl2")], ["trunc.mp4", "--video"]),
    "pipeline-ckpt-5-classes": (lambda w: ["pipeline", "--data", S(w["data"]), "--target-split", "train",
                                           "--source-checkpoint", S(w["ckpt5"]), "--out", S(w["root"] / "pl3")],
                                ["ckpt5", "--source-checkpoint"]),
    "pipeline-target-label-value": (lambda w: ["pipeline", "--data", S(w["data"]), "--target-split", "label_value",
                                               "--source-checkpoint", S(w["ckpt"]), "--out", S(w["root"] / "pl4")],
                                    [lambda w: w["label_value"].name, "--target-split"]),
    "pipeline-corrupt-state": (lambda w: ["pipeline", "--data", S(w["data"]), "--out", S(w["bad_state"].parent)],
                               ["state.json"]),
    "pipeline-out-is-file": (lambda w: ["pipeline", "--data", S(w["data"]), "--out", S(w["afile"])],
                             ["afile", "--out"]),
    "pipeline-config-not-json": (lambda w: ["pipeline", "--config", S(w["bad_json"])], ["bad.json"]),
    # demo and data
    "demo-sidecar-5-classes": (lambda w: ["demo", "--model", S(w["onnx5"])], ["m5.json", "--model"]),
    "demo-examples-missing": (lambda w: ["demo", "--model", S(w["onnx"]), "--examples", S(w["root"] / "noex")],
                              ["noex", "--examples"]),
    "demo-reference-classes": (lambda w: ["demo", "--model", S(w["onnx"]), "--reference", S(w["onnx_other"])],
                               ["other.onnx", "5 classes"]),
    "demo-checkpoint-5-classes": (lambda w: ["demo", "--model", S(w["onnx"]), "--checkpoint", S(w["ckpt5"])],
                                  ["ckpt5", "--checkpoint"]),
    "demo-port-too-high": (lambda w: ["demo", "--model", S(w["onnx"]), "--port", "70000"], ["--port", "65535"]),
    "data-out-is-file": (lambda w: ["data", "camvid", "--out", S(w["afile"])], ["afile", "--out"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_before_any_model(case, w, no_work, capsys):
    build, needles = CASES[case]
    try:
        rc = main(build(w))
    except SystemExit as e:  # argparse refuses the value itself (same one-line format)
        rc = e.code
    out = capsys.readouterr()
    err = out.err
    assert rc == 2, (case, err, out.out)
    assert "Traceback" not in err + out.out
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        n = n(w) if callable(n) else n
        assert n in err, (case, n, err)


def test_a_renamed_class_is_a_warning_not_an_error(w, tmp_path, no_work, caplog, capsys):
    """The same class count under other names: the run goes on past the checks (here into the stand-in)."""
    import logging

    from segadapt.runtime.inputs import check_model_file

    m = _onnx_model(tmp_path / "r.onnx", [f"c{i}" for i in range(11)],
                    sidecar_names=[f"c{i}" for i in range(10)] + ["renamed"])
    with caplog.at_level(logging.WARNING, logger="segadapt"):
        meta = check_model_file(m)
    assert meta.classes[-1] == "renamed" and "'c10' -> 'renamed'" in caplog.text


def test_good_inputs_pass_the_checks_and_reach_the_work(w, no_work, capsys):
    """The same checks accept good inputs: the command gets as far as the (stand-in) implementation, whose failure
    is an unexpected error (exit 1), still one line."""
    for argv in (["train-source", "--data", S(w["data"]), "--train-split", "train", "--val-split", "val",
                  "--out", S(w["root"] / "ok1")],
                 ["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]), "--out", S(w["root"] / "ok2")],
                 ["export", "--checkpoint", S(w["ckpt"]), "--parity-data", S(w["target"]), "--out",
                  S(w["root"] / "ok3")],
                 ["predict", "--model", S(w["onnx"]), "--source", S(w["target"]), "--out", S(w["root"] / "ok4")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: AssertionError: ") and len(err.splitlines()) == 1, err
        assert "ran before the inputs were checked" in err or "model was loaded" in err
    assert not (w["root"] / "ok1").exists() and not (w["root"] / "ok4").exists()  # the checks create nothing


def _ro_mount(path: Path) -> bool:
    """A read-only tmpfs at ``path`` (root in a container that allows mounting), else False."""
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _mount_small(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_read_only_output_folder(w, tmp_path, no_work, capsys):
    ro = tmp_path / "ro"
    mounted = _ro_mount(ro)
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("running as root without permission to mount: chmod cannot make a folder read-only for root")
        ro.chmod(0o555)
    try:
        rc = main(["adapt", "--checkpoint", S(w["ckpt"]), "--target", S(w["target"]), "--out", S(ro / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot write" in err and "--out" in err and str(ro / "run") in err, err
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


def test_too_little_disk_for_the_outputs(w, tmp_path, no_work, capsys):
    """A 2 MB disk cannot take the exported graphs of a checkpoint with 4 MB of weights: refused up front."""
    small = tmp_path / "small"
    if not _mount_small(small, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root in a container that allows it)")
    try:
        rc = main(["export", "--checkpoint", S(w["ckpt_big"]), "--parity-data", S(w["target"]), "--out",
                   S(small / "exp")])
        err = capsys.readouterr().err
        assert rc == 2 and "free" in err and "--out" in err and "MB" in err, err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_dataloader_worker_error_reaches_the_user_as_one_line(w, monkeypatch, capsys):
    """A label that goes bad after the checks (or any error in a worker) is raised by torch in the main process
    with the worker's stack inside its message; the command line prints the original message alone, and the stack
    with --verbose."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError("/data/labels/f.png: label values [40] are neither class ids 0-10 nor the ignore value 11")

    try:
        next(iter(DataLoader(Bad(), num_workers=1)))
    except ValueError as e:
        wrapped = e
    assert "DataLoader worker process 0" in str(wrapped) and "Traceback" in str(wrapped)
    del torch

    fake = types.ModuleType("segadapt.adapt.train_source")

    def train_source(cfg, log=None):
        raise wrapped
    fake.train_source = train_source
    monkeypatch.setitem(sys.modules, "segadapt.adapt.train_source", fake)
    argv = ["train-source", "--data", S(w["data"]), "--train-split", "train", "--val-split", "val",
            "--out", S(w["root"] / "dl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: /data/labels/f.png: label values [40] are neither class ids 0-10 nor the ignore value "
                   "11\n"), err
    assert main(["-v"] + argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: /data/labels/f.png")


def test_nan_is_outside_every_bound():
    from segadapt.adapt.typed_config import Bounds

    assert not Bounds(0, 1).ok(float("nan")) and not Bounds().ok(float("nan")) and Bounds(0, 1).ok(0.5)


def test_the_checks_are_fast_on_a_real_split(camvid):
    """Every frame (decoded in full) and label of the 62-frame dusk split, 360x480, in seconds: cheap beside the
    work they guard."""
    import time

    from segadapt.data_checks import check_class_file, check_labelled_split

    t = time.perf_counter()
    n = check_labelled_split(camvid / "target_adapt", check_class_file(camvid / "classes.json"), "--data")
    assert n == 62 and time.perf_counter() - t < 20


def test_a_truncated_video_is_never_silent(w, tmp_path):
    """Past the checks (a library call, or a file cut while it is read), the video pipeline warns with the frames
    decoded against the container's count."""
    from segadapt.runtime.video import segment_video

    class Stub:  # the predictor's interface the video pipeline uses; the model itself does not matter here
        max_batch = 1
        backend = types.SimpleNamespace(describe=lambda: "stub")

        def preprocess(self, frames):
            return np.zeros((len(frames), 4, 4, 3), np.uint8), [(0, 0, 4, 4)] * len(frames)

        def infer_prepared(self, x, boxes, shapes, ms=0.0):
            return [types.SimpleNamespace(class_map=np.zeros(s, np.uint8), timings={}) for s in shapes]

        def overlay(self, frame, cm, alpha):
            return frame

    with pytest.warns(UserWarning, match=r"trunc.mp4: decoded \d+ of the 221 frames the container lists"):
        rep = segment_video(Stub(), w["trunc_mp4"], tmp_path / "o.mp4")
    assert 0 < rep.frames < 221
