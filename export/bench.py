"""``segadapt bench``: PyTorch eager vs ONNX Runtime (each provider, each precision) vs OpenVINO (f32, bf16, NNCF
INT8) vs TensorRT on the same frames, each against the model's FLOP floor on this machine.

Each backend runs in its own process (``spawn``) so that its peak memory is its own: peak resident memory
(``VmHWM``) on CPU, ``torch.cuda.max_memory_allocated`` for CUDA PyTorch. Latency is measured at batch 1 after
warm-up (p50/p90 over ``iters`` runs, backend call only), throughput at batch N (frames/s), and, for the runtime
backends, end-to-end latency including pre- and post-processing (resize, normalise, resize the class map back).
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from segadapt.runtime.files import write_json


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

    kw = dict(backend=args.get("backend", "auto"), precision=args.get("precision", "auto"))
    p = Predictor(args["model"], providers=args.get("providers"), threads=args["threads"], **kw)
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
    if args.get("reference"):  # the backend's classes vs PyTorch's on the parity frames, one frame per call
        ref = np.load(args["reference"])
        got = np.concatenate([p.backend.infer(ref["x"][i:i + 1]) for i in range(len(ref["x"]))])
        r["class_agreement_vs_pytorch"] = float((got.astype(np.int64) == ref["ref"].astype(np.int64)).mean())
    r["peak_rss_mb"] = _peak_rss_mb()
    if args.get("video"):
        from segadapt.runtime.video import segment_video

        # the backend alone in its fastest setting (spinning threads, the predictor above), then the video pipeline
        # in its own setting (idle ONNX Runtime threads do not spin: decoding and encoding need the CPU), with the
        # first session released so that the two never share the CPU
        xv, _ = p.preprocess(load_frames(args["frames"], 1, tuple(args["video_size"])))
        only = _stats(_time(lambda: p.backend.infer(xv), args["iters"], args["warmup"]))
        del p
        pv = Predictor(args["model"], providers=args.get("providers"), threads=args["threads"], spin=False, **kw)
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
    """``fn_name(args)`` in a fresh spawned process: its result, or ``{"error": ...}`` when it raised or died without
    one (a crashed backend, the OOM killer) instead of waiting for it forever."""
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pr = ctx.Process(target=_worker, args=(fn_name, args, q))
    pr.start()
    while True:
        try:
            res = q.get(timeout=1.0)
            break
        except queue.Empty:
            if pr.is_alive():
                continue
            try:
                res = q.get(timeout=1.0)  # put just before it exited
            except queue.Empty:
                res = {"error": f"the measuring process ended (exit code {pr.exitcode}) without a result"}
            break
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
                                                      backend="onnxruntime",
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


def _reference(checkpoint: str, frames: str, size, out: Path, n: int = 8) -> Path:
    """PyTorch's class maps on ``n`` real frames at ``size`` (the graph's inputs and the class maps, uint8 NHWC and
    (n, H, W)), saved as ``<out>/reference.npz`` for the runtime rows measured in other processes."""
    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.export.frames import load_frames
    from segadapt.export.onnx_export import _reference as torch_reference
    from segadapt.export.wrapper import ExportWrapper

    model, meta = load_segmenter(checkpoint)
    w = ExportWrapper(model.eval(), meta.mean, meta.std, "uint8_nhwc", "class_map").eval()
    x = np.stack(load_frames(frames, n, tuple(size)))
    ref, _ = torch_reference(w, x, 1)
    path = out / "reference.npz"
    np.savez(path, x=x, ref=ref)
    return path


def _bench_openvino(exp, args: dict, out: Path, video: str, vsize, log) -> dict:
    """OpenVINO on the CPU: the FP32 graph in f32 and bf16 (bf16 skipped, with the reason, on a CPU without it) and
    an NNCF INT8 IR calibrated on the bench frames; each row's class agreement is measured against PyTorch on the
    reference frames. The video pipeline runs on the precision ``auto`` picks (bf16 where supported)."""
    from segadapt.export.frames import load_frames
    from segadapt.runtime.openvino_backend import cpu_capabilities, cpu_supports_bf16

    results: dict = {}
    bf16 = cpu_supports_bf16()
    rows = [("f32", exp.files["fp32"], "f32")]
    rows.append(("bf16", exp.files["fp32"], "bf16") if bf16 else ("bf16", None, "this CPU has no bf16 arithmetic "
                 f"(OpenVINO capabilities: {', '.join(cpu_capabilities())})"))
    if "int8" in exp.files:
        try:
            from segadapt.export.openvino_int8 import export_openvino_int8

            ref = np.load(args["reference"])
            meta = exp.metadata["fp32"].to_dict()
            base = {k: v for k, v in meta.items() if k not in ("precision", "parity", "quantization", "format")}
            calib = [f[None] for f in load_frames(args["frames"], 32, tuple(args["size"]))]
            xml, _, _ = export_openvino_int8(exp.files["fp32"], out / "model.int8.xml", calib, ref["x"], ref["ref"],
                                             base, args["frames"], parity_data=args["frames"], log=log)
            rows.append(("int8", xml, "auto"))
        except Exception as e:  # nncf missing or failing: recorded, the bench goes on
            rows.append(("int8", None, f"{type(e).__name__}: {e}"))
    auto = "bf16" if bf16 else "f32"
    for name, path, prec in rows:
        label = f"openvino-cpu-{name}"
        if path is None:
            results[label] = {"skipped": prec}
            continue
        log(f"bench {label}")
        res = _in_process("_bench_runtime", dict(args, model=str(path), backend="openvino", precision=prec,
                                                  label=label, frame_size=vsize or args["size"],
                                                  video=video if name == auto else "", video_size=args["size"]))
        results.update({label: {"error": res["error"]}} if "error" in res else res)
    return results


def _add_floor(results: dict, floor: dict) -> None:
    """Each measured row's distance to the FLOP floor: ``x_floor`` (p50 at batch 1 / floor) and ``x_floor_batch``
    (time per frame at the throughput batch / floor)."""
    for r in results.values():
        if "p50_ms" in r and floor.get("floor_ms"):
            r["x_floor"] = r["p50_ms"] / floor["floor_ms"]
            r["x_floor_batch"] = 1000.0 / r["throughput_fps"] / floor["floor_ms"]


def run_bench(checkpoint: str, frames: str, size=None, batch: int = 8, iters: int = 30, warmup: int = 5,
              threads: int = 0, out_dir: Optional[str] = None, precisions=("fp32", "int8"), video: str = "",
              log: Callable[[str], None] = print, backends: str = "auto") -> dict:
    """Export (if needed) and measure every backend available here on the same frames, each against the model's
    FLOP floor on this machine (:mod:`segadapt.export.flops`).

    INT8 is exported in the onnxruntime form for ONNX Runtime's CPU and CUDA providers and, where TensorRT (native
    or ONNX Runtime's TensorRT provider) is available, also in the TensorRT form (``<out>/tensorrt-int8/``) for it.

    Args:
        checkpoint: our checkpoint.
        frames: folder of real frames used as inputs (and INT8 calibration).
        size: (H, W) model input size (default: the checkpoint's).
        batch: batch size for the throughput figure.
        precisions: ONNX variants to measure (``fp32``, ``fp16``, ``int8``).
        video: optional video file: measures end-to-end video throughput vs backend-only throughput (FP32 graph,
            each ONNX Runtime provider; OpenVINO in the precision ``auto`` picks), reported under each result's
            ``video``.
        backends: ``auto`` (every runtime installed: ONNX Runtime, OpenVINO, TensorRT) or one of them; PyTorch
            eager is always measured. OpenVINO rows: f32, bf16 (where the CPU has it) and an NNCF INT8 IR.

    Returns:
        dict with ``machine``, ``config``, ``floor`` (model GFLOP per frame, measured GEMM GFLOP/s, floor ms per
        frame) and ``results`` (one entry per backend/precision, or an ``error``/``skipped``; measured rows carry
        ``x_floor`` and ``x_floor_batch``, their time per frame over the floor).
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
    args = dict(threads=threads, frames=frames, batch=batch, iters=iters, warmup=warmup, tmp=str(out), size=size)
    results.update(_bench_runtimes(exp, trt_exp, args, out, video, backends, (trt_ok, why), log))
    from segadapt.export.flops import flop_floor

    floor = flop_floor(exp.files["fp32"], (1, *size, 3) if exp.metadata["fp32"].input_layout == "uint8_nhwc"
                       else (1, 3, *size))
    _add_floor(results, floor)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": mp.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    from segadapt.runtime.openvino_backend import cpu_capabilities, openvino_installed

    if openvino_installed():
        import openvino as ov

        machine.update(openvino=ov.get_version().split("-")[0], openvino_cpu_capabilities=cpu_capabilities())
    return {
        "machine": machine,
        "config": {"checkpoint": checkpoint, "frames": frames, "size": list(size), "batch": batch, "iters": iters,
                   "threads": threads or "default", "arch": exp.metadata["fp32"].arch},
        "floor": floor,
        "results": results,
    }


def _bench_runtimes(exp, trt_exp, args: dict, out: Path, video: str, backends: str, trt_status, log) -> dict:
    """The runtime rows: ONNX Runtime, OpenVINO and TensorRT (those ``backends`` names, where installed)."""
    from segadapt.runtime.openvino_backend import openvino_installed

    vsize = None
    if video:
        import cv2

        cap = cv2.VideoCapture(video)
        vsize = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
        cap.release()
    results: dict = {}
    if backends in ("auto", "onnxruntime"):
        results.update(_bench_onnxruntime(exp, trt_exp, args, video, vsize, log))
    if backends in ("auto", "openvino"):
        if openvino_installed():
            args = dict(args, reference=str(_reference(exp.metadata["fp32"].source_checkpoint, args["frames"],
                                                       args["size"], out)))
            results.update(_bench_openvino(exp, args, out, video, vsize, log))
        else:
            results["openvino"] = {"skipped": "openvino is not installed (pip install 'segadapt[openvino-int8]')"}
    if backends in ("auto", "tensorrt"):
        trt_ok, why = trt_status
        results.update(_bench_tensorrt(exp, trt_exp, args, out, log) if trt_ok else {"tensorrt": {"skipped": why}})
    return results


def format_bench(rep: dict) -> str:
    """:func:`run_bench` results as Markdown: the FLOP floor, a table of latencies (ms), throughput (frames/s),
    memory (MiB), agreement with PyTorch and distance to the floor, then, for the backends measured on a video, a
    table of the video pipeline (decode + segment + H.264 encode) against the backend alone."""
    rows = []
    fl = rep.get("floor")
    if fl:
        rows += [f"FLOP floor: {fl['gflop']:.2f} GFLOP per {'x'.join(map(str, fl['input_shape']))} frame (Conv/MatMul/"
                 f"Gemm of the ONNX graph) / {fl['gemm_gflops']:.0f} GFLOP/s (numpy float32 GEMM here) = "
                 f"{fl['floor_ms']:.1f} ms per frame", ""]
    rows += ["| backend | p50 ms (b=1) | p90 ms | end-to-end p50 ms | throughput fps (b) | peak MB | agreement "
             "| x floor (b=1) | x floor (b) |", "|---|---|---|---|---|---|---|---|---|"]
    for k, r in rep["results"].items():
        if "p50_ms" not in r:
            rows.append(f"| {k} | {r.get('error') or r.get('skipped')} | | | | | | | |")
            continue
        e2e = f"{r['end_to_end_p50_ms']:.1f}" if "end_to_end_p50_ms" in r else ""
        agr = f"{r['class_agreement_vs_pytorch'] * 100:.2f} %" if "class_agreement_vs_pytorch" in r else ""
        mem = r.get("peak_gpu_mem_mb", r.get("peak_rss_mb", 0))
        xf = f"{r['x_floor']:.2f} | {r['x_floor_batch']:.2f}" if "x_floor" in r else " | "
        rows.append(f"| {k} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {e2e} | {r['throughput_fps']:.1f} ({r['batch']}) "
                    f"| {mem:.0f} | {agr} | {xf} |")
    videos = {k: r["video"] for k, r in rep["results"].items() if isinstance(r.get("video"), dict)}
    if videos:
        rows += ["", "Video (decode + segment + H.264 encode, batch 1; ONNX Runtime on the FP32 graph, OpenVINO in "
                 "its auto precision):", "",
                 "| backend | end-to-end fps | backend-only fps | ratio | frames | codec |",
                 "|---|---|---|---|---|---|"]
        for k, v in videos.items():
            rows.append(f"| {k} | {v['end_to_end_fps']:.1f} | {v['backend_only_fps']:.1f} | {v['ratio'] * 100:.0f} % "
                        f"| {v['frames']} | {v['codec']} |")
    return "\n".join(rows)


def save_report(rep: dict, path: str | Path) -> None:
    """Write the bench results as JSON, atomically (parent directories created; errors as
    :func:`segadapt.runtime.files.write_json`)."""
    write_json(path, rep, what="report")
