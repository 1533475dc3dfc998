"""The OpenVINO CPU backend: same classes as ONNX Runtime in f32, bf16 where the CPU has it, NNCF INT8 IR, the video
pipeline and the demo on it, ``--backend`` selection, the FLOP floor, and a runtime that imports no torch."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'segadapt[openvino-int8]')")

from segadapt.runtime.backends import BackendError, choose_backend
from segadapt.runtime.metadata import ModelMetadata, metadata_path
from segadapt.runtime.openvino_backend import OpenVinoBackend, cpu_capabilities, cpu_supports_bf16
from segadapt.runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ov_export(tiny_checkpoint, tiny, tmp_path_factory):
    """A dynamic FP32 graph (batch 1..4, any size) of the briefly trained tiny model, with its NNCF INT8 IR
    calibrated on the source frames (the target frames stay held out for the comparisons)."""
    pytest.importorskip("nncf")
    from segadapt.export.config import ExportConfig
    from segadapt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("ov")
    return export_onnx(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out), dynamic=True, max_batch=4,
                                    int8=True, int8_backend="openvino", calib=str(tiny / "source"), calib_frames=16,
                                    parity_data=str(tiny / "target"), parity_frames=20), log=lambda *_: None)


@pytest.fixture(scope="module")
def frames(tiny):
    """The 20 real target frames (120x160 RGB)."""
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
            for f in sorted((tiny / "target" / "images").iterdir())]


def _maps(pred, frames, batch=1):
    out = []
    for i in range(0, len(frames), batch):
        out += [r.class_map for r in pred.predict_batch(frames[i:i + batch])]
    return np.stack(out)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Compiled models go to the test's folder, not the user's cache."""
    monkeypatch.setenv("SEGADAPT_OPENVINO_CACHE", str(tmp_path / "ov-cache"))


def test_f32_class_maps_equal_onnxruntime(tiny_onnx, ov_export, frames):
    # static batch-1 graph, every real frame
    ort = Predictor(tiny_onnx, providers=["cpu"])
    ov = Predictor(tiny_onnx, backend="openvino", precision="f32")
    assert ov.backend.name == "openvino" and ov.backend.precision == "f32" and "f32" in ov.backend.describe()
    assert np.array_equal(_maps(ov, frames), _maps(ort, frames))
    # dynamic graph: batches of 4 (+ a remainder), and another input size
    dyn = ov_export.files["fp32"]
    for size in (None, (128, 160)):
        a = Predictor(dyn, providers=["cpu"], size=size)
        b = Predictor(dyn, backend="openvino", precision="f32", size=size)
        assert np.array_equal(_maps(b, frames[:9], batch=4), _maps(a, frames[:9], batch=4))


@pytest.mark.skipif(not cpu_supports_bf16(), reason=f"this CPU has no bf16 arithmetic (OpenVINO's CPU capabilities: "
                    f"{', '.join(cpu_capabilities())})")
def test_bf16_agrees_with_onnxruntime_fp32(tiny_onnx, frames):
    ref = _maps(Predictor(tiny_onnx, providers=["cpu"]), frames)
    for precision in ("auto", "bf16"):  # auto picks bf16 where the CPU has it
        p = Predictor(tiny_onnx, backend="openvino", precision=precision)
        assert p.backend.precision == "bf16", p.backend.describe()
        assert (_maps(p, frames) == ref).mean() >= 0.99


@pytest.mark.skipif(cpu_supports_bf16(), reason="this CPU has bf16: the request is honoured")
def test_bf16_request_without_bf16_is_an_error(tiny_onnx):
    with pytest.raises(BackendError, match="no bf16"):
        Predictor(tiny_onnx, backend="openvino", precision="bf16")
    assert Predictor(tiny_onnx, backend="openvino").backend.precision == "f32"  # auto: f32 here


def test_int8_ir_with_metadata_and_accuracy_report(ov_export, frames):
    xml = ov_export.files["int8"]
    assert xml.suffix == ".xml" and xml.with_suffix(".bin").is_file()
    meta = ModelMetadata.load(metadata_path(xml))
    assert (meta.precision, meta.format, meta.quantization["scheme"]) == ("int8", "openvino", "openvino")
    assert meta.quantization["calibration_frames"] == 16 and "nncf" in meta.exporter
    agree = meta.parity["class_agreement"]
    assert meta.parity["frames"] == 20 and 0.9 <= agree <= 1.0
    p = Predictor(xml)  # by file: OpenVINO
    assert p.backend.name == "openvino" and "int8" in p.backend.describe() and ".xml" in p.backend.selection
    ref = _maps(Predictor(ov_export.files["fp32"], providers=["cpu"]), frames)
    assert (_maps(p, frames) == ref).mean() >= 0.9
    with pytest.raises(BackendError, match="openvino only"):
        Predictor(xml, backend="onnxruntime")
    # quantised after OpenVINO's conversion passes: every convolution's bias add takes a constant (left as the
    # dynamic graph's ShapeOf/Broadcast reshapes, the INT8 IR of the trained DeepLabV3 at 360x480 agreed 55 %)
    import openvino as ov

    adds = [op for op in ov.Core().read_model(str(xml)).get_ordered_ops()
            if op.get_type_name() == "Add" and op.input_value(0).get_node().get_type_name() == "Convolution"]
    assert adds and all(a.input_value(1).get_node().get_type_name() == "Constant" for a in adds)


def test_video_pipeline_and_demo_on_openvino(tiny_onnx, short_clip, tmp_path, frames):
    from segadapt.demo.app import segment_image
    from segadapt.runtime.video import segment_video

    p = Predictor(tiny_onnx, backend="openvino", spin=False)
    rep = segment_video(p, short_clip, tmp_path / "ov.mp4", max_frames=20)
    assert rep.frames == 20 and rep.backend.startswith("openvino") and (tmp_path / "ov.mp4").stat().st_size > 0
    assert rep.to_dict()["backend"] == p.backend.describe()
    ov_img, cm, shares, ms = segment_image(p, frames[0])
    assert ov_img.shape == frames[0].shape and cm.shape == frames[0].shape[:2] and abs(sum(shares.values()) - 1) < 1e-6


def test_concurrent_requests_and_compile_cache(tiny_onnx, frames, tmp_path):
    meta = ModelMetadata.load(metadata_path(tiny_onnx))
    x = np.stack([cv2.resize(f, (128, 96)) for f in frames[:8]])
    first = OpenVinoBackend(tiny_onnx, meta, precision="f32", cache_dir=tmp_path / "c")
    assert not first.loaded_from_cache and any((tmp_path / "c").iterdir())
    b = OpenVinoBackend(tiny_onnx, meta, precision="f32", cache_dir=tmp_path / "c")
    assert b.loaded_from_cache
    want = [first.infer(x[i:i + 1]) for i in range(8)]
    got = [None] * 8

    def run(i):
        got[i] = b.infer(x[i:i + 1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want)) and b._made <= b.max_requests


def test_backend_choice(tiny_onnx, monkeypatch, tmp_path):
    import segadapt.runtime.backends as backends
    import segadapt.runtime.openvino_backend as ovb

    meta = ModelMetadata.load(metadata_path(tiny_onnx))
    monkeypatch.setattr(backends, "available_ort_providers", lambda: ["cpu"])
    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: True)
    assert choose_backend(tiny_onnx, meta)[0] == "openvino"  # CPU with bf16, OpenVINO installed
    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)
    assert choose_backend(tiny_onnx, meta)[0] == "onnxruntime"  # OpenVINO f32 is no faster than ONNX Runtime
    assert choose_backend(tiny_onnx, meta, providers=["cpu"])[0] == "onnxruntime"
    assert choose_backend(tiny_onnx, meta, "onnxruntime")[0] == "onnxruntime"
    assert choose_backend(tmp_path / "m.engine", meta)[0] == "tensorrt"
    assert choose_backend(tmp_path / "m.xml", meta)[0] == "openvino"
    q = ModelMetadata.from_dict(dict(meta.to_dict(), precision="int8", quantization={"scheme": "onnxruntime"}))
    assert choose_backend(tiny_onnx, q) == ("onnxruntime", "INT8 graph in the onnxruntime form")
    monkeypatch.setattr(backends, "available_ort_providers", lambda: ["cuda", "cpu"])
    assert choose_backend(tiny_onnx, meta)[0] == "onnxruntime"  # a GPU provider beats the CPU
    monkeypatch.setattr(backends, "available_ort_providers", lambda: ["cpu"])
    monkeypatch.setattr(ovb, "openvino_installed", lambda: False)
    assert choose_backend(tiny_onnx, meta) == ("onnxruntime", "CPU, OpenVINO not installed")
    for kind, path, match in (("tensorrt", tiny_onnx, "TensorRT engines"), ("openvino", tmp_path / "m.engine",
                              "tensorrt only"), ("cuda", tiny_onnx, "unknown backend")):
        with pytest.raises(BackendError, match=match):
            choose_backend(path, meta, kind)
    with pytest.raises(BackendError, match="OpenVINO only"):
        Predictor(tiny_onnx, backend="onnxruntime", precision="f32")


def test_predict_cli_backend_flag(tiny_onnx, tiny, tmp_path, capsys):
    from segadapt.cli import main

    frame = sorted((tiny / "target" / "images").iterdir())[0]
    for backend in ("openvino", "auto"):
        rc = main(["predict", "--model", str(tiny_onnx), "--source", str(frame), "--out", str(tmp_path / backend),
                   "--backend", backend, "--precision", "f32"])
        assert rc == 0 and (tmp_path / backend / f"{frame.stem}_overlay.png").is_file()
        err = capsys.readouterr().err
        assert "openvino" in err and "[cpu, f32]" in err
    rc = main(["predict", "--model", str(tiny_onnx), "--source", str(frame), "--out", str(tmp_path / "x"),
               "--backend", "tensorrt"])
    assert rc == 2 and "TensorRT engines" in capsys.readouterr().err


def test_openvino_runtime_imports_no_torch(tiny_onnx, tiny, tmp_path):
    """The runtime on OpenVINO (Predictor, backend, video) runs a frame without importing torch (the venv has it:
    this checks that nothing on the path imports it; .ci/run checks an install without it)."""
    frame = sorted((tiny / "target" / "images").iterdir())[0]
    code = f"""
import sys, json, cv2
from segadapt.runtime.predictor import Predictor
import segadapt.runtime.video
p = Predictor({str(tiny_onnx)!r}, backend="openvino")
r = p.predict(cv2.imread({str(frame)!r})[:, :, ::-1].copy())
print(json.dumps({{"torch": "torch" in sys.modules, "backend": p.backend.name, "shape": list(r.class_map.shape)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**__import__("os").environ, "SEGADAPT_OPENVINO_CACHE": ""})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"torch": False, "backend": "openvino", "shape": [120, 160]}


def test_flop_counter_and_floor(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from segadapt.export.bench import _add_floor, format_bench
    from segadapt.export.flops import flop_floor, onnx_flops

    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    m2 = numpy_helper.from_array(np.zeros((4, 5), np.float32), "m")
    shape = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([1, 4, -1], np.int64)))
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), shape,
         helper.make_node("Reshape", ["y", "s"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["t", "m"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, m2])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    f = onnx_flops(path, (1, 3, 8, 8))
    conv, mm = 2 * 4 * 8 * 8 * 27, 2 * 64 * 5 * 4  # 2 x outputs x multiply-adds per output
    assert f["by_op"] == {"Conv": conv, "MatMul": mm} and f["unresolved"] == 0
    assert onnx_flops(path, (2, 3, 16, 8))["total"] == 4 * (conv + mm)
    fl = flop_floor(path, (1, 3, 8, 8), gflops=100.0)
    assert fl["floor_ms"] == pytest.approx((conv + mm) / 1e9 / 100.0 * 1e3)
    assert flop_floor(path, (1, 3, 8, 8))["gemm_gflops"] > 0  # measured here
    rep = {"floor": dict(fl, floor_ms=10.0), "results": {"a": {"p50_ms": 25.0, "p90_ms": 30.0, "throughput_fps": 50.0,
                                                                "batch": 8, "peak_rss_mb": 100},
                                                          "b": {"skipped": "no bf16"}}}
    _add_floor(rep["results"], rep["floor"])
    assert rep["results"]["a"]["x_floor"] == 2.5 and rep["results"]["a"]["x_floor_batch"] == 2.0
    text = format_bench(rep)
    assert "FLOP floor" in text and "| 2.50 | 2.00 |" in text and "no bf16" in text


def test_openvino_int8_form_goes_with_the_onnx_format():
    from segadapt.export.config import ExportConfig
    from segadapt.export.onnx_export import resolve_int8_backend

    assert resolve_int8_backend(ExportConfig(format="onnx", int8=True, int8_backend="openvino")) == "openvino"
    for fmt in ("engine", "triton"):
        with pytest.raises(ValueError, match="OpenVINO IR"):
            resolve_int8_backend(ExportConfig(format=fmt, int8=True, int8_backend="openvino"))


def test_int8_weight_granularity_per_form(tiny_onnx):
    # the onnxruntime form quantises weights per tensor (ONNX Runtime's u8s8 kernels saturate on full-range
    # per-channel weights on CPUs without VNNI); the TensorRT form keeps one scale per output channel
    import onnx

    from segadapt.export.onnx_export import INT8_SCHEMES, _quant_settings

    m = onnx.load(str(tiny_onnx))
    for form, per_channel in (("onnxruntime", False), ("tensorrt", True)):
        assert _quant_settings(INT8_SCHEMES[form], "minmax", m)["per_channel"] is per_channel
        assert INT8_SCHEMES[form].describe("minmax", 1, "")["per_channel"] is per_channel


def test_flop_counter_runs_the_graph_where_inference_cannot_resolve_shapes(tmp_path):
    # a reshape computed from the data's shape (as in SegFormer's dynamic graph): static inference cannot know the
    # matmul's rows; the counter takes them from one ONNX Runtime run
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from segadapt.export.flops import onnx_flops

    inits = [numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.zeros((4, 5), np.float32), "m"),
             numpy_helper.from_array(np.array([4], np.int64), "four")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("ReduceProd", ["s"], ["p"], keepdims=1), helper.make_node("Div", ["p", "four"], ["q"]),
             helper.make_node("Concat", ["q", "four"], ["s2"], axis=0), helper.make_node("Reshape", ["y", "s2"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    f = onnx_flops(path, (1, 3, 8, 8))
    assert f["by_op"]["MatMul"] == 2 * (4 * 8 * 8 // 4) * 5 * 4 and f["unresolved"] == 0  # (64, 4) @ (4, 5)
