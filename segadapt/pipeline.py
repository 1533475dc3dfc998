"""``segadapt pipeline``: the user's whole journey in one resumable run directory.

Steps (each records its outputs in ``<out>/state.json``; re-running skips finished steps; a failing step is
reported by name while what earlier steps wrote stays in place):

1. ``train_source``: train the source model on ``source_train``, select on ``source_val`` (or reuse
   ``--source-checkpoint``).
2. ``adapt``: source-free adaptation on the target split's images (AdaBN + EMA self-training + rectifier; no labels).
3. ``evaluate``: source-only and adapted mIoU on ``source_val`` and on the target split (labels for measuring only).
4. ``export``: the adapted RGB segmenter (and the source model, as the demo's reference) to ONNX, FP32 and FP16,
   with metadata and parity.
5. ``video``: segment the dash-cam clip with the runtime (ONNX Runtime) into an H.264 overlay video.
6. ``report``: ``report.json`` + ``report.md`` (mIoU table, per-class IoU, timings, file list) and an overlay frame.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Tuple

from segadapt.adapt.config import (AdaptConfig, ModelConfig, SourceTrainConfig, default_camvid_dir, default_data_root,
                                   to_dict)
from segadapt.adapt.typed_config import NonNegFloat, NonNegInt, Size


@dataclass
class PipelineConfig:
    """The main job (``segadapt pipeline``): source model -> source-free adaptation -> measurements -> ONNX export
    -> segmented video -> report, in one resumable run directory. Fields left at their zero value take the preset's
    value. Splits are read from ``data``: ``source_train``/``source_val`` (source, labelled), the target split (its
    images for adaptation, its labels only to measure)."""

    data: str = field(default_factory=default_camvid_dir)
    """data root: source_train/, source_val/, the target split and classes.json"""
    out: str = "runs/pipeline"
    """run directory (resumable: finished steps are skipped)"""
    preset: Literal["quick", "full"] = "quick"
    """quick: 120x160, minutes on 2 CPU cores, real frames; full: 360x480, benchmark-length schedules (a GPU)"""
    source_checkpoint: str = ""
    """reuse this source model instead of training one"""
    arch: Literal["deeplabv3-mobilenetv2", "segformer"] = "deeplabv3-mobilenetv2"
    """segmenter architecture of the source model"""
    size: Size = (0, 0)
    """H W of training and inference; 0 0 = the preset's"""
    source_steps: NonNegInt = 0
    """source training steps; 0 = the preset's"""
    source_minutes: NonNegFloat = 0.0
    """source training wall-clock cap in minutes; 0 = the preset's"""
    adapt_steps: NonNegInt = 0
    """adaptation steps; 0 = the preset's"""
    adapt_minutes: NonNegFloat = 0.0
    """adaptation wall-clock cap in minutes; 0 = the preset's"""
    target_split: str = "target_adapt"
    """target split folder under --data (images for adaptation; labels, if present, only to measure)"""
    video: str = ""
    """clip segmented at the end; empty = the dash-cam clip in the data root, or the target frames if it is missing"""
    video_max_frames: NonNegInt = 0
    """segment at most this many frames of the clip (0 = all)"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N"""
    seed: NonNegInt = 0
    """random seed of every step"""


PIPELINE_PRESETS = {
    "quick": {"size": (120, 160), "source_steps": 1500, "source_minutes": 7.0, "batch_size": 8,
              "adapt_steps": 150, "adapt_minutes": 4.0},
    "full": {"size": (360, 480), "source_steps": 20000, "source_minutes": 0.0, "batch_size": 8,
             "adapt_steps": 3000, "adapt_minutes": 0.0},
}


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the cause."""


def _resolved(cfg: PipelineConfig) -> dict:
    if cfg.preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PIPELINE_PRESETS)}")
    p = dict(PIPELINE_PRESETS[cfg.preset])
    for k in ("source_steps", "source_minutes", "adapt_steps", "adapt_minutes"):
        if getattr(cfg, k):
            p[k] = getattr(cfg, k)
    if all(cfg.size):
        p["size"] = tuple(cfg.size)
    return p


_IMAGES = (".png", ".jpg", ".jpeg", ".bmp")


def _has_images(d: Path) -> bool:
    d = d / "images" if (d / "images").is_dir() else d
    return d.is_dir() and any(f.suffix.lower() in _IMAGES for f in d.iterdir())


def default_video() -> Path:
    """The dash-cam clip in the data root (``<data root>/video/solidWhiteRight.mp4``)."""
    return Path(default_data_root()) / "video" / "solidWhiteRight.mp4"


def check_inputs(cfg: PipelineConfig, state: dict) -> List[str]:
    """Every input the remaining steps will read, checked before step 1 (steps already done need nothing).

    Returns:
        notes for the log (e.g. "no clip: the target frames are segmented instead").

    Raises:
        FileNotFoundError: one line listing everything that is missing.
    """
    done = state.get("done", {})
    data = Path(cfg.data)
    missing, notes = [], []
    if "train_source" not in done:
        if cfg.source_checkpoint:
            if not Path(cfg.source_checkpoint).exists():
                missing.append(f"--source-checkpoint {cfg.source_checkpoint}")
        else:
            for split in ("source_train", "source_val"):
                for sub in ("images", "labels"):
                    if not _has_images(data / split / sub):
                        missing.append(f"{data / split / sub} (images)")
            if not (data / "classes.json").is_file():
                missing.append(f"{data / 'classes.json'}")
    if not {"adapt", "export"} <= set(done) and not _has_images(data / cfg.target_split):
        missing.append(f"{data / cfg.target_split}/images (the target frames, --target-split)")
    if "video" not in done:
        if cfg.video and not Path(cfg.video).is_file():
            missing.append(f"--video {cfg.video}")
        elif not cfg.video and not default_video().is_file():
            notes.append(f"no clip at {default_video()}: the video step segments the {cfg.target_split} frames as "
                         f"a clip instead (--video sets one)")
    if missing:
        raise FileNotFoundError("pipeline inputs missing, nothing was run: " + "; ".join(missing))
    return notes


def frames_to_clip(folder: Path, out_path: Path, fps: float = 5.0, max_frames: int = 0) -> Path:
    """Write the images of a split folder (``<folder>/images`` or ``<folder>``), sorted by name, as an H.264 clip at
    the first frame's size (the runtime's :class:`~segadapt.runtime.video.VideoWriter`).

    Raises:
        ValueError: no readable image.
    """
    import cv2

    from segadapt.runtime.video import VideoWriter

    d = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in _IMAGES)[: max_frames or None]
    size = None
    with VideoWriter(out_path, fps) as w:
        for f in files:
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{f}: cannot read as an image")
            size = size or (bgr.shape[1], bgr.shape[0])
            w.write(cv2.cvtColor(cv2.resize(bgr, size), cv2.COLOR_BGR2RGB))
    if size is None:
        raise ValueError(f"{d}: no image files to make a clip of")
    return out_path


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns the report dict.

    Raises:
        StepFailed: a step raised; earlier steps' outputs are kept and ``state.json`` says which step failed.
    """
    out = Path(cfg.out)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"done": {}}
    p = _resolved(cfg)
    for note in check_inputs(cfg, state):
        log(note)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data)
    target = data / cfg.target_split
    video = Path(cfg.video) if cfg.video else default_video()
    device = cfg.device

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)

    def done(name: str) -> dict:
        return state["done"][name]

    def step_train_source() -> dict:
        if cfg.source_checkpoint:
            return {"checkpoint": cfg.source_checkpoint, "reused": True}
        from segadapt.adapt.train_source import train_source

        steps = p["source_steps"]
        scfg = SourceTrainConfig(data=str(data), out=str(out / "source"), size=p["size"], steps=steps,
                                 max_minutes=p["source_minutes"], batch_size=p["batch_size"], device=device,
                                 seed=cfg.seed, val_every=max(50, steps // 4), save_every=max(50, steps // 10),
                                 resume=True, warmup_steps=min(200, steps // 10), model=ModelConfig(arch=cfg.arch))
        s = train_source(scfg, log=log)
        return {"checkpoint": str(out / "source" / "best"), "summary": s}

    def step_adapt() -> dict:
        from segadapt.adapt.self_training import adapt

        acfg = AdaptConfig(checkpoint=done("train_source")["checkpoint"], target=str(target), out=str(out / "adapt"),
                           size=p["size"], steps=p["adapt_steps"], max_minutes=p["adapt_minutes"],
                           batch_size=4, device=device, seed=cfg.seed, resume=True, debug_every=50,
                           save_every=max(25, p["adapt_steps"] // 4))
        s = adapt(acfg, log=log)
        return {"checkpoint": str(out / "adapt" / "adapted"), "summary": s}

    def step_evaluate() -> dict:
        from segadapt.adapt.evaluate import evaluate_checkpoint

        res: Dict[str, dict] = {}
        dev = "cpu" if device == "auto" else device
        for model, ck in (("source_only", done("train_source")["checkpoint"]), ("adapted", done("adapt")["checkpoint"])):
            for split in ("source_val", cfg.target_split):
                if not (data / split / "labels").is_dir():
                    log(f"skip {split}: no labels in {data / split}")
                    continue
                m = evaluate_checkpoint(ck, data / split, device=dev, progress=False,
                                        json_out=str(out / "metrics" / f"{model}_{split}.json"))
                res[f"{model}/{split}"] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "iou": m["iou"],
                                           "classes": m["classes"]}
                log(f"{model} on {split}: mIoU {m['miou']:.2f}")
        return {"metrics": res}

    def step_export() -> dict:
        from segadapt.export.config import ExportConfig
        from segadapt.export.onnx_export import export_onnx

        files = {}
        parity = {}
        for name, ck, half in (("adapted", done("adapt")["checkpoint"], True),
                               ("source", done("train_source")["checkpoint"], False)):
            r = export_onnx(ExportConfig(checkpoint=ck, out=str(out / "export"), name=name, half=half,
                                         parity_data=str(target)), log=log)
            for prec, f in r.files.items():
                files[f"{name}.{prec}"] = str(f)
                parity[f"{name}.{prec}"] = r.parity[prec]
        return {"files": files, "parity": parity}

    def step_video() -> dict:
        from segadapt.runtime.predictor import Predictor
        from segadapt.runtime.video import segment_video

        clip = video
        if not clip.is_file():  # check_inputs said so: the target frames become the clip
            clip = frames_to_clip(target, out / "video" / f"{cfg.target_split}_frames.mp4",
                                  max_frames=cfg.video_max_frames)
        pred = Predictor(done("export")["files"]["adapted.fp32"], providers=["cpu"], spin=False)
        rep = segment_video(pred, clip, out / "video" / f"{clip.stem}_adapted.mp4",
                            max_frames=cfg.video_max_frames or None)
        log(f"video: {rep.frames} frames at {rep.fps:.1f} frames/s -> {rep.output}")
        # one overlay frame for the README / report
        import cv2

        cap = cv2.VideoCapture(str(clip))
        cap.set(cv2.CAP_PROP_POS_FRAMES, min(100, max(0, rep.frames - 1)))
        ok, bgr = cap.read()
        cap.release()
        frame_png = ""
        if ok:
            rgb = bgr[:, :, ::-1].copy()
            ov = pred.overlay(rgb, pred.predict(rgb).class_map, 0.5)
            frame_png = str(out / "video" / "overlay_frame.png")
            cv2.imwrite(frame_png, ov[:, :, ::-1])
        return {"video": rep.output, "source": str(clip), "report": rep.to_dict(), "overlay_frame": frame_png}

    def step_report() -> dict:
        rep = build_report(cfg, p, state)
        (out / "report.json").write_text(json.dumps(rep, indent=1))
        (out / "report.md").write_text(report_markdown(rep))
        return {"report": str(out / "report.json")}

    steps: List[Tuple[str, Callable[[], dict]]] = [
        ("train_source", step_train_source), ("adapt", step_adapt), ("evaluate", step_evaluate),
        ("export", step_export), ("video", step_video), ("report", step_report)]
    for name, fn in steps:
        if name in state["done"] and name != "report":
            log(f"[{name}] done earlier, skipping")
            continue
        log(f"[{name}] running")
        t0 = time.time()
        try:
            result = fn()
        except Exception as e:
            state["failed"] = {"step": name, "error": f"{type(e).__name__}: {e}"}
            save_state()
            raise StepFailed(f"pipeline step '{name}' failed: {type(e).__name__}: {e} "
                             f"(outputs of earlier steps are kept in {out}; re-run to resume)") from e
        result["seconds"] = time.time() - t0
        state["done"][name] = result
        state.pop("failed", None)
        save_state()
    return json.loads((out / "report.json").read_text())


def build_report(cfg: PipelineConfig, preset: dict, state: dict) -> dict:
    d = state["done"]
    metrics = d.get("evaluate", {}).get("metrics", {})
    tgt = cfg.target_split
    gain = None
    if f"adapted/{tgt}" in metrics and f"source_only/{tgt}" in metrics:
        gain = metrics[f"adapted/{tgt}"]["miou"] - metrics[f"source_only/{tgt}"]["miou"]
    files = {"source_checkpoint": d.get("train_source", {}).get("checkpoint"),
             "adapted_checkpoint": d.get("adapt", {}).get("checkpoint"),
             **{f"onnx.{k}": v for k, v in d.get("export", {}).get("files", {}).items()},
             "video_source": d.get("video", {}).get("source"),
             "overlay_video": d.get("video", {}).get("video"),
             "overlay_frame": d.get("video", {}).get("overlay_frame")}
    return {
        "config": to_dict(cfg),
        "preset": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()},
        "metrics": metrics,
        "target_gain_miou": gain,
        "export_parity": d.get("export", {}).get("parity", {}),
        "video": d.get("video", {}).get("report", {}),
        "timings_s": {k: round(v.get("seconds", 0.0), 1) for k, v in d.items()},
        "files": files,
    }


def report_markdown(rep: dict) -> str:
    lines = ["# segadapt pipeline report", "", f"Preset `{rep['config']['preset']}`, data `{rep['config']['data']}`.",
             "", "| model | split | mIoU | pixel acc |", "|---|---|---|---|"]
    for key, v in rep["metrics"].items():
        model, split = key.split("/")
        lines.append(f"| {model} | {split} | {v['miou']:.2f} | {v['pixel_acc']:.2f} |")
    if rep.get("target_gain_miou") is not None:
        lines += ["", f"Adaptation gain on `{rep['config']['target_split']}`: **{rep['target_gain_miou']:+.2f} mIoU**"]
    if rep["metrics"]:
        names = next(iter(rep["metrics"].values()))["classes"]
        keys = list(rep["metrics"])
        lines += ["", "Per-class IoU", "", "| class | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for i, n in enumerate(names):
            vals = [rep["metrics"][k]["iou"][i] for k in keys]
            lines.append(f"| {n} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + " |")
    if rep.get("export_parity"):
        lines += ["", "Export parity vs PyTorch on real target frames", "", "| graph | same class | max abs logit diff |",
                  "|---|---|---|"]
        for k, v in rep["export_parity"].items():
            d = v.get("max_abs_logit_diff")
            lines.append(f"| {k} | {v['class_agreement'] * 100:.3f} % | {'' if d is None else f'{d:.2e}'} |")
    if rep.get("video"):
        v = rep["video"]
        src = rep["files"].get("video_source")
        lines += ["", f"Video: {v['frames']} frames{f' of `{src}`' if src else ''}, {v['fps']:.1f} frames/s end to "
                  f"end ({v['codec']}), `{v['output']}`"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items()), "", "Files:", ""]
    lines += [f"- {k}: `{v}`" for k, v in rep["files"].items() if v]
    return "\n".join(lines) + "\n"
