"""``segadapt bench``: PyTorch eager vs ONNX Runtime (each provider, each precision) vs TensorRT on the same frames.

Each backend runs in its own process (``spawn``) so that its peak memory is its own: peak resident memory
(``VmHWM``) on CPU, ``torch.cuda.max_memory_allocated`` for CUDA PyTorch. Latency is measured at batch 1 after
warm-up (p50/p90 over ``iters`` runs, backend call only), throughput at batch N (frames/s), and, for the runtime
backends, end-to-end latency including pre- and post-processing (resize, normalise, resize the class map back).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np


def _stats(ts: List[float]) -> dict:
    a = np.asarray(ts) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean())}


def _time(fn: Callable[[], object], iters: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. Linux's VmHWM is reset at exec; ``ru_maxrss`` is not (a spawned
    child would report its parent's peak), so it is only the fallback."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _bench_torch(args: dict) -> dict:
    import torch

    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.export.frames import load_frames
    from segadapt.export.wrapper import ExportWrapper

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    dev = torch.device(args["device"])
    model, meta = load_segmenter(args["checkpoint"], map_location=dev)
    w = ExportWrapper(model, meta.mean, meta.std, "uint8_nhwc", "class_map").eval().to(dev)
    frames = load_frames(args["frames"], max(args["batch"], 4), tuple(args["size"]))
    x1 = torch.from_numpy(np.stack(frames[:1])).to(dev)
    xb = torch.from_numpy(np.stack((frames * args["batch"])[: args["batch"]])).to(dev)
    out = {}
    for dtype_name in args["dtypes"]:
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

        def run(x):
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
                y = w(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return y

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lat = _stats(_time(lambda: run(x1), args["iters"], args["warmup"]))
        tb = _time(lambda: run(xb), max(3, args["iters"] // 4), 1)
        r = {**lat, "throughput_fps": args["batch"] / float(np.median(tb)), "batch": args["batch"]}
        if dev.type == "cuda":
            r["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        r["peak_rss_mb"] = _peak_rss_mb()
        out[f"pytorch-eager-{dev.type}-{dtype_name}"] = r
    return out


def _bench_runtime(args: dict) -> dict:
    from segadapt.export.frames import load_frames
    from segadapt.runtime.predictor import Predictor

    p = Predictor(args["model"], providers=args.get("providers"), threads=args["threads"])
    frames = load_frames(args["frames"], max(args["batch"], 4), tuple(p.size))
    orig = load_frames(args["frames"], 1, tuple(args["frame_size"]))[0]
    x1, _ = p.preprocess(frames[:1])
    r = _stats(_time(lambda: p.backend.infer(x1), args["iters"], args["warmup"]))
    if p.max_batch >= args["batch"]:
        xb, _ = p.preprocess((frames * args["batch"])[: args["batch"]])
        tb = _time(lambda: p.backend.infer(xb), max(3, args["iters"] // 4), 1)
        r["throughput_fps"], r["batch"] = args["batch"] / float(np.median(tb)), args["batch"]
    else:
        r["throughput_fps"], r["batch"] = 1000.0 / r["mean_ms"], 1
    e2e = _stats(_time(lambda: p.predict(orig), max(5, args["iters"] // 2), 1))
    r["end_to_end_p50_ms"] = e2e["p50_ms"]
    r["backend"] = p.backend.describe()
    r["peak_rss_mb"] = _peak_rss_mb()
    if args.get("video"):
        from segadapt.runtime.video import segment_video

        # the backend alone in its fastest setting (spinning threads, the predictor above), then the video pipeline
        # in its own setting (idle ONNX Runtime threads do not spin: decoding and encoding need the CPU), with the
        # first session released so that the two never share the CPU
        xv, _ = p.preprocess(load_frames(args["frames"], 1, tuple(args["video_size"])))
        only = _stats(_time(lambda: p.backend.infer(xv), args["iters"], args["warmup"]))
        del p
        pv = Predictor(args["model"], providers=args.get("providers"), threads=args["threads"], spin=False)
        rep = segment_video(pv, args["video"], Path(args["tmp"]) / "bench_video.mp4", batch_size=1)
        r["video"] = {"end_to_end_fps": rep.fps, "backend_only_fps": 1000.0 / only["mean_ms"], "frames": rep.frames,
                      "ratio": rep.fps / (1000.0 / only["mean_ms"]), "codec": rep.codec, "stage_ms": rep.stage_ms}
    return {args["label"]: r}


def _worker(fn_name: str, args: dict, q) -> None:
    try:
        q.put(globals()[fn_name](args))
    except Exception as e:  # reported in the results, the bench goes on
        q.put({"error": f"{type(e).__name__}: {e}"})


def _in_process(fn_name: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pr = ctx.Process(target=_worker, args=(fn_name, args, q))
    pr.start()
    res = q.get()
    pr.join()
    return res


def _bench_onnxruntime(exp, trt_exp, args: dict, video: str, vsize, log) -> dict:
    """Each available ONNX Runtime provider on each exported graph (the TensorRT provider gets the TensorRT-form INT8
    graph); the video pipeline on the FP32 graph."""
    from segadapt.runtime.backends import available_ort_providers

    results: dict = {}
    for prov in available_ort_providers():
        for prec, path in exp.files.items():
            src = trt_exp if (prov == "tensorrt" and prec == "int8" and trt_exp is not None) else exp
            label = f"onnxruntime-{prov}-{prec}"
            log(f"bench {label}")
            res = _in_process("_bench_runtime", dict(args, model=str(src.files[prec]), providers=[prov], label=label,
                                                      frame_size=vsize or args["size"],
                                                      video=video if prec == "fp32" else "", video_size=args["size"]))
            if "error" in res:
                res = {label: {"error": res["error"]}}
            res[label]["class_agreement_vs_pytorch"] = src.parity[prec]["class_agreement"]
            results.update(res)
    return results


def _bench_tensorrt(exp, trt_exp, args: dict, out: Path, log) -> dict:
    """A TensorRT engine per exported graph (INT8 from the TensorRT-form graph), each measured in its own process."""
    from segadapt.export.tensorrt_build import build_engine

    results: dict = {}
    for prec, path in exp.files.items():
        label = f"tensorrt-{prec}"
        src = trt_exp.files["int8"] if prec == "int8" and trt_exp is not None else path
        try:
            build_engine(src, out / f"model.{prec}.engine", log=log)
            res = _in_process("_bench_runtime", dict(args, model=str(out / f"model.{prec}.engine"), threads=0,
                                                      label=label, frame_size=args["size"], video=""))
        except Exception as e:  # recorded, the rest of the bench goes on
            res = {label: {"error": f"{type(e).__name__}: {e}"}}
        results.update(res)
    return results


def run_bench(checkpoint: str, frames: str, size=None, batch: int = 8, iters: int = 30, warmup: int = 5,
              threads: int = 0, out_dir: Optional[str] = None, precisions=("fp32", "int8"), video: str = "",
              log: Callable[[str], None] = print) -> dict:
    """Export (if needed) and measure every backend available here on the same frames.

    INT8 is exported in the onnxruntime form for ONNX Runtime's CPU and CUDA providers and, where TensorRT (native
    or ONNX Runtime's TensorRT provider) is available, also in the TensorRT form (``<out>/tensorrt-int8/``) for it.

    Args:
        checkpoint: our checkpoint.
        frames: folder of real frames used as inputs (and INT8 calibration).
        size: (H, W) model input size (default: the checkpoint's).
        batch: batch size for the throughput figure.
        precisions: ONNX variants to measure (``fp32``, ``fp16``, ``int8``).
        video: optional video file: measures end-to-end video throughput vs backend-only throughput (FP32 graph,
            each ONNX Runtime provider), reported under each result's ``video``.

    Returns:
        dict with ``machine``, ``config`` and ``results`` (one entry per backend/precision, or an ``error``).
    """
    from dataclasses import replace

    import onnxruntime as ort

    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.export.config import ExportConfig
    from segadapt.export.onnx_export import export_onnx
    from segadapt.export.tensorrt_build import tensorrt_status
    from segadapt.runtime.backends import available_ort_providers

    _, meta = load_segmenter(checkpoint)
    size = tuple(size) if size else tuple(meta.input_size)
    out = Path(out_dir) if out_dir else Path(checkpoint).with_name(Path(checkpoint).name + "-bench")
    out.mkdir(parents=True, exist_ok=True)
    cfg = ExportConfig(checkpoint=checkpoint, out=str(out), imgsz=size, batch=1, dynamic=True, max_batch=batch,
                       half="fp16" in precisions, int8="int8" in precisions, calib=frames, parity_data=frames,
                       int8_backend="onnxruntime")
    exp = export_onnx(cfg, log=log)
    trt_ok, why = tensorrt_status()
    trt_exp = None
    if cfg.int8 and (trt_ok or "tensorrt" in available_ort_providers()):
        trt_exp = export_onnx(replace(cfg, out=str(out / "tensorrt-int8"), half=False, int8_backend="tensorrt"),
                              log=log)
    results: dict = {}
    import torch

    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        log(f"bench PyTorch eager on {dev}")
        results.update(_in_process("_bench_torch", dict(checkpoint=checkpoint, device=dev, frames=frames, size=size,
                                                         batch=batch, iters=iters, warmup=warmup, threads=threads,
                                                         dtypes=["fp32"] + (["fp16"] if dev == "cuda" else []))))
    vsize = None
    if video:
        import cv2

        cap = cv2.VideoCapture(video)
        vsize = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
        cap.release()
    args = dict(threads=threads, frames=frames, batch=batch, iters=iters, warmup=warmup, tmp=str(out), size=size)
    results.update(_bench_onnxruntime(exp, trt_exp, args, video, vsize, log))
    results.update(_bench_tensorrt(exp, trt_exp, args, out, log) if trt_ok else {"tensorrt": {"skipped": why}})
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": mp.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "config": {"checkpoint": checkpoint, "frames": frames, "size": list(size), "batch": batch, "iters": iters,
                   "threads": threads or "default", "arch": exp.metadata["fp32"].arch},
        "results": results,
    }


def format_bench(rep: dict) -> str:
    """:func:`run_bench` results as Markdown: a table of latencies (ms), throughput (frames/s), memory (MiB) and
    agreement with PyTorch, then, for the backends measured on a video, a table of the video pipeline (decode +
    segment + H.264 encode) against the backend alone."""
    rows = ["| backend | p50 ms (b=1) | p90 ms | end-to-end p50 ms | throughput fps (b) | peak MB | agreement |",
            "|---|---|---|---|---|---|---|"]
    for k, r in rep["results"].items():
        if "p50_ms" not in r:
            rows.append(f"| {k} | {r.get('error') or r.get('skipped')} | | | | | |")
            continue
        e2e = f"{r['end_to_end_p50_ms']:.1f}" if "end_to_end_p50_ms" in r else ""
        agr = f"{r['class_agreement_vs_pytorch'] * 100:.2f} %" if "class_agreement_vs_pytorch" in r else ""
        mem = r.get("peak_gpu_mem_mb", r.get("peak_rss_mb", 0))
        rows.append(f"| {k} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {e2e} | {r['throughput_fps']:.1f} ({r['batch']}) "
                    f"| {mem:.0f} | {agr} |")
    videos = {k: r["video"] for k, r in rep["results"].items() if isinstance(r.get("video"), dict)}
    if videos:
        rows += ["", "Video (decode + segment + H.264 encode, batch 1, FP32 graph):", "",
                 "| backend | end-to-end fps | backend-only fps | ratio | frames | codec |",
                 "|---|---|---|---|---|---|"]
        for k, v in videos.items():
            rows.append(f"| {k} | {v['end_to_end_fps']:.1f} | {v['backend_only_fps']:.1f} | {v['ratio'] * 100:.0f} % "
                        f"| {v['frames']} | {v['codec']} |")
    return "\n".join(rows)


def save_report(rep: dict, path: str | Path) -> None:
    """Write the bench results as JSON (parent directories created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rep, indent=1))
