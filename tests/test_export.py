"""Export: ONNX graphs hold only the RGB segmenter, match PyTorch on real frames, carry metadata."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from segadapt.adapt.models.checkpoint import load_checkpoint
from conftest import tiny_model
from segadapt.export.config import ExportConfig
from segadapt.export.onnx_export import export_onnx
from segadapt.runtime.metadata import ModelMetadata, metadata_path


@pytest.fixture(scope="module")
def segformer_ckpt(tmp_path_factory, tiny_classes, tiny):
    from conftest import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("sf") / "ck", "segformer", tiny_classes, tiny, size=(64, 96),
                              steps=10, seed=1)


@pytest.fixture(scope="module")
def static_export(tiny_checkpoint, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_static")
    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out), parity_data=str(tiny / "target"),
                       parity_frames=4, half=True, int8=True, calib=str(tiny / "target"), calib_frames=8)
    return export_onnx(cfg, log=lambda *_: None)


def _n_weights(model: onnx.ModelProto) -> int:
    """Elements of the conv/linear weight tensors (ndim >= 2) in a graph: BatchNorm folding keeps them."""
    arrs = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return sum(a.size for a in arrs if a.dtype.kind == "f" and a.ndim >= 2)


def test_graph_has_rgb_input_only_and_no_auxiliary_weights(static_export, tiny_checkpoint):
    m = onnx.load(str(static_export.files["fp32"]))
    assert [i.name for i in m.graph.input] == ["images"]
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 96, 128, 3]  # uint8 NHWC RGB: no depth channel
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m.opset_import[0].version >= 17
    seg, _ = load_checkpoint(tiny_checkpoint)
    # weights that take part in the forward pass (transformers' MobileNetV2 also builds a final 1x1 conv that the
    # DeepLabV3 head never uses; the exporter drops it)
    seg(torch.randn(1, 3, 64, 64)).sum().backward()
    torch_weights = sum(p.numel() for p in seg.parameters() if p.ndim >= 2 and p.grad is not None)
    # exactly the RGB segmenter's weights: an auxiliary RGB-D stream or a training head would add to them
    assert _n_weights(m) == torch_weights + 2 * 3  # + the in-graph normalisation scale and shift, (1, 3, 1, 1)
    stem = [numpy_helper.to_array(t) for t in m.graph.initializer if numpy_helper.to_array(t).ndim == 4]
    assert all(a.shape[1] != 4 for a in stem)  # no 4-channel (RGB-D) stem


def test_fp32_parity_on_real_frames(static_export):
    p = static_export.parity["fp32"]
    assert p["frames"] == 4
    assert p["class_agreement"] >= 0.999
    assert p["max_abs_logit_diff"] < 1e-3


def test_reduced_precision_variants_agree(static_export):
    assert static_export.parity["fp16"]["class_agreement"] > 0.95
    assert static_export.parity["int8"]["class_agreement"] > 0.80
    q = onnx.load(str(static_export.files["int8"]))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the input normalisation (Cast -> Mul -> Add before the first Conv) stays FP32: no DequantizeLinear feeds it
    producer = {o: n for n in q.graph.node for o in n.output}
    cast = next(n for n in q.graph.node if n.op_type == "Cast" and producer.get(n.input[0], n).op_type == "Transpose")
    mul = next(n for n in q.graph.node if n.op_type == "Mul" and cast.output[0] in n.input)
    assert all(producer[i].op_type != "DequantizeLinear" for i in mul.input if i in producer)
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node if n.output[0] in
               {i for c in q.graph.node if c.op_type == "Conv" for i in c.input})  # while the convs are INT8
    f16 = onnx.load(str(static_export.files["fp16"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in f16.graph.initializer)


def test_metadata_round_trip(static_export, tiny_checkpoint):
    path = static_export.files["fp32"]
    meta = ModelMetadata.load(metadata_path(path))
    assert meta == static_export.metadata["fp32"]
    assert meta.classes[0] == "Sky" and meta.ignore_index == 11 and meta.input_size == (96, 128)
    assert meta.input_layout == "uint8_nhwc" and meta.output_kind == "class_map" and meta.precision == "fp32"
    assert len(meta.source_checkpoint_sha256) == 64 and "torch" in meta.exporter
    # the same metadata is embedded in the graph
    m = onnx.load(str(path))
    emb = json.loads({p.key: p.value for p in m.metadata_props}["segadapt"])
    assert ModelMetadata.from_dict(emb) == meta
    assert ModelMetadata.load(metadata_path(static_export.files["int8"])).precision == "int8"


def test_dynamic_logits_export_float_input(segformer_ckpt, tiny, tmp_path, monkeypatch):
    import onnxruntime as ort

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = ExportConfig(checkpoint=str(segformer_ckpt), out=str(tmp_path), dynamic=True, input_layout="float_nchw",
                       output="logits", parity_data=str(tiny / "target"), parity_frames=2, max_batch=4,
                       int8=True, calib=str(tiny / "target"), calib_frames=4)
    res = export_onnx(cfg, log=lambda *_: None)
    assert res.parity["fp32"]["class_agreement"] >= 0.999
    assert res.parity["int8"]["frames"] == 2
    # onnxruntime's symbolic shape inference litters the working directory when it fails on dynamic graphs
    assert list(cwd.iterdir()) == []
    sess = ort.InferenceSession(str(res.files["fp32"]), providers=["CPUExecutionProvider"])
    seg, meta = load_checkpoint(segformer_ckpt)
    for b, h, w in [(1, 64, 96), (3, 72, 100), (2, 128, 160)]:
        x = np.random.default_rng(0).standard_normal((b, 3, h, w)).astype(np.float32)
        y = sess.run(None, {"pixel_values": x})[0]
        with torch.no_grad():
            ref = seg(torch.from_numpy(x)).numpy()
        assert y.shape == ref.shape == (b, 11, -(-h // 4), -(-w // 4))
        assert np.abs(y - ref).max() < 1e-3
    assert ModelMetadata.load(metadata_path(res.files["fp32"])).output_stride == 4


def test_export_rejects_auxiliary_stream_and_old_opset(tmp_path, tiny_classes, tiny_checkpoint):
    from segadapt.export.wrapper import ExportWrapper

    with pytest.raises(ValueError, match="RGB"):
        ExportWrapper(tiny_model("segformer", in_channels=4), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(tmp_path), opset=13), log=lambda *_: None)


def test_triton_config_parses_with_tritons_protobuf(static_export, tmp_path, segformer_ckpt):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient not installed")
    from google.protobuf import text_format

    from segadapt.export.triton import write_triton_repository

    d = write_triton_repository(static_export.files["fp32"], tmp_path / "repo", name="seg")
    cfg = text_format.Parse((d / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.name == "seg" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
    assert list(cfg.input[0].dims) == [1, 96, 128, 3] and cfg.input[0].data_type == pb.TYPE_UINT8
    assert list(cfg.output[0].dims) == [1, 96, 128] and cfg.output[0].data_type == pb.TYPE_UINT8
    assert (d / "1" / "model.onnx").read_bytes() == static_export.files["fp32"].read_bytes()
    from segadapt.export.triton import triton_config

    meta = ModelMetadata(classes=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]], dynamic=True, max_batch=8,
                         input_layout="float_nchw", input_name="pixel_values", output_kind="logits",
                         output_name="logits", output_dtype="float32", output_stride=4)
    cfg2 = text_format.Parse(triton_config(meta, "dyn", "tensorrt_plan", 4), pb.ModelConfig())
    assert cfg2.max_batch_size == 4 and list(cfg2.input[0].dims) == [3, -1, -1]
    assert list(cfg2.output[0].dims) == [2, -1, -1] and cfg2.dynamic_batching.max_queue_delay_microseconds == 2000


def test_tensorrt_build_skips_cleanly_without_tensorrt(static_export, tmp_path):
    from segadapt.export.tensorrt_build import TensorRTUnavailable, build_engine, tensorrt_status

    ok, why = tensorrt_status()
    if ok:
        meta = build_engine(static_export.files["fp32"], tmp_path / "m.engine", log=lambda *_: None)
        assert meta.format == "engine" and meta.tensorrt_version
        return
    print(f"TensorRT engine build not tested here: {why}")
    with pytest.raises(TensorRTUnavailable):
        build_engine(static_export.files["fp32"], tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_export_cli_engine_skips_cleanly_without_tensorrt(tiny_checkpoint, tiny, tmp_path, capsys):
    from segadapt.export.tensorrt_build import tensorrt_status
    from segadapt.cli import main

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is available here: the engine path is tested by the build test")
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--parity-data", str(tiny / "target"),
            "--parity-frames", "1"]
    assert main(["export", "--format", "onnx"] + args) == 0
    onnx_meta = ModelMetadata.load(tmp_path / "model.json")
    rc = main(["export", "--format", "engine"] + args)
    err = capsys.readouterr().err
    assert rc == 3 and "TensorRT engine skipped" in err and "Traceback" not in err
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model.engine.json").exists()
    # the ONNX file's sidecar still describes the ONNX file (an engine's metadata never goes to model.json)
    after = ModelMetadata.load(tmp_path / "model.json")
    assert after.format == "onnx" and after.tensorrt_version is None
    assert dict(after.to_dict(), created="") == dict(onnx_meta.to_dict(), created="")
    # an INT8 engine cannot be asked for in the onnxruntime form: one-line error before any work
    rc = main(["export", "--format", "engine", "--int8", "--int8-backend", "onnxruntime"] + args)
    assert rc == 2 and "int8-backend tensorrt" in capsys.readouterr().err


def test_bench_measures_each_backend_on_real_frames(tiny_checkpoint, tiny, short_clip, tmp_path):
    from segadapt.export.bench import format_bench, run_bench

    rep = run_bench(str(tiny_checkpoint), str(tiny / "target"), size=(96, 128), batch=2, iters=2, warmup=1,
                    out_dir=str(tmp_path), precisions=("fp32",), video=str(short_clip), log=lambda *_: None)
    res = rep["results"]
    eager, ort = res["pytorch-eager-cpu-fp32"], res["onnxruntime-cpu-fp32"]
    for r in (eager, ort):
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] and r["throughput_fps"] > 0 and r["peak_rss_mb"] > 0
    assert ort["class_agreement_vs_pytorch"] >= 0.999 and ort["batch"] == 2
    assert ort["video"]["frames"] == 50 and ort["video"]["codec"] == "h264" and 0 < ort["video"]["ratio"]
    assert ("tensorrt" in res) or any(k.startswith("tensorrt-") for k in res)
    text = format_bench(rep)
    assert "onnxruntime-cpu-fp32" in text
    video_rows = [r for r in text.splitlines()[text.splitlines().index("| backend | end-to-end fps | backend-only fps "
                                                                      "| ratio | frames | codec |"):] if "| 50 |" in r]
    import importlib.util

    names = [r.split("|")[1].strip() for r in video_rows]  # OpenVINO's video row runs its auto precision
    assert names[0] == "onnxruntime-cpu-fp32" and all("h264" in r for r in video_rows)
    assert [n.startswith("openvino-cpu-") for n in names[1:]] == ([True] if importlib.util.find_spec("openvino") else [])


# -- INT8 in the form of the backend that runs it ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_dusk(camvid, tiny, tmp_path_factory):
    """Dusk frames of target_adapt that are not among the tiny target frames (calibration never sees the frames the
    agreement is measured on)."""
    d = tmp_path_factory.mktemp("heldout") / "images"
    d.mkdir()
    seen = {p.name for p in (tiny / "target" / "images").iterdir()}
    for p in sorted((camvid / "target_adapt" / "images").iterdir()):
        if p.name not in seen:
            (d / p.name).symlink_to(p)
    assert len(list(d.iterdir())) >= 16
    return d.parent


@pytest.fixture(scope="module")
def trt_int8_export(tiny_checkpoint, tiny, heldout_dusk, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_trt_int8")
    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out), parity_data=str(tiny / "target"),
                       parity_frames=20, int8=True, calib=str(heldout_dusk), calib_frames=16, int8_backend="tensorrt")
    return export_onnx(cfg, log=lambda *_: None)


def _zero_points(model: onnx.ModelProto):
    init = {t.name: t for t in model.graph.initializer}
    return [init[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_tensorrt_int8_form_graph_invariants(trt_int8_export, static_export):
    from segadapt.export.onnx_export import tensorrt_qdq_problems

    q = onnx.load(str(trt_int8_export.files["int8"]))
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    zps = _zero_points(q)
    assert len(zps) > 50
    # every zero point is an int8 initializer equal to 0 (TensorRT: signed, symmetric)
    assert all(z.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(z).any() for z in zps)
    assert tensorrt_qdq_problems(q) == []
    # weights: int8 within [-127, 127], one scale per output channel on axis 0; biases stay float (no int32 DQ)
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    for c in convs:
        dq = producer[c.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = init[dq.input[0]], init[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert w.dtype == np.int8 and w.min() >= -127 and scale.shape == (w.shape[0],) and axis == 0
        assert (scale > 0).all()
        assert len(c.input) < 3 or init[c.input[2]].dtype == np.float32
    # activations: every Conv input is dequantised from int8; the input normalisation before the stem stays FP32
    assert sum(producer.get(c.input[0]) is not None and producer[c.input[0]].op_type == "DequantizeLinear"
               for c in convs) == len(convs)
    mul = next(n for n in q.graph.node if n.op_type == "Mul" and getattr(producer.get(n.input[0]), "op_type", "")
               == "Cast")
    assert all(producer[i].op_type != "DequantizeLinear" for i in mul.input if i in producer)
    # the onnxruntime form (uint8 asymmetric) is what TensorRT's parser rejects: the check tells them apart
    ort_form = onnx.load(str(static_export.files["int8"]))
    assert any(z.data_type == onnx.TensorProto.UINT8 for z in _zero_points(ort_form))
    assert any("UINT8" in p for p in tensorrt_qdq_problems(ort_form))


def test_tensorrt_int8_form_metadata_and_agreement_on_real_frames(trt_int8_export, static_export, heldout_dusk):
    meta = ModelMetadata.load(metadata_path(trt_int8_export.files["int8"]))
    q = meta.quantization
    assert q["scheme"] == "tensorrt" and q["activation_type"] == "int8" and q["weight_type"] == "int8"
    assert q["activation_symmetric"] and q["weight_symmetric"] and q["per_channel"] and q["bias"] == "float32"
    assert q["calibration_method"] == "minmax" and q["calibration_frames"] == 16
    assert q["calibration_data"] == str(heldout_dusk)
    assert ModelMetadata.load(metadata_path(static_export.files["int8"])).quantization["scheme"] == "onnxruntime"
    assert ModelMetadata.load(metadata_path(trt_int8_export.files["fp32"])).quantization == {}
    # agreement with PyTorch on all 20 real dusk frames (none used for calibration), computed as TensorRT does:
    # Q/DQ as written, float32 convolutions (measured 98.96 % on this 30-step model; FP32 graph 100 %)
    p = trt_int8_export.parity["int8"]
    assert p["frames"] == 20 and p["ort_graph_optimization"] == "none"
    assert p["class_agreement"] >= 0.98
    assert trt_int8_export.parity["fp32"]["class_agreement"] >= 0.999


def test_int8_form_follows_the_format():
    from segadapt.export.onnx_export import resolve_int8_backend

    assert resolve_int8_backend(ExportConfig(format="engine", int8=True)) == "tensorrt"
    assert resolve_int8_backend(ExportConfig(format="triton", int8=True)) == "tensorrt"
    assert resolve_int8_backend(ExportConfig(format="onnx", int8=True)) == "onnxruntime"
    assert resolve_int8_backend(ExportConfig(format="onnx", int8=True, int8_backend="tensorrt")) == "tensorrt"
    with pytest.raises(ValueError, match="int8-backend tensorrt"):
        resolve_int8_backend(ExportConfig(format="engine", int8=True, int8_backend="onnxruntime"))
    with pytest.raises(ValueError, match="int8-backend"):
        resolve_int8_backend(ExportConfig(int8_backend="cuda"))
    with pytest.raises(ValueError, match="int8-calibration"):
        resolve_int8_backend(ExportConfig(int8_calibration="kl"))


# -- metadata that travels --------------------------------------------------------------------------------------------


def test_each_artefact_has_its_own_sidecar(static_export, tmp_path):
    assert metadata_path("d/model.onnx") == Path("d/model.json")
    assert metadata_path("d/model.int8.onnx") == Path("d/model.int8.json")
    assert metadata_path("d/model.engine") == Path("d/model.engine.json")
    assert metadata_path("d/model.int8.engine") == Path("d/model.int8.engine.json")
    assert metadata_path("d/model.plan") == Path("d/model.plan.json")
    sidecars = {k: metadata_path(v) for k, v in static_export.files.items()}
    assert len(set(sidecars.values())) == 3 and all(p.is_file() for p in sidecars.values())
    assert {k: ModelMetadata.load(p).precision for k, p in sidecars.items()} == {"fp32": "fp32", "fp16": "fp16",
                                                                                "int8": "int8"}
    # a Triton repository keeps the naming: model.onnx + model.json, model.plan + model.plan.json
    import shutil

    from segadapt.export.triton import write_triton_repository

    lone = tmp_path / "lone.onnx"  # no sidecar: the metadata embedded in the graph is used
    shutil.copy(static_export.files["fp32"], lone)
    d = write_triton_repository(lone, tmp_path / "repo", name="seg")
    assert ModelMetadata.load(d / "1" / "model.json") == static_export.metadata["fp32"]
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    static_export.metadata["fp32"].save(metadata_path(engine))
    d = write_triton_repository(engine, tmp_path / "repo", name="seg_trt")
    assert (d / "1" / "model.plan").read_bytes() == b"PLAN" and (d / "1" / "model.plan.json").is_file()


def test_copied_onnx_alone_runs_with_its_classes_and_palette(static_export, tiny, tmp_path):
    import shutil

    import cv2

    from segadapt.runtime.predictor import Predictor

    lone = tmp_path / "lone.onnx"
    shutil.copy(static_export.files["fp32"], lone)
    assert not metadata_path(lone).exists()
    p = Predictor(lone, providers=["cpu"])
    meta = static_export.metadata["fp32"]
    assert p.metadata.classes == meta.classes and p.metadata.palette == meta.palette
    assert p.metadata.palette[3] != p.metadata.palette[0]  # a real palette, not a default
    f = sorted((tiny / "target" / "images").iterdir())[0]
    img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
    cm = p.predict(img).class_map
    colours = p.overlay(img, cm, 1.0)  # alpha 1: every pixel is its class's palette colour
    assert np.array_equal(colours, np.asarray(meta.palette, np.uint8)[cm])


# -- static batch N ----------------------------------------------------------------------------------------------------


def test_batches_pad_the_last_chunk_with_repeats():
    from segadapt.export.onnx_export import batches

    x = np.arange(5)[:, None] * np.ones((1, 3))
    got = list(batches(x, 2))
    assert [n for _, n in got] == [2, 2, 1] and all(b.shape == (2, 3) for b, _ in got)
    assert np.array_equal(got[2][0], [[4, 4, 4], [4, 4, 4]])


def test_static_batch_export_parity_and_calibration(tiny_checkpoint, tiny, tmp_path):
    import onnxruntime as ort

    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(tmp_path), batch=2, parity_data=str(tiny / "target"),
                       parity_frames=5, int8=True, calib=str(tiny / "target"), calib_frames=3)
    res = export_onnx(cfg, log=lambda *_: None)  # 5 parity and 3 calibration frames: both end on a padded batch
    m = onnx.load(str(res.files["fp32"]))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    p = res.parity["fp32"]
    assert p["batch"] == 2 and p["frames"] == 5 and p["class_agreement"] >= 0.999 and p["max_abs_logit_diff"] < 1e-3
    assert res.parity["int8"]["frames"] == 5 and res.parity["int8"]["class_agreement"] > 0.8
    sess = ort.InferenceSession(str(res.files["int8"]), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 96, 128, 3), np.uint8)
    assert sess.run(None, {"images": x})[0].shape == (2, 96, 128)
    assert ModelMetadata.load(metadata_path(res.files["fp32"])).batch == 2


# -- bench report ------------------------------------------------------------------------------------------------------


def test_format_bench_prints_the_video_section():
    from segadapt.export.bench import format_bench

    row = {"p50_ms": 10.0, "p90_ms": 12.0, "throughput_fps": 90.0, "batch": 8, "peak_rss_mb": 300.0}
    rep = {"results": {
        "onnxruntime-cpu-fp32": dict(row, video={"end_to_end_fps": 21.5, "backend_only_fps": 31.25, "ratio": 0.688,
                                                 "frames": 221, "codec": "h264", "stage_ms": {}}),
        "onnxruntime-cpu-int8": dict(row),
        "tensorrt": {"skipped": "TensorRT is not installed"}}}
    text = format_bench(rep)
    assert "| onnxruntime-cpu-fp32 | 21.5 | 31.2 | 69 % | 221 | h264 |" in text
    assert "Video (decode + segment + H.264 encode" in text
    assert sum("| onnxruntime-cpu-int8 |" in line for line in text.splitlines()) == 1  # no video row for it
    assert "Video" not in format_bench({"results": {"onnxruntime-cpu-int8": dict(row)}})


# -- TensorRT without TensorRT: fake `tensorrt` and `cuda.bindings.runtime` modules that record what is asked ----------


class _FakeCudart:
    """cuda-python's runtime API on host memory: "device" buffers are ctypes buffers, copies are memmove."""

    class cudaMemcpyKind:  # noqa: N801 (cuda-python's name)
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        import threading

        self.buffers, self.streams, self.lock = {}, [], threading.Lock()

    def cudaSetDevice(self, i):  # noqa: N802
        return (0,)

    def cudaGetDeviceProperties(self, i):  # noqa: N802
        from types import SimpleNamespace

        return 0, SimpleNamespace(name=b"Fake GPU")

    def cudaStreamCreate(self):  # noqa: N802
        with self.lock:
            self.streams.append(1000 + len(self.streams))
            return 0, self.streams[-1]

    def cudaMalloc(self, n):  # noqa: N802
        import ctypes

        buf = ctypes.create_string_buffer(int(n))
        with self.lock:
            self.buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        import ctypes

        ctypes.memmove(int(dst), int(src), int(n))
        return (0,)

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (0,)

    def cudaFree(self, a):  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, s):  # noqa: N802
        return (0,)


class _FakeContext:
    """An execution context whose "network" copies the red channel of a uint8 NHWC input into the class map."""

    def __init__(self, engine):
        self.engine, self.shape, self.addr, self.profile = engine, None, {}, 0

    def set_optimization_profile_async(self, p, stream):
        self.profile = p
        return True

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)

    def get_tensor_shape(self, name):
        return self.shape[:3] if name == "class_map" else self.shape

    def set_tensor_address(self, name, a):
        self.addr[name] = a

    def execute_async_v3(self, stream):
        import ctypes
        import time

        e = self.engine
        key = (id(self), stream, self.addr["images"], self.addr["class_map"])
        with e.lock:
            if any(k in a for a in e.active for k in key):  # a context, stream or buffer already in use
                e.violations.append(key)
            e.active.append(key)
            e.max_active = max(e.max_active, len(e.active))
        try:
            if e.barrier is not None:
                e.barrier.wait()  # both threads inside execute at the same time (fails when requests serialise)
            else:
                time.sleep(0.005)
            n = int(np.prod(self.shape))
            x = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(self.addr["images"])).reshape(self.shape)
            y = np.ascontiguousarray(x[..., 0])
            ctypes.memmove(self.addr["class_map"], y.ctypes.data, y.nbytes)
        finally:
            with e.lock:
                e.active.remove(key)
        return True


class _FakeEngine:
    def __init__(self, trt, dynamic: bool, profiles: int, parties: int):
        import threading

        self.trt, self.dynamic, self.num_optimization_profiles = trt, dynamic, profiles
        self.num_io_tensors = 2
        self.contexts, self.active, self.violations, self.max_active = [], [], [], 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(parties, timeout=10) if parties > 1 else None

    def get_tensor_name(self, i):
        return ["images", "class_map"][i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return (-1, -1, -1, 3) if self.dynamic else (2, 8, 8, 3)

    def get_tensor_dtype(self, name):
        return self.trt.uint8

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 4, 4, 3), (2, 8, 8, 3), (4, 8, 8, 3)]

    def create_execution_context(self):
        self.contexts.append(_FakeContext(self))
        return self.contexts[-1]


def _fake_tensorrt(version: str = "10.13.0", strongly_typed: bool = True, engine=None):
    """A ``tensorrt`` module with the builder, parser and runtime calls segadapt makes, recording them."""
    from types import ModuleType, SimpleNamespace

    trt = ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")
    for name in ("float32", "float16", "int32", "int8", "uint8", "bool", "int64"):
        setattr(trt, name, f"dt_{name}")
    ncf = {"STRONGLY_TYPED": 1} if strongly_typed else {}
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(**ncf)
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8") if version.startswith("10") else SimpleNamespace()
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")

    class Config:
        def set_memory_pool_limit(self, pool, n):
            trt.calls.append(("workspace", n))

        def set_flag(self, flag):
            trt.calls.append(("flag", flag))

        def add_optimization_profile(self, prof):
            trt.calls.append(("profile",))

        def create_timing_cache(self, blob):
            return SimpleNamespace(serialize=lambda: b"cache")

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: b"cache")

    class Network:
        def get_input(self, i):
            return SimpleNamespace(name="images")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.calls.append(("network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *a: trt.calls.append(("shape",) + a))

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            trt.calls.append(("parse", path))
            return True

    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda blob: engine)
    return trt


def _install_fakes(monkeypatch, trt, cudart=None):
    import sys
    from types import ModuleType

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if cudart is not None:
        cuda, bindings = ModuleType("cuda"), ModuleType("cuda.bindings")
        bindings.runtime, cuda.bindings = cudart, bindings
        monkeypatch.setitem(sys.modules, "cuda", cuda)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


def test_tensorrt_network_mode_per_version_and_precision():
    from segadapt.export.tensorrt_build import network_mode

    t10 = _fake_tensorrt("10.13.0")
    assert network_mode(t10, "int8", False) == (2, [], "int8")  # strongly typed: Q/DQ is the precision
    assert network_mode(t10, "fp16", False) == (2, [], "fp16")
    assert network_mode(t10, "fp32", True) == (0, ["FP16"], "fp16")  # weakly typed FP32 graph with FP16 kernels
    assert network_mode(t10, "fp32", False) == (0, [], "fp32")
    weak = _fake_tensorrt("10.3.0", strongly_typed=False)
    assert network_mode(weak, "int8", False) == (0, ["INT8"], "int8")  # weak typing: Q/DQ needs the INT8 flag
    assert network_mode(weak, "int8", True) == (0, ["INT8", "FP16"], "int8")
    t11 = _fake_tensorrt("11.4.0")
    assert network_mode(t11, "fp32", True) == (2, [], "fp32")  # always strongly typed, no precision flags


def test_export_engine_cli_with_fake_tensorrt_keeps_sidecars_apart(tiny_checkpoint, tiny, tmp_path, monkeypatch,
                                                                   capsys):
    from segadapt.cli import main

    trt = _fake_tensorrt("10.13.0")
    _install_fakes(monkeypatch, trt)
    rc = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--format", "engine",
               "--int8", "--calib", str(tiny / "target"), "--calib-frames", "4", "--parity-data", str(tiny / "target"),
               "--parity-frames", "2"])
    assert rc == 0, capsys.readouterr().err
    for stem in ("model", "model.int8"):
        onnx_meta = ModelMetadata.load(tmp_path / f"{stem}.json")
        engine_meta = ModelMetadata.load(tmp_path / f"{stem}.engine.json")
        assert (tmp_path / f"{stem}.engine").read_bytes() == b"PLAN"
        assert onnx_meta.format == "onnx" and onnx_meta.tensorrt_version is None
        assert engine_meta.format == "engine" and engine_meta.tensorrt_version == "10.13.0"
        assert engine_meta.classes == onnx_meta.classes and engine_meta.precision == onnx_meta.precision
    q = ModelMetadata.load(tmp_path / "model.int8.engine.json").quantization
    assert q["scheme"] == "tensorrt" and q["activation_type"] == "int8"
    # the INT8 engine was parsed from the TensorRT-form graph, in a strongly typed network, without precision flags
    parses = [c[1] for c in trt.calls if c[0] == "parse"]
    assert parses == [str(tmp_path / "model.onnx"), str(tmp_path / "model.int8.onnx")]
    assert [c[1] for c in trt.calls if c[0] == "network"] == [0, 2] and not [c for c in trt.calls if c[0] == "flag"]


def test_tensorrt_build_refuses_the_onnxruntime_int8_form(static_export, tmp_path, monkeypatch):
    from segadapt.export.tensorrt_build import build_engine

    _install_fakes(monkeypatch, _fake_tensorrt("10.13.0"))
    with pytest.raises(RuntimeError, match="int8-backend tensorrt"):
        build_engine(static_export.files["int8"], tmp_path / "m.engine", log=lambda *_: None)
    assert not (tmp_path / "m.engine").exists()


def _run_threads(backend, n_threads: int, calls: int):
    """Each thread sends its own frames (value = thread id * 10 + call) and checks it gets its own class map."""
    import threading

    errors = []

    def work(t):
        try:
            for i in range(calls):
                x = np.full((2, 8, 8, 3), t * 10 + i, np.uint8)
                y = backend.infer(x)
                if y.shape != (2, 8, 8) or not (y == t * 10 + i).all():
                    errors.append(f"thread {t} call {i}: got another request's output")
        except Exception as e:  # reported below
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    hung = [th.name for th in threads if th.is_alive()]
    assert hung == [], f"requests still waiting after 30 s (the context pool deadlocked): {hung}"
    return errors


def _trt_backend(monkeypatch, tmp_path, engine, **kw):
    from segadapt.runtime.backends import TrtBackend

    cudart = _FakeCudart()
    _install_fakes(monkeypatch, _fake_tensorrt("10.13.0", engine=engine), cudart)
    meta = ModelMetadata(classes=["a", "b"], palette=[[0, 0, 0], [9, 9, 9]], format="engine", batch=2,
                         tensorrt_version="10.13.0", gpu_name="Fake GPU")
    (tmp_path / "m.engine").write_bytes(b"PLAN")
    return TrtBackend(tmp_path / "m.engine", meta, **kw), cudart


def test_trt_backend_concurrent_requests_never_share_context_stream_or_buffers(monkeypatch, tmp_path):
    engine = _FakeEngine(_fake_tensorrt(), dynamic=False, profiles=1, parties=2)
    backend, cudart = _trt_backend(monkeypatch, tmp_path, engine, max_contexts=2)
    assert _run_threads(backend, 2, 5) == []
    assert engine.max_active == 2 and engine.violations == []  # ran at the same time, each with its own state
    assert len(engine.contexts) == 2 and len(cudart.streams) == 2 and len(cudart.buffers) == 4
    # more threads than contexts: they wait for a free one, the pool does not grow
    engine.barrier = None
    assert _run_threads(backend, 4, 3) == []
    assert len(engine.contexts) == 2 and engine.violations == [] and engine.max_active == 2


def test_trt_backend_dynamic_engine_one_context_per_profile(monkeypatch, tmp_path):
    from segadapt.runtime.backends import BackendError

    engine = _FakeEngine(_fake_tensorrt(), dynamic=True, profiles=1, parties=1)
    backend, _ = _trt_backend(monkeypatch, tmp_path, engine, max_contexts=4)
    assert backend.max_contexts == 1 and backend.max_shape == (4, 8, 8, 3)
    assert _run_threads(backend, 3, 4) == []
    assert len(engine.contexts) == 1 and engine.max_active == 1 and engine.violations == []  # one profile: in turn
    with pytest.raises(BackendError, match="exceeds"):
        backend.infer(np.zeros((5, 8, 8, 3), np.uint8))
    two = _FakeEngine(_fake_tensorrt(), dynamic=True, profiles=2, parties=2)
    backend2, _ = _trt_backend(monkeypatch, tmp_path, two, max_contexts=4)
    assert _run_threads(backend2, 2, 3) == []
    assert sorted(c.profile for c in two.contexts) == [0, 1] and two.max_active == 2 and two.violations == []
