"""``segadapt pipeline``: the user's whole journey in one resumable run directory.

Steps (each records its outputs in ``<out>/state.json``; re-running skips finished steps; a failing step is
reported by name while what earlier steps wrote stays in place):

1. ``train_source``: train the source model on ``source_train``, select on ``source_val`` (or reuse
   ``--source-checkpoint``).
2. ``adapt``: source-free adaptation on the target split's images (AdaBN blended 0.75 + EMA self-training +
   teacher-anchor pseudo-label weights; no labels).
3. ``evaluate``: source-only and adapted mIoU on ``source_val`` and on the target split (labels for measuring only).
4. ``export``: the adapted RGB segmenter (and the source model, as the demo's reference) to ONNX, FP32 and FP16,
   with metadata and parity.
5. ``video``: segment the dash-cam clip with the runtime (ONNX Runtime) into an H.264 overlay video.
6. ``report``: ``report.json`` + ``report.md`` (mIoU table, per-class IoU, the adaptation's label-free monitor and
   its ``monitor.png``, timings, file list) and an overlay frame.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Dict, List, Literal, Tuple

from segadapt.adapt.methods.config import BiDAConfig, RCCRConfig
from segadapt.adapt.methods.config import SecoConfig
from segadapt.adapt.config import (AdaptConfig, ModelConfig, MonitorConfig, SourceTrainConfig, TeacherConfig,
                                   check_device, default_camvid_dir, default_data_root, to_dict)
from segadapt.adapt.typed_config import Bounds, NonNegFloat, NonNegInt, Size, check_size
from segadapt.provenance import run_provenance, source_commit
from segadapt.runtime.files import list_images, write_atomic, write_json


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
    """quick: 144x192, 800 source steps with rare-class sampling and a balanced loss + 150 adaptation steps (a
    CPU); full: 360x480, 20000 + 3000 steps (a GPU). A preset counts steps, not minutes"""
    source_checkpoint: str = ""
    """reuse this source model instead of training one"""
    arch: Literal["deeplabv3-mobilenetv2", "segformer"] = "deeplabv3-mobilenetv2"
    """segmenter architecture of the source model"""
    size: Size = (0, 0)
    """H W of training and inference; 0 0 = the preset's"""
    keep_aspect: NonNegInt = 0
    """adaptation and target evaluation at the target's aspect: short side in pixels, long side from the frames
    (e.g. 120 -> 120x400 on KITTI); 0 = --size"""
    source_steps: NonNegInt = 0
    """source training steps; 0 = the preset's"""
    source_minutes: NonNegFloat = 0.0
    """wall-clock cap on source training, minutes (0 = none); a run it stops is reported as cut short"""
    adapt_steps: NonNegInt = 0
    """adaptation steps; 0 = the preset's"""
    adapt_minutes: NonNegFloat = 0.0
    """wall-clock cap on adaptation, minutes (0 = none); reported like --source-minutes"""
    adapt_teacher_alpha: Annotated[float, Bounds(0, 1, hi_open=True)] = 0.0
    """EMA momentum of the adaptation's teacher, in [0, 1); 0 = the preset's (quick 0.99, full 0.999).
    Use 0.999 for runs of 1000 steps or more"""
    target_split: str = "target_adapt"
    """target split folder under --data (its images adapt; its labels, if any, only measure)"""
    video: str = ""
    """clip segmented at the end; empty = the dash-cam clip in the data root, else the target frames"""
    video_max_frames: NonNegInt = 0
    """segment at most this many frames of the clip (0 = all)"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N"""
    seed: NonNegInt = 0
    """random seed of every step"""
    until: Literal["train_source", "adapt", "evaluate", "export", "video"] = "video"
    """last step to run before the report (e.g. evaluate: no export, no video)"""
    uda: bool = False
    """UDA mode: adapt with the data root's labelled source_train as source data, at the UDA learning rate
    (6e-5); false = source-free"""
    rccr: RCCRConfig = field(default_factory=RCCRConfig)
    bida: BiDAConfig = field(default_factory=BiDAConfig)
    seco: SecoConfig = field(default_factory=SecoConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self) -> None:
        check_size(self.size, "--size", zero_means="the preset's")
        check_device(self.device)


PIPELINE_PRESETS = {
    # A preset may also hold "source_train": {SourceTrainConfig field: value} and "uda": {AdaptConfig field: value}
    # applied in the UDA mode only (e.g. rare_class_sampling); no preset holds "uda" yet.
    # quick: 800 source steps at 144x192, batch 8, take about 6 min on the project's 2-core CPU; the steps, not the
    # minutes, are the preset, so that a rerun gives the same model. The source recipe (144x192, rare-class sampling,
    # median-frequency weights ^ 0.5) was chosen on source_val over 3 seeds against 120x160 and plain cross-entropy
    # (docs/results.md, "Rare classes", 2026-12-04).
    # adapt_teacher_alpha: 0.99 measured at 150 steps, 0.999 at 1000 (TeacherConfig; docs/changelog.md, 2026-12-02)
    "quick": {"size": (144, 192), "source_steps": 800, "source_minutes": 0.0, "batch_size": 8,
              "adapt_steps": 150, "adapt_minutes": 0.0, "adapt_teacher_alpha": 0.99,
              "source_train": {"rare_class_sampling": True, "loss": "balanced", "class_weight_power": 0.5}},
    "full": {"size": (360, 480), "source_steps": 20000, "source_minutes": 0.0, "batch_size": 8,
             "adapt_steps": 3000, "adapt_minutes": 0.0, "adapt_teacher_alpha": 0.999},
}


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the cause."""


def _resolved(cfg: PipelineConfig) -> dict:
    if cfg.preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PIPELINE_PRESETS)}")
    p = dict(PIPELINE_PRESETS[cfg.preset])
    for k in ("source_steps", "source_minutes", "adapt_steps", "adapt_minutes", "adapt_teacher_alpha"):
        if getattr(cfg, k):
            p[k] = getattr(cfg, k)
    if all(cfg.size):
        p["size"] = tuple(cfg.size)
    return p


def _has_images(d: Path) -> bool:
    """Whether ``d`` (or ``d/images``) holds image files (:func:`~segadapt.runtime.files.list_images`'s rule)."""
    try:
        return d.is_dir() and bool(list_images(d))
    except (FileNotFoundError, ValueError):
        return False


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
    no_clip = "video" not in done and not cfg.video and not default_video().is_file()
    needs_target = not {"adapt", "export"} <= set(done) or no_clip  # adaptation, parity frames, or the clip
    if needs_target and not _has_images(data / cfg.target_split):
        missing.append(f"{data / cfg.target_split}/images (the target frames, --target-split)")
    if "video" not in done and cfg.video and not Path(cfg.video).is_file():
        missing.append(f"--video {cfg.video}")
    if no_clip:
        notes.append(f"no clip at {default_video()}: the video step segments the {cfg.target_split} frames as a clip "
                     f"instead (--video sets one)")
    if missing:
        raise FileNotFoundError("pipeline inputs missing, nothing was run: " + "; ".join(missing))
    return notes


def frames_to_clip(folder: Path, out_path: Path, fps: float = 5.0, max_frames: int = 0) -> Path:
    """Write the images of a split folder (``<folder>/images`` or ``<folder>``), sorted by name, as an H.264 clip at
    the first frame's size (the runtime's :class:`~segadapt.runtime.video.VideoWriter`), ``fps`` frames per second,
    at most ``max_frames`` (0 = all).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: no image files, or one that cannot be read (named).
    """
    import cv2

    from segadapt.runtime.video import VideoWriter

    files = list_images(folder)[: max_frames or None]
    size = None
    with VideoWriter(out_path, fps) as w:
        for f in files:
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{f}: cannot read as an image")
            size = size or (bgr.shape[1], bgr.shape[0])
            w.write(cv2.cvtColor(cv2.resize(bgr, size), cv2.COLOR_BGR2RGB))
    return out_path


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns the report dict.

    Raises:
        FileNotFoundError: inputs missing (all listed, checked before step 1; nothing was run).
        StepFailed: a step raised; earlier steps' outputs are kept and ``state.json`` says which step failed.
    """
    return _PipelineRun(cfg, log).run()


class _PipelineRun:
    """One (resumed) run of the pipeline: its config, resolved preset, run directory and ``state.json``; one method
    per step, each returning what the state records for it."""

    def __init__(self, cfg: PipelineConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"done": {}}
        self.p = _resolved(cfg)
        self.data = Path(cfg.data)
        self.target = self.data / cfg.target_split
        self.video = Path(cfg.video) if cfg.video else default_video()

    def done(self, name: str) -> dict:
        return self.state["done"][name]

    def save_state(self) -> None:
        write_json(self.state_path, self.state)

    def run(self) -> dict:
        for note in check_inputs(self.cfg, self.state):
            self.log(note)
        self.out.mkdir(parents=True, exist_ok=True)
        steps: List[Tuple[str, Callable[[], dict]]] = [
            ("train_source", self.step_train_source), ("adapt", self.step_adapt), ("evaluate", self.step_evaluate),
            ("export", self.step_export), ("video", self.step_video), ("report", self.step_report)]
        last = [n for n, _ in steps].index(self.cfg.until)
        steps = steps[: last + 1] + steps[-1:]
        for name, fn in steps:
            if name in self.state["done"] and name != "report":
                self.log(f"[{name}] done earlier, skipping")
                continue
            self.log(f"[{name}] running")
            t0 = time.time()
            try:
                result = fn()
            except Exception as e:
                self.state["failed"] = {"step": name, "error": f"{type(e).__name__}: {e}"}
                self.save_state()
                raise StepFailed(f"pipeline step '{name}' failed: {type(e).__name__}: {e} "
                                 f"(outputs of earlier steps are kept in {self.out}; re-run to resume)") from e
            result["seconds"] = time.time() - t0
            result["commit"] = source_commit()["commit"]
            self.state["done"][name] = result
            self.state.pop("failed", None)
            self.save_state()
        return json.loads((self.out / "report.json").read_text())

    def step_train_source(self) -> dict:
        cfg, p = self.cfg, self.p
        if cfg.source_checkpoint:
            return {"checkpoint": cfg.source_checkpoint, "reused": True}
        from segadapt.adapt.train_source import train_source

        steps = p["source_steps"]
        scfg = SourceTrainConfig(data=str(self.data), out=str(self.out / "source"), size=p["size"], steps=steps,
                                 max_minutes=p["source_minutes"], batch_size=p["batch_size"], device=cfg.device,
                                 seed=cfg.seed, val_every=max(50, steps // 4), save_every=max(50, steps // 10),
                                 resume="auto", warmup_steps=min(200, steps // 10), model=ModelConfig(arch=cfg.arch),
                                 **p.get("source_train", {}))
        s = train_source(scfg, log=self.log)
        return {"checkpoint": str(self.out / "source" / "best"), "summary": s, "recipe": p.get("source_train", {})}

    def step_adapt(self) -> dict:
        from segadapt.adapt.engine import adapt

        p = self.p
        acfg = AdaptConfig(checkpoint=self.done("train_source")["checkpoint"], target=str(self.target),
                           out=str(self.out / "adapt"), size=(0, 0) if self.cfg.keep_aspect else p["size"],
                           keep_aspect=self.cfg.keep_aspect, steps=p["adapt_steps"],
                           max_minutes=p["adapt_minutes"], batch_size=4, device=self.cfg.device, seed=self.cfg.seed,
                           teacher=TeacherConfig(alpha=p["adapt_teacher_alpha"]),
                           resume="auto", debug_every=50, save_every=max(25, p["adapt_steps"] // 4),
                           rccr=self.cfg.rccr, bida=self.cfg.bida, seco=self.cfg.seco, monitor=self.cfg.monitor,
                           source_data=str(self.data / "source_train") if self.cfg.uda else "",
                           **(p.get("uda", {}) if self.cfg.uda else {}))
        s = adapt(acfg, log=self.log)
        return {"checkpoint": str(self.out / "adapt" / "adapted"), "summary": s}

    def step_evaluate(self) -> dict:
        from segadapt.adapt.evaluate import evaluate_checkpoint

        res: Dict[str, dict] = {}
        dev = "cpu" if self.cfg.device == "auto" else self.cfg.device
        models = (("source_only", self.done("train_source")["checkpoint"]),
                  ("adapted", self.done("adapt")["checkpoint"]))
        for model, ck in models:
            for split in ("source_val", self.cfg.target_split):
                if not (self.data / split / "labels").is_dir():
                    self.log(f"skip {split}: no labels in {self.data / split}")
                    continue
                size = self.done("adapt")["summary"].get("size") if split == self.cfg.target_split else None
                m = evaluate_checkpoint(ck, self.data / split, size=size, device=dev, progress=False,
                                        json_out=str(self.out / "metrics" / f"{model}_{split}.json"))
                res[f"{model}/{split}"] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "iou": m["iou"],
                                           "classes": m["classes"]}
                self.log(f"{model} on {split}: mIoU {m['miou']:.2f}")
        return {"metrics": res, "rare_classes": source_rare_classes(self.data / "source_train", self.log)}

    def step_export(self) -> dict:
        from segadapt.export.config import ExportConfig
        from segadapt.export.onnx_export import export_onnx

        files, parity = {}, {}
        for name, ck, half in (("adapted", self.done("adapt")["checkpoint"], True),
                               ("source", self.done("train_source")["checkpoint"], False)):
            r = export_onnx(ExportConfig(checkpoint=ck, out=str(self.out / "export"), name=name, half=half,
                                         parity_data=str(self.target)), log=self.log)
            for prec, f in r.files.items():
                files[f"{name}.{prec}"] = str(f)
                parity[f"{name}.{prec}"] = r.parity[prec]
        return {"files": files, "parity": parity}

    def step_video(self) -> dict:
        from segadapt.runtime.predictor import Predictor
        from segadapt.runtime.video import segment_video

        cfg, out = self.cfg, self.out
        clip = self.video
        if not clip.is_file():  # check_inputs said so: the target frames become the clip
            clip = frames_to_clip(self.target, out / "video" / f"{cfg.target_split}_frames.mp4",
                                  max_frames=cfg.video_max_frames)
        pred = Predictor(self.done("export")["files"]["adapted.fp32"], providers=["cpu"], spin=False)
        rep = segment_video(pred, clip, out / "video" / f"{clip.stem}_adapted.mp4",
                            max_frames=cfg.video_max_frames or None)
        self.log(f"video: {rep.frames} frames at {rep.fps:.1f} frames/s -> {rep.output}")
        frame_png = _overlay_frame(pred, clip, min(100, max(0, rep.frames - 1)), out / "video" / "overlay_frame.png")
        return {"video": rep.output, "source": str(clip), "report": rep.to_dict(), "overlay_frame": frame_png}

    def step_report(self) -> dict:
        rep = build_report(self.cfg, self.p, self.state)
        write_json(self.out / "report.json", rep)
        write_atomic(self.out / "report.md", report_markdown(rep).encode())
        write_json(self.out / "summary.json", run_summary(rep))
        return {"report": str(self.out / "report.json")}


def _overlay_frame(pred, clip: Path, index: int, png: Path) -> str:
    """Frame ``index`` of ``clip`` with the predictor's overlay, written to ``png`` (for the README and report);
    returns its path, or "" when the frame cannot be read."""
    import cv2

    cap = cv2.VideoCapture(str(clip))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        return ""
    rgb = bgr[:, :, ::-1].copy()
    ov = pred.overlay(rgb, pred.predict(rgb).class_map, 0.5)
    cv2.imwrite(str(png), ov[:, :, ::-1])
    return str(png)


def build_report(cfg: PipelineConfig, preset: dict, state: dict) -> dict:
    """The report dict (``report.json``): config, resolved preset, mIoU per model and split (0-100), the target gain,
    export parity, the video report, seconds per step and the files written."""
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
             "overlay_frame": d.get("video", {}).get("overlay_frame"),
             "monitor_plot": d.get("adapt", {}).get("summary", {}).get("monitor_plot")}
    return {
        "config": to_dict(cfg),
        "preset": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()},
        "seed": cfg.seed,
        "size": list(preset["size"]),
        "adapt_size": d.get("adapt", {}).get("summary", {}).get("size"),  # adaptation and target evaluation
        "steps": steps_done(preset, d),
        "source_recipe": d.get("train_source", {}).get("recipe"),  # the options the source model was trained with
        "provenance": {**run_provenance(), "step_commits": {k: v.get("commit") for k, v in d.items()}},
        "metrics": metrics,
        "target_gain_miou": gain,
        "export_parity": d.get("export", {}).get("parity", {}),
        "video": d.get("video", {}).get("report", {}),
        "timings_s": {k: round(v.get("seconds", 0.0), 1) for k, v in d.items()},
        "files": files,
        "adapt_monitor": adapt_monitor(d.get("adapt", {}).get("summary", {})),
        "selection": d.get("adapt", {}).get("summary", {}).get("selection"),
        "rare_classes": d.get("evaluate", {}).get("rare_classes"),
    }


def source_rare_classes(split: Path, log: Callable[[str], None] = print, n: int = 4) -> List[dict]:
    """The ``n`` classes with the smallest pixel share in the labels of a source split (``<split>/labels``,
    ``classes.json`` in it or its parents), rarest first: ``[{"name", "share" (in [0, 1])}]``; empty (and a log
    line) when the split has no labels or a label file cannot be read."""
    from segadapt.adapt.data.datasets import find_classes_json
    from segadapt.adapt.data.rare_class import compute_class_stats, rarest_classes
    from segadapt.runtime.classes import ClassInfo

    try:
        classes = ClassInfo.load(find_classes_json(split))
        stats = compute_class_stats(sorted((split / "labels").glob("*.png")), classes.names, classes.ignore_index)
        return [{"name": name, "share": share} for name, share in rarest_classes(stats.frequencies(), classes.names, n)]
    except (OSError, ValueError) as e:
        log(f"no rare-class table: {e}")
        return []


def rare_class_lines(rep: dict) -> List[str]:
    """Markdown lines for the rare classes (:func:`source_rare_classes`): their source pixel share and their IoU
    for every model and split evaluated. Empty without them."""
    rare, metrics = rep.get("rare_classes"), rep.get("metrics") or {}
    if not rare or not metrics:
        return []
    keys = list(metrics)
    lines = ["", f"Rare classes (the {len(rare)} smallest pixel shares of the source labels): IoU", "",
             "| class | source pixels | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rare:
        vals = []
        for k in keys:
            names = metrics[k]["classes"]
            v = metrics[k]["iou"][names.index(r["name"])] if r["name"] in names else None
            vals.append("n/a" if v is None else f"{v:.1f}")
        lines.append(f"| {r['name']} | {r['share'] * 100:.2f} % | " + " | ".join(vals) + " |")
    return lines


def steps_done(preset: dict, done: dict) -> Dict[str, dict]:
    """Steps planned and made by source training and adaptation, and whether a wall-clock cap
    (``--source-minutes`` / ``--adapt-minutes``) cut the run short: ``{"source": {"planned", "done", "cut_short"},
    "adapt": {...}}``; a reused source checkpoint has ``"reused": True`` and no counts."""
    out: Dict[str, dict] = {}
    for name, step, key, cap in (("source", "train_source", "source_steps", "source_minutes"),
                                 ("adapt", "adapt", "adapt_steps", "adapt_minutes")):
        r = done.get(step)
        if r is None:
            continue
        if r.get("reused"):
            out[name] = {"reused": True}
            continue
        made = int(r.get("summary", {}).get("steps", 0))
        out[name] = {"planned": int(preset[key]), "done": made,
                     "cut_short": bool(preset[cap]) and made < int(preset[key]), "minutes_cap": preset[cap]}
    return out


def run_summary(rep: dict) -> dict:
    """``summary.json``: the headline of :func:`build_report`'s dict (what decides the result and what it was):
    seed, size, steps, provenance, stage times and mIoU per model and split."""
    return {"seed": rep["seed"], "size": rep["size"], "adapt_size": rep.get("adapt_size"), "steps": rep["steps"],
            "provenance": rep["provenance"], "timings_s": rep["timings_s"], "target_gain_miou": rep["target_gain_miou"],
            "miou": {k: round(v["miou"], 4) for k, v in rep["metrics"].items()}}


def adapt_monitor(summary: dict) -> dict | None:
    """The adaptation's label-free monitor (:mod:`segadapt.adapt.monitor`) from its ``summary.json``: the last
    logged step's signals, the plot and why the run stopped early (None: it did not); None for runs without it."""
    if "monitor" not in summary:
        return None
    return {**summary["monitor"], "plot": summary.get("monitor_plot"), "stopped_early": summary.get("stopped_early")}


def _monitor_lines(rep: dict) -> List[str]:
    """Markdown lines for the adaptation monitor: the last logged step's signals, an early stop and the plot
    (embedded, relative to the report)."""
    mon = rep.get("adapt_monitor")
    if not mon or not mon.get("last"):
        return []
    last = mon["last"]
    agree = "no anchor" if last["anchor_agreement"] is None else f"{last['anchor_agreement']:.3f}"
    lines = ["", f"Adaptation monitor (no labels) at step {last['step']}: class-share drift {last['class_drift']:.3f}, "
             f"teacher-anchor agreement {agree}, teacher entropy {last['entropy']:.3f} (of log K)."]
    if mon.get("stopped_early"):
        lines.append(f"The run **stopped early**: {mon['stopped_early']}.")
    if mon.get("plot"):
        lines += ["", f"![adaptation monitor]({os.path.relpath(mon['plot'], rep['config']['out'])})"]
    return lines


#: validators shown in the report's candidates table (all are in selection.json)
_SHOWN = ("entropy", "im", "snd", "mixval_intra", "mixval_inter", "agreement", "drift")


def selection_lines(sel: dict | None) -> List[str]:
    """Markdown lines for the label-free selection: the verdict, then a table of every candidate's validator values
    (the pick in bold). Empty without a selection (``--select last``)."""
    if not sel:
        return []
    lines = ["", f"Label-free selection (rule `{sel['rule']}`, {len(sel['candidates'])} candidates on "
                 f"{sel['frames']} target frames, {sel['seconds']:.1f} s): the adapted model is **{sel['picked']}**. "
                 f"Verdict against the source model: **{sel['verdict']}** ({sel['reason']}).", "",
             "| candidate | " + " | ".join(_SHOWN) + " |", "|---|" + "---|" * len(_SHOWN)]
    for name, v in sel["candidates"].items():
        shown = f"**{name}**" if name == sel["picked"] else name
        lines.append(f"| {shown} | " + " | ".join(f"{v.get(k, float('nan')):.3f}" for k in _SHOWN) + " |")
    return lines


def _provenance_lines(rep: dict) -> List[str]:
    """Markdown lines for the steps made (and any cut short) and the commit and machine that ran them."""
    lines = []
    for name, st in rep.get("steps", {}).items():
        if st.get("reused"):
            lines.append(f"- {name}: reused checkpoint")
        else:
            cut = (f" (**cut short** by the {st['minutes_cap']}-minute cap: not comparable to a full run)"
                   if st["cut_short"] else "")
            recipe = rep.get("source_recipe") if name == "source" else None
            recipe = " (" + " ".join(f"--{k.replace('_', '-')} {str(v).lower()}" for k, v in recipe.items()) + ")" \
                if recipe else ""
            lines.append(f"- {name}: {st['done']} of {st['planned']} steps{recipe}{cut}")
    pv = rep.get("provenance", {})
    m = pv.get("machine", {})
    commit = pv.get("commit") or "unknown"
    at = rep.get("adapt_size")
    at = f" (adaptation and target evaluation at {at})" if at and at != rep.get("size") else ""
    lines.append(f"- seed {rep.get('seed')}, size {rep.get('size')}{at}, segadapt {pv.get('segadapt')} at commit "
                 f"`{commit[:12]}`{' (uncommitted changes)' if pv.get('dirty') else ''}, torch "
                 f"{pv.get('libraries', {}).get('torch')}")
    lines.append(f"- machine: {m.get('cpu')}, {m.get('cores')} cores, GPU {m.get('gpu') or 'none'}")
    return lines


def report_markdown(rep: dict) -> str:
    """``report.md`` from :func:`build_report`'s dict: mIoU table, gain, per-class IoU, parity, video, timings,
    files."""
    mode = ("UDA (labelled `source_train` used during adaptation)" if rep["config"].get("uda")
            else "source-free (no source data during adaptation)")
    lines = ["# segadapt pipeline report", "",
             f"Preset `{rep['config']['preset']}`, data `{rep['config']['data']}`, adaptation {mode}.",
             "", *_provenance_lines(rep), "", "| model | split | mIoU | pixel acc |", "|---|---|---|---|"]
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
        lines += ["", "Export parity vs PyTorch on real target frames", "",
                  "| graph | same class | max abs logit diff |", "|---|---|---|"]
        for k, v in rep["export_parity"].items():
            d = v.get("max_abs_logit_diff")
            lines.append(f"| {k} | {v['class_agreement'] * 100:.3f} % | {'' if d is None else f'{d:.2e}'} |")
    if rep.get("video"):
        v = rep["video"]
        src = rep["files"].get("video_source")
        lines += ["", f"Video: {v['frames']} frames{f' of `{src}`' if src else ''}, {v['fps']:.1f} frames/s end to "
                  f"end ({v['codec']}), `{v['output']}`"]
    lines += rare_class_lines(rep)
    lines += selection_lines(rep.get("selection"))
    lines += _monitor_lines(rep)
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items()), "", "Files:", ""]
    lines += [f"- {k}: `{v}`" for k, v in rep["files"].items() if v]
    return "\n".join(lines) + "\n"
