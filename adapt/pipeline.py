"""``segadapt pipeline``: the user's whole journey in one resumable run directory.

Steps (each writes its outputs and is recorded in ``<out>/state.json``; re-running skips finished steps, and a
failing step is reported by name while what earlier steps wrote stays in place):

1. ``train_source``: train the source model on ``source_train``, select on ``source_val`` (or reuse
   ``--source-checkpoint``).
2. ``evaluate``: mIoU of the source model on ``source_val`` and ``target_adapt`` (target labels for measuring only).
3. ``report``: ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from adapt.config import PIPELINE_PRESETS, ModelConfig, PipelineConfig, SourceTrainConfig, to_dict


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the cause."""


def _resolved(cfg: PipelineConfig) -> dict:
    if cfg.preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PIPELINE_PRESETS)}")
    p = dict(PIPELINE_PRESETS[cfg.preset])
    if all(cfg.size):
        p["size"] = tuple(cfg.size)
    if cfg.source_steps:
        p["source_steps"] = cfg.source_steps
    if cfg.source_minutes:
        p["source_minutes"] = cfg.source_minutes
    return p


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns the report dict.

    Raises:
        StepFailed: a step raised; earlier steps' outputs are kept and the state file says which step failed.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"done": {}}
    p = _resolved(cfg)
    data = Path(cfg.data)

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)

    def step_train_source() -> dict:
        if cfg.source_checkpoint:
            return {"checkpoint": cfg.source_checkpoint, "reused": True}
        from adapt.train_source import train_source

        scfg = SourceTrainConfig(data=str(data), out=str(out / "source"), size=p["size"], steps=p["source_steps"],
                                 max_minutes=p["source_minutes"], batch_size=p["batch_size"], device=cfg.device,
                                 seed=cfg.seed, val_every=max(100, p["source_steps"] // 5),
                                 save_every=max(100, p["source_steps"] // 10), resume=True,
                                 warmup_steps=min(200, p["source_steps"] // 10), model=ModelConfig(arch=cfg.arch))
        s = train_source(scfg, log=log)
        return {"checkpoint": str(out / "source" / "best"), "summary": s}

    def step_evaluate() -> dict:
        from adapt.evaluate import evaluate_checkpoint

        ck = state["done"]["train_source"]["checkpoint"]
        res = {}
        for split in ("source_val", "target_adapt"):
            if not (data / split / "labels").is_dir():
                log(f"skip {split}: no labels in {data / split}")
                continue
            m = evaluate_checkpoint(ck, data / split, device="cpu" if cfg.device == "auto" else cfg.device,
                                    json_out=str(out / "metrics" / f"source_{split}.json"), progress=False)
            res[split] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "iou": m["iou"], "classes": m["classes"]}
            log(f"source model on {split}: mIoU {m['miou']:.2f}")
        return {"metrics": res}

    def step_report() -> dict:
        rep = build_report(cfg, p, state)
        (out / "report.json").write_text(json.dumps(rep, indent=1))
        (out / "report.md").write_text(report_markdown(rep))
        return {"report": str(out / "report.json")}

    steps: List[Tuple[str, Callable[[], dict]]] = [
        ("train_source", step_train_source), ("evaluate", step_evaluate), ("report", step_report)]
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
    ev = state["done"].get("evaluate", {}).get("metrics", {})
    return {
        "config": to_dict(cfg),
        "preset": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()},
        "metrics": {f"source_only/{split}": v for split, v in ev.items()},
        "timings_s": {k: round(v.get("seconds", 0.0), 1) for k, v in state["done"].items()},
        "files": {"source_checkpoint": state["done"].get("train_source", {}).get("checkpoint")},
    }


def report_markdown(rep: dict) -> str:
    lines = ["# segadapt pipeline report", "", "| model | split | mIoU | pixel acc |", "|---|---|---|---|"]
    classes: Dict[str, list] = {}
    for key, v in rep["metrics"].items():
        model, split = key.split("/")
        lines.append(f"| {model} | {split} | {v['miou']:.2f} | {v['pixel_acc']:.2f} |")
        classes[key] = v
    if classes:
        names = next(iter(classes.values()))["classes"]
        lines += ["", "Per-class IoU", "", "| class | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        for i, n in enumerate(names):
            vals = [classes[k]["iou"][i] for k in classes]
            lines.append(f"| {n} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items())]
    return "\n".join(lines) + "\n"
