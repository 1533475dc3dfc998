"""Runtime: Predictor, backends, video pipeline; without torch."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segadapt.export.config import ExportConfig
from segadapt.export.onnx_export import export_onnx
from segadapt.runtime.backends import BackendError, OrtBackend
from segadapt.runtime.metadata import ModelMetadata, metadata_path
from segadapt.runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_models(tiny_checkpoint, tiny, tmp_path_factory, tiny_onnx):
    out = tmp_path_factory.mktemp("rt")
    dyn = export_onnx(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out / "dyn"), dynamic=True,
                                   output="logits", input_layout="float_nchw", max_batch=4,
                                   parity_data=str(tiny / "target"), parity_frames=2), log=lambda *_: None)
    return tiny_onnx, dyn.files["fp32"]


def _frame(tiny, i=0):
    f = sorted((tiny / "target" / "images").iterdir())[i]
    return cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)


def test_predictor_static_model_on_real_frame(onnx_models, tiny):
    p = Predictor(onnx_models[0], providers=["cpu"])
    img = _frame(tiny)
    r = p.predict(img)
    assert r.class_map.shape == img.shape[:2] and r.class_map.dtype == np.uint8
    assert r.class_map.max() < 11
    assert set(r.timings) == {"preprocess", "infer", "postprocess"} and all(v >= 0 for v in r.timings.values())
    ov = p.overlay(img, r.class_map, 0.5)
    assert ov.shape == img.shape and not np.array_equal(ov, img)
    shares = p.class_shares(r.class_map)
    assert abs(sum(shares.values()) - 1) < 1e-6 and set(shares) <= set(p.metadata.classes)
    # batch of frames of different sizes -> maps at each frame's size
    big = cv2.resize(img, (300, 200))
    rs = p.predict_batch([img, big])
    assert rs[1].class_map.shape == (200, 300)


def test_predictor_matches_direct_onnxruntime(onnx_models, tiny):
    import onnxruntime as ort

    p = Predictor(onnx_models[0], providers=["cpu"])
    img = cv2.resize(_frame(tiny, 3), (128, 96))  # already the model size: no resizing on either path
    sess = ort.InferenceSession(str(onnx_models[0]), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"images": img[None]})[0][0]
    assert np.array_equal(p.predict(img).class_map, ref)
    # the video setting: idle threads do not spin; same results
    q = Predictor(onnx_models[0], providers=["cpu"], spin=False)
    opts = q.backend.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert np.array_equal(q.predict(img).class_map, ref)


def test_dynamic_logits_model_sizes_and_letterbox(onnx_models, tiny):
    img = _frame(tiny)
    p = Predictor(onnx_models[1], providers=["cpu"], size=(128, 160))
    a = p.predict(img).class_map
    assert a.shape == img.shape[:2]
    lb = Predictor(onnx_models[1], providers=["cpu"], size=(128, 128), letterbox=True)
    b = lb.predict(img).class_map
    assert b.shape == img.shape[:2]
    batch = lb.predict_batch([img] * 5)  # max_batch 4: split into 4 + 1
    assert len(batch) == 5 and np.array_equal(batch[4].class_map, b)
    with pytest.raises(ValueError, match="outside"):
        Predictor(onnx_models[1], providers=["cpu"], size=(4000, 4000))
    with pytest.raises(ValueError, match="static"):
        Predictor(onnx_models[0], providers=["cpu"], size=(128, 160))


def test_missing_provider_is_an_error_not_a_fallback(onnx_models):
    meta = ModelMetadata.load(metadata_path(onnx_models[0]))
    with pytest.raises(BackendError, match="cuda"):
        OrtBackend(onnx_models[0], meta, providers=["cuda"])
    with pytest.raises(BackendError, match="unknown"):
        OrtBackend(onnx_models[0], meta, providers=["directml2"])


def test_corrupt_or_mismatched_model_files(onnx_models, tmp_path):
    import shutil

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    shutil.copy(metadata_path(onnx_models[0]), metadata_path(bad))
    with pytest.raises(BackendError, match="bad.onnx"):
        Predictor(bad)
    # model without metadata: the embedded copy is used
    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx_models[0], lone)
    assert Predictor(lone, providers=["cpu"]).metadata.classes[0] == "Sky"
    # metadata of another model (float NCHW input) beside a uint8 NHWC graph
    mis = tmp_path / "mis.onnx"
    shutil.copy(onnx_models[0], mis)
    shutil.copy(metadata_path(onnx_models[1]), metadata_path(mis))
    with pytest.raises(BackendError, match="do not belong together"):
        Predictor(mis, providers=["cpu"])
    broken = tmp_path / "broken.onnx"
    shutil.copy(onnx_models[0], broken)
    metadata_path(broken).write_text("{")
    with pytest.raises(BackendError, match="broken.json"):
        Predictor(broken)
    with pytest.raises(BackendError, match="unknown model file type"):
        x = tmp_path / "m.pt"
        x.write_bytes(b"x")
        shutil.copy(metadata_path(onnx_models[0]), metadata_path(x))
        Predictor(x)
    with pytest.raises(FileNotFoundError):
        Predictor(tmp_path / "nope.onnx")


def test_engine_version_mismatch_message(onnx_models, tmp_path):
    from segadapt.runtime.backends import TrtBackend

    meta = ModelMetadata.load(metadata_path(onnx_models[0]))
    meta.tensorrt_version, meta.format = "0.0.1", "engine"
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"plan")
    with pytest.raises(BackendError, match="m.engine"):
        TrtBackend(eng, meta)  # no TensorRT here, or a version mismatch where it exists


def test_whole_video_to_browser_playable_h264(onnx_models, video_path, tmp_path):
    av = pytest.importorskip("av", reason="PyAV writes H.264")
    from segadapt.runtime.video import segment_video

    p = Predictor(onnx_models[0], providers=["cpu"])
    rep = segment_video(p, video_path, tmp_path / "out.mp4", batch_size=1, class_map_dir=tmp_path / "maps")
    cap = cv2.VideoCapture(str(video_path))
    n_in = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert rep.frames == n_in == 221
    with av.open(str(tmp_path / "out.mp4")) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.width, s.height) == (960, 540)
        n_out = sum(1 for _ in c.decode(video=0))
    assert n_out == n_in
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(maps) == n_in and cv2.imread(str(maps[0]), cv2.IMREAD_UNCHANGED).shape == (540, 960)
    # frames preprocessed in the reader thread give the same class maps as Predictor.predict
    cap = cv2.VideoCapture(str(video_path))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 7)
    ok, bgr = cap.read()
    cap.release()
    direct = p.predict(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).class_map
    assert ok and np.array_equal(cv2.imread(str(maps[7]), cv2.IMREAD_UNCHANGED), direct)
    assert rep.fps > 0 and rep.codec == "h264"


def test_video_errors(onnx_models, tmp_path):
    from segadapt.runtime.video import segment_video

    p = Predictor(onnx_models[0], providers=["cpu"])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        segment_video(p, empty, tmp_path / "o.mp4")


def test_runtime_never_imports_torch(onnx_models, tiny, video_path, tmp_path):
    code = f"""
import sys, json
import numpy as np, cv2
from segadapt.runtime.predictor import Predictor
from segadapt.runtime.video import segment_video
p = Predictor({str(onnx_models[0])!r}, providers=['cpu'])
img = cv2.imread({str(sorted((tiny / 'target' / 'images').iterdir())[0])!r})[:, :, ::-1].copy()
r = p.predict(img)
segment_video(p, {str(video_path)!r}, {str(tmp_path / 'v.mp4')!r}, max_frames=5)
print(json.dumps({{'torch': 'torch' in sys.modules, 'adapt': any(m.startswith('segadapt.adapt') for m in sys.modules),
                  'shape': list(r.class_map.shape)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"torch": False, "adapt": False, "shape": [120, 160]}


def test_runtime_is_python310_compatible():
    """JetPack 6 runs Python 3.10: no 3.11-only syntax or standard-library names in runtime/ and demo/."""
    import ast

    newer = ("tomllib", "typing.Self", "StrEnum", "datetime.UTC", "ExceptionGroup", "TaskGroup", "typing.Never")
    for f in sorted((ROOT / "runtime").glob("*.py")) + sorted((ROOT / "demo").glob("*.py")):
        src = f.read_text()
        ast.parse(src, filename=str(f), feature_version=(3, 10))
        for name in newer:
            assert name not in src, f"{f}: uses {name}, which Python 3.10 lacks"
    ruff = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    if ruff.returncode != 0:
        pytest.skip("ruff (dev extra) not installed: only the AST check ran")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--target-version", "py310", "--select",
                          "E9,F63,F7,F82", "runtime", "demo"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_predict_cli_on_images_and_video(onnx_models, tiny, video_path, tmp_path):
    from segadapt.cli import main

    assert main(["predict", "--model", str(onnx_models[0]), "--source", str(tiny / "target"), "--out",
                 str(tmp_path / "imgs"), "--save-class-maps", "--providers", "cpu"]) == 0
    assert len(list((tmp_path / "imgs").glob("*_overlay.png"))) == 20
    assert len(list((tmp_path / "imgs").glob("*_class_map.png"))) == 20
    assert main(["predict", "--model", str(onnx_models[0]), "--source", str(video_path), "--out",
                 str(tmp_path / "vid"), "--max-frames", "10"]) == 0
    assert (tmp_path / "vid" / "solidWhiteRight_overlay.mp4").stat().st_size > 0


def test_predict_cli_without_torch(tiny_onnx, tiny, tmp_path):
    """A runtime-only install (no torch, no onnx package): `segadapt predict` on a real frame works and never imports
    torch or segadapt.adapt (torch, transformers and onnx are made unimportable in the child process); a copied
    .onnx alone, without its .json, runs with the same classes and palette (the metadata embedded in the graph, read
    through onnxruntime)."""
    import shutil

    frame = sorted((tiny / "target" / "images").iterdir())[0]
    lone = tmp_path / "copied" / "model.onnx"
    lone.parent.mkdir()
    shutil.copy(tiny_onnx, lone)
    code = f"""
import importlib.abc, json, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('torch', 'transformers', 'onnx'):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
from segadapt.cli import main
rcs = [main(['predict', '--model', m, '--source', {str(frame)!r}, '--out', o, '--providers', 'cpu'])
       for m, o in (({str(tiny_onnx)!r}, {str(tmp_path / "out")!r}), ({str(lone)!r}, {str(tmp_path / "lone")!r}))]
mods = sorted(sys.modules)
print(json.dumps({{'rc': rcs, 'torch': [m for m in mods if m.partition('.')[0] in ('torch', 'transformers', 'onnx')],
                  'adapt': [m for m in mods if m == 'segadapt.adapt' or m.startswith('segadapt.adapt.')]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"rc": [0, 0], "torch": [], "adapt": []}, r.stderr
    overlay = tmp_path / "out" / f"{frame.stem}_overlay.png"
    assert overlay.is_file() and cv2.imread(str(overlay)).shape == cv2.imread(str(frame)).shape
    assert not metadata_path(lone).exists()
    assert np.array_equal(cv2.imread(str(tmp_path / "lone" / overlay.name)), cv2.imread(str(overlay)))


def _bounded(fn, timeout=90.0):
    """Run ``fn`` in a thread: a hang fails the test instead of hanging the suite. Returns (result, exception)."""
    import threading

    res: dict = {}

    def target():
        try:
            res["value"] = fn()
        except BaseException as e:  # handed to the test
            res["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"segment_video did not return within {timeout:.0f} s (hang)"
    return res.get("value"), res.get("error")


def test_video_writer_failure_is_an_error_not_a_hang(tiny_onnx, video_path, tmp_path, monkeypatch):
    """The disk fills up after 5 frames: segment_video raises one clear OSError naming the output, within a bounded
    time (before, the main loop blocked forever on the full output queue), and removes the partial file."""
    import errno

    from segadapt.runtime import video as video_mod

    real_write = video_mod.VideoWriter.write

    def write(self, rgb):
        if self.frames >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, rgb)

    monkeypatch.setattr(video_mod.VideoWriter, "write", write)
    p = Predictor(tiny_onnx, providers=["cpu"], spin=False)
    out = tmp_path / "full.mp4"
    _, err = _bounded(lambda: video_mod.segment_video(p, video_path, out, queue_size=2))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, repr(err)
    msg = str(err)  # one line naming the video and the space it needs (issue #18)
    assert msg.startswith(f"video {out}: no space left on the device (needs about ") and "\n" not in msg, msg
    assert not out.exists()  # a truncated video is not left behind (and its space is given back)
    assert [f.name for f in tmp_path.iterdir()] == []  # nor its temporary file

    # the disk fills up while the encoder is flushed at the end
    monkeypatch.setattr(video_mod.VideoWriter, "write", real_write)
    real_close = video_mod.VideoWriter.close

    def close(self):
        real_close(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_mod.VideoWriter, "close", close)
    _, err = _bounded(lambda: video_mod.segment_video(p, video_path, out, queue_size=2, max_frames=8))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, repr(err)
    assert str(err).startswith(f"video {out}: no space left on the device (needs about "), str(err)
    assert not out.exists() and [f.name for f in tmp_path.iterdir()] == []


def test_video_reader_and_inference_failures_end_cleanly(tiny_onnx, video_path, tmp_path, monkeypatch):
    """A decode error after 5 frames is one clear error naming the source; an inference error stops the reader and
    the writer: both return within a bounded time, without a partial output file."""
    import errno

    from segadapt.runtime import video as video_mod

    real_open = video_mod.open_capture

    class FailingCapture:
        def __init__(self, cap):
            self.cap, self.n = cap, 0

        def read(self):
            if self.n >= 5:
                raise OSError(errno.EIO, "Input/output error")
            self.n += 1
            return self.cap.read()

        def __getattr__(self, name):
            return getattr(self.cap, name)

    monkeypatch.setattr(video_mod, "open_capture", lambda src: FailingCapture(real_open(src)))
    p = Predictor(tiny_onnx, providers=["cpu"], spin=False)
    out = tmp_path / "r.mp4"
    _, err = _bounded(lambda: video_mod.segment_video(p, video_path, out, queue_size=2))
    assert isinstance(err, OSError) and err.errno == errno.EIO, repr(err)
    assert str(err) == f"{video_path}: reading the video failed at frame 5: [Errno 5] Input/output error"
    assert not out.exists()
    monkeypatch.setattr(video_mod, "open_capture", real_open)

    calls = []
    real_infer = p.infer_prepared

    def infer(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("inference failed")
        return real_infer(*a, **k)

    monkeypatch.setattr(p, "infer_prepared", infer)
    out2 = tmp_path / "i.mp4"
    _, err = _bounded(lambda: video_mod.segment_video(p, video_path, out2, queue_size=2))
    assert isinstance(err, RuntimeError) and str(err) == "inference failed", repr(err)
    assert not out2.exists()
