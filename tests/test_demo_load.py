"""The demo under load: 8 concurrent gradio_client clients against a real ``segadapt demo`` process on 127.0.0.1
for a bounded time (benchmarks/demo_load.py). Every request is answered (queued while the model is busy), the server
stays up, its peak memory is printed."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the demo needs gradio ([demo] extra)")
pytest.importorskip("onnxruntime", reason="the demo runs an ONNX model")

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("demo_load", ROOT / "benchmarks" / "demo_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eight_clients_are_all_answered_and_the_server_holds(tmp_path, tiny, short_clip, camvid):
    from test_bad_inputs import _onnx_model  # a tiny real ONNX graph with metadata: the server is under test here

    names = json.loads((camvid / "classes.json").read_text())["classes"]
    model = _onnx_model(tmp_path / "m.onnx", names)
    image = sorted((tiny / "target" / "images").iterdir())[0]
    rep = _load_module().run_load(str(model), str(image), str(short_clip), clients=8, seconds=12, video_every=8)
    print("demo load:", json.dumps(rep))
    assert rep["server_alive"] and rep["threads_finished"]
    assert rep["requests"] >= 8 and rep["answered"] == rep["requests"], rep["errors"]
    assert rep["videos"] >= 1
    assert 0 < rep["server_peak_rss_mb"] < 4096
