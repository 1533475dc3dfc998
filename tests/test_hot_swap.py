"""Hot swap: the served model file is replaced under a running video stream (runtime.hot_swap)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from segadapt.runtime.metadata import metadata_path
from segadapt.runtime.predictor import Predictor
from segadapt.runtime.video import segment_video

from conftest import trained_checkpoint


@pytest.fixture(scope="module")
def other_onnx(tmp_path_factory, tiny_classes, tiny):
    """A second model of the same architecture and classes with other weights (another seed), exported alike."""
    from segadapt.export.config import ExportConfig
    from segadapt.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("other")
    ck = trained_checkpoint(d / "ckpt", "deeplabv3-mobilenetv2", tiny_classes, tiny, steps=20, seed=1)
    res = export_onnx(ExportConfig(checkpoint=str(ck), out=str(d / "onnx"), name="other", parity_frames=1,
                                   parity_data=str(tiny / "target")), log=lambda *_: None)
    return res.files["fp32"]


def _copy_model(src: Path, dst: Path) -> None:
    """Copy a model and its metadata atomically, in the order an export writes them (model, then metadata)."""
    for a, b in ((src, dst), (metadata_path(src), metadata_path(dst))):
        tmp = b.with_name(f".{b.name}.tmp")
        shutil.copyfile(a, tmp)
        os.replace(tmp, b)


def _with_other_classes(src: Path, dst: Path) -> None:
    """A complete, consistent copy of ``src`` whose metadata (embedded and beside it) names other classes."""
    import onnx

    m = onnx.load(str(src))
    meta = json.loads(metadata_path(src).read_text())
    meta["classes"], meta["palette"] = meta["classes"][:5], meta["palette"][:5]
    for e in m.metadata_props:
        if e.key == "segadapt":
            e.value = json.dumps(meta)
    onnx.save(m, str(dst.with_name(".staged.onnx")))
    metadata_path(dst.with_name(".staged.onnx")).write_text(json.dumps(meta))
    _copy_model(dst.with_name(".staged.onnx"), dst)


def _frames(clip: Path, n: int):
    cap = cv2.VideoCapture(str(clip))
    out = []
    for _ in range(n):
        ok, bgr = cap.read()
        assert ok
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def test_swap_under_a_running_video(tiny_onnx, other_onnx, short_clip, tmp_path, caplog):
    served = tmp_path / "served" / "model.onnx"
    served.parent.mkdir()
    _copy_model(Path(tiny_onnx), served)
    pred = Predictor(served, providers=["cpu"], watch=0.0)
    staged = tmp_path / "staged"
    staged.mkdir()
    _with_other_classes(Path(tiny_onnx), staged / "classes.onnx")

    def progress(done, total):  # runs in the inference thread between batches (batch size 1)
        if done == 10:  # the other model appears (atomically, as export writes it)
            _copy_model(Path(other_onnx), served)
        elif done == 20:  # a half-written model file (a plain, slow copy caught half-way)
            served.write_bytes(Path(tiny_onnx).read_bytes()[: served.stat().st_size // 2])
        elif done == 25:  # a complete model whose metadata file is still the other export's
            tmp = served.with_name(".m.tmp")
            shutil.copyfile(tiny_onnx, tmp)
            os.replace(tmp, served)
        elif done == 30:  # a complete, valid model with other classes
            _copy_model(staged / "classes.onnx", served)
        elif done == 40:  # the first model again
            _copy_model(Path(tiny_onnx), served)

    caplog.set_level(logging.INFO, logger="segadapt.runtime.hot_swap")
    maps = tmp_path / "maps"
    rep = segment_video(pred, short_clip, tmp_path / "out.mp4", class_map_dir=maps, progress=progress)
    assert rep.frames == 50

    frames = _frames(short_clip, 50)
    ref_a, ref_b = Predictor(tiny_onnx, providers=["cpu"]), Predictor(other_onnx, providers=["cpu"])
    source = []
    for i, f in enumerate(frames):
        got = cv2.imread(str(maps / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        a, b = ref_a.predict(f).class_map, ref_b.predict(f).class_map
        assert not np.array_equal(a, b), f"frame {i}: the two models agree; the test cannot tell them apart"
        is_a, is_b = np.array_equal(got, a), np.array_equal(got, b)
        assert is_a != is_b, f"frame {i}: class map is from {'both' if is_a else 'neither'} model(s)"
        source.append("a" if is_a else "b")
    # the swap takes effect on the next frame after the file appeared; refused files change nothing
    assert "".join(source) == "a" * 10 + "b" * 30 + "a" * 10

    ev = pred.watcher.events
    assert [e.swapped for e in ev] == [True, False, False, False, True], [e.message for e in ev]
    assert "refused" in ev[1].message and "cannot load" in ev[1].message
    assert "differs from model.json" in ev[2].message
    assert "5 classes" in ev[3].message and "11" in ev[3].message
    a_sha, b_sha = ev[0].old_sha256, ev[0].new_sha256
    assert a_sha != b_sha and ev[4].old_sha256 == b_sha and ev[4].new_sha256 == a_sha
    swaps = [r.getMessage() for r in caplog.records if "swapped" in r.getMessage()]
    assert len(swaps) == 2 and f"{a_sha[:12]} -> {b_sha[:12]}" in swaps[0]
    assert pred.metadata.classes == ref_a.metadata.classes


def test_predict_and_demo_take_the_watch_options():
    from segadapt.cli import build_parser

    ns = build_parser("predict").parse_args(["predict", "--model", "m.onnx", "--source", "0", "--out", "o",
                                             "--watch", "--watch-interval", "0.2"])
    assert ns.watch and ns.watch_interval == 0.2
    ns = build_parser("predict").parse_args(["predict", "--model", "m.onnx", "--source", "0", "--out", "o"])
    assert not ns.watch
    ns = build_parser("demo").parse_args(["demo", "--model", "m.onnx", "--checkpoint", "ck", "--no-watch"])
    assert ns.checkpoint == "ck" and ns.no_watch


def test_install_checks_before_it_copies(tiny_onnx, other_onnx, short_clip, tmp_path):
    from segadapt.runtime.hot_swap import file_sha256

    served = tmp_path / "model.onnx"
    _copy_model(Path(tiny_onnx), served)
    pred = Predictor(served, providers=["cpu"], watch=3600.0)
    _with_other_classes(Path(tiny_onnx), tmp_path / "classes.onnx")
    ev = pred.watcher.install(tmp_path / "classes.onnx")
    assert not ev.swapped and "5 classes" in ev.message
    assert file_sha256(served) == file_sha256(tiny_onnx)  # a refused file is not copied
    ev = pred.watcher.install(other_onnx)
    assert ev.swapped and file_sha256(served) == file_sha256(other_onnx) == ev.new_sha256
    assert json.loads(metadata_path(served).read_text()) == json.loads(metadata_path(other_onnx).read_text())
    frame = _frames(short_clip, 1)[0]
    assert np.array_equal(pred.predict(frame).class_map, Predictor(other_onnx, providers=["cpu"]).predict(frame)
                          .class_map)
    assert pred.watcher.poll() is None  # the installed files are the ones it serves: nothing new to look at
