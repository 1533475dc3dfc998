"""The two INT8 Q/DQ forms of `segadapt export --int8`, side by side on real frames: agreement with PyTorch and
ONNX Runtime CPU latency.

For each form (``onnxruntime``: uint8 asymmetric activations; ``tensorrt``: signed symmetric int8, zero points 0) the
script exports the checkpoint with INT8 calibrated on ``--calib`` frames, then measures, on ``--frames``:

- class agreement with PyTorch in ONNX Runtime with all graph optimisations (what a CPU deployment runs) and with
  none (each Q/DQ applied as written, float convolutions: how TensorRT computes the graph);
- ONNX Runtime CPU latency at batch 1 (p50 over ``--iters`` runs, default optimisations).

Example (the run recorded in docs/results.md, "INT8 forms"):
    python benchmarks/int8_forms.py --checkpoint runs/pipeline/adapt/adapted --json runs/bench/int8_forms.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from segadapt.adapt.config import default_camvid_dir
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.export.config import ExportConfig
from segadapt.export.frames import load_frames
from segadapt.export.onnx_export import _ort_session, _reference, _to_input, export_onnx, parity_report
from segadapt.export.wrapper import ExportWrapper
from segadapt.runtime.files import list_images, write_json


def _p50_ms(sess, x: np.ndarray, iters: int) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {name: x})
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(ts, 50))


def held_out(calib: str, frames: str, work: Path) -> str:
    """A folder of links to the ``calib`` images whose names are not among the ``frames`` images (no calibration on
    the frames that are scored)."""
    scored = {f.name for f in list_images(frames)}
    out = work / "calib_held_out"
    out.mkdir(parents=True, exist_ok=True)
    for f in list_images(calib):
        if f.name not in scored and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    return str(out)


def measure(checkpoint: str, frames: str, calib: str, work: Path, n_frames: int, calib_frames: int,
            iters: int) -> dict:
    """Export both INT8 forms of ``checkpoint`` and measure them (see the module docstring); a JSON-ready dict."""
    calib = held_out(calib, frames, work)
    model, meta = load_segmenter(checkpoint)
    size = tuple(meta.input_size)
    wrapper = ExportWrapper(model.eval(), meta.mean, meta.std).eval()
    x = _to_input(load_frames(frames, n_frames, size), "uint8_nhwc", meta.mean, meta.std)
    ref, ref_logits = _reference(wrapper, x, 1)
    rows = {}
    for form in ("onnxruntime", "tensorrt"):
        res = export_onnx(ExportConfig(checkpoint=checkpoint, out=str(work / form), int8=True, int8_backend=form,
                                       calib=calib, calib_frames=calib_frames, parity_data=frames,
                                       parity_frames=2), log=lambda *_: None)
        q = onnx.load(str(res.files["int8"]))
        rows[form] = {
            "agreement_ort_all_optimizations": parity_report(q, x, ref, ref_logits)["class_agreement"],
            "agreement_ort_no_optimizations": parity_report(q, x, ref, ref_logits, exact_qdq=True)["class_agreement"],
            "p50_ms_int8": _p50_ms(_ort_session(q), x[:1], iters),
            "quantization": res.metadata["int8"].quantization,
        }
        rows[form]["p50_ms_fp32"] = _p50_ms(_ort_session(onnx.load(str(res.files["fp32"]))), x[:1], iters)
    return {"checkpoint": checkpoint, "frames": frames, "calib": calib, "n_frames": int(x.shape[0]),
            "size": list(size), "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "forms": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="segadapt checkpoint")
    ap.add_argument("--frames", default=str(Path(default_camvid_dir()) / "tiny" / "target"),
                    help="real frames for the agreement (default: CamVid tiny target, 20 dusk frames)")
    ap.add_argument("--calib", default=str(Path(default_camvid_dir()) / "target_adapt"),
                    help="real target frames for calibration, those also in --frames left out (default: CamVid "
                    "target_adapt)")
    ap.add_argument("--n-frames", type=int, default=20, help="frames compared (default: 20)")
    ap.add_argument("--calib-frames", type=int, default=16, help="calibration frames (default: 16)")
    ap.add_argument("--iters", type=int, default=30, help="timed runs (default: 30)")
    ap.add_argument("--work", default="runs/bench/int8_forms", help="where the exported graphs go")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    rep = measure(a.checkpoint, a.frames, a.calib, Path(a.work), a.n_frames, a.calib_frames, a.iters)
    for form, r in rep["forms"].items():
        print(f"{form:12s} agreement {r['agreement_ort_all_optimizations'] * 100:6.2f} % (ORT optimised) "
              f"{r['agreement_ort_no_optimizations'] * 100:6.2f} % (Q/DQ as written); "
              f"p50 {r['p50_ms_int8']:.1f} ms vs FP32 {r['p50_ms_fp32']:.1f} ms")
    if a.json:
        write_json(a.json, rep, what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
