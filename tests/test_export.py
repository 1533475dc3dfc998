"""Export: ONNX graphs hold only the RGB segmenter, match PyTorch on real frames, carry metadata."""

import json

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
    rc = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--format", "engine",
               "--parity-data", str(tiny / "target"), "--parity-frames", "1"])
    err = capsys.readouterr().err
    assert rc == 3 and "TensorRT engine skipped" in err and "Traceback" not in err
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.json").is_file()


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
    assert "onnxruntime-cpu-fp32" in format_bench(rep)
