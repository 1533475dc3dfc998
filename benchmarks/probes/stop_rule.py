"""Where should a long adaptation run stop? mIoU of every kept save next to the label-free monitor's signals.

Input: a run folder of ``segadapt adapt --keep-saves`` (``saves/step_<N>/`` and ``coverage.jsonl``), e.g. from
``benchmarks/adaptation.py --steps 1000 --set save_every=100 --set keep_saves=true``. For each save it measures the
mIoU on the labelled target split (labels read only to score) and averages the monitor's signals over the logged
steps since the previous save (:mod:`segadapt.adapt.monitor`: teacher entropy, teacher-anchor agreement, class-share
drift, kept share). Then it says which save each label-free rule picks and what that save scores:

  final              the last save (what a run without a rule returns)
  drift_agreement    the monitor's rule with ``--max-drift/--min-agreement/--patience`` (MonitorConfig defaults):
                     the first save at or after the step where it fires
  entropy_floor F    ``--monitor.entropy-floor F`` alone: the teacher's mean entropy over the last ``patience``
                     logged steps is at most F x its mean over the first ``patience`` (relative, so that it does not
                     depend on a domain's entropy level; our rule, see docs/method-notes.md, Label-free
                     monitor): the first save at or after it fires
  best (labels)      the save with the highest mIoU: the ceiling, not a rule

    # DATA: the data root
    python benchmarks/probes/stop_rule.py --run runs/long/dusk/full_s0 --json runs/long/stop_dusk.json
    python benchmarks/probes/stop_rule.py --run runs/long/kitti/full_s0 \
        --target $DATA/kitti-semantics/target_adapt --keep-aspect 120 --json runs/long/stop_kitti.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.config import MonitorConfig, default_camvid_dir
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.monitor import MonitorStep, stop_reason

SIGNALS = ("entropy", "anchor_agreement", "class_drift", "kept")


def read_log(path: Path) -> list:
    """The records of ``coverage.jsonl`` in step order."""
    return sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()), key=lambda r: r["step"])


def window_means(recs: list, steps: list) -> list:
    """Per save step, the mean of each signal over the logged steps in (previous save, this save]."""
    out, prev = [], 0
    for s in steps:
        win = [r for r in recs if prev < r["step"] <= s]
        out.append({k: float(np.mean([r[k] for r in win if r.get(k) is not None])) if win else None for k in SIGNALS})
        prev = s
    return out


def rule_step(recs: list, cfg: MonitorConfig) -> int | None:
    """The logged step where the monitor's stopping rule (:func:`segadapt.adapt.monitor.stop_reason` with ``cfg``)
    would have stopped the run, or None."""
    hist = []
    for r in recs:
        if r.get("entropy") is None:
            continue
        hist.append(MonitorStep(step=r["step"], coverage=list(r.get("coverage", {}).values()), entropy=r["entropy"],
                                anchor_agreement=r.get("anchor_agreement"), class_drift=r["class_drift"],
                                teacher_shares=r.get("teacher_shares", [])))
        if stop_reason(hist, cfg):
            return r["step"]
    return None


def picks(rows: list, recs: list, fractions: list, cfg: MonitorConfig) -> dict:
    """Which save each rule picks: {rule: {"step", "miou", "fired_at"}}. A rule that fires at step s picks the first
    save at or after s (the run itself would save at s; saves are ``--save-every`` apart); one that never fires
    picks the last save."""
    def at_or_after(step):
        if step is None:
            return rows[-1]
        return next((r for r in rows if r["step"] >= step), rows[-1])

    out = {"final": (rows[-1], None), "best (labels)": (max(rows, key=lambda r: r["miou"]), None)}
    fired = rule_step(recs, cfg)
    out["drift_agreement"] = (at_or_after(fired), fired)
    for f in fractions:  # the entropy floor alone: drift and agreement thresholds that cannot fire
        fired = rule_step(recs, MonitorConfig(max_drift=1.0, min_agreement=0.0, patience=cfg.patience,
                                              entropy_floor=f))
        out[f"entropy_floor {f}"] = (at_or_after(fired), fired)
    return {k: {"step": r["step"], "miou": r["miou"], "fired_at": f} for k, (r, f) in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder with saves/ and coverage.jsonl")
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--keep-aspect", type=int, default=0)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    ap.add_argument("--max-drift", type=float, default=MonitorConfig.max_drift)
    ap.add_argument("--min-agreement", type=float, default=MonitorConfig.min_agreement)
    ap.add_argument("--patience", type=int, default=MonitorConfig.patience)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    run = Path(a.run)
    saves = sorted((run / "saves").glob("step_*"))
    if not saves:
        raise SystemExit(f"{run / 'saves'}: no saves (run segadapt adapt with --keep-saves)")
    recs = read_log(run / "coverage.jsonl")
    steps = [int(p.name.split("_")[1]) for p in saves]
    target = Path(a.target)
    image_dir = target / "images" if (target / "images").is_dir() else target
    rows = []
    for p, s, sig in zip(saves, steps, window_means(recs, steps)):
        model, meta = load_segmenter(p)
        size = resolve_size((0, 0), a.keep_aspect, image_dir, meta.input_size, model.arch, model.output_stride)
        ds = LabeledImageFolder(target, classes=meta.classes, image_dir=image_dir, label_dir=target / "labels")
        miou = evaluate(model, ds, meta.mean, meta.std, size, "cpu", batch_size=8)["miou"]
        rows.append({"step": s, "miou": miou, **sig})
        print(f"step {s:5d}: mIoU {miou:.2f} " + " ".join(f"{k} {v:.4f}" for k, v in sig.items() if v is not None),
              flush=True)
    cfg = MonitorConfig(max_drift=a.max_drift, min_agreement=a.min_agreement, patience=a.patience)
    chosen = picks(rows, recs, a.fractions, cfg)
    for k, v in chosen.items():
        print(f"{k:<18} step {v['step']:5d}  mIoU {v['miou']:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"run": str(run), "target": str(target), "saves": rows, "picks": chosen,
                                            "rule": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
