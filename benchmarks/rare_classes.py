"""Source-model recipes for the thin and rare classes: the main job's source training settings (``segadapt pipeline
--preset quick``: 800 steps, batch 8) with the size, rare-class sampling and the source loss switched, each source
model scored per class on the source validation split and on both target domains (labels read only to score).

A variant is ``NAME`` or ``NAME:field=value,field=value`` over :class:`~segadapt.adapt.config.SourceTrainConfig`
on top of the earlier recipe (``baseline`` alone: 120x160, plain cross-entropy, uniform frames; the quick preset's
recipe since 2026-12-04 is ``rcs_bal05_144:rare_class_sampling=true,loss=balanced,class_weight_power=0.5,
size=[144,192]``, without the line break; ``model.FIELD=value`` sets a
:class:`~segadapt.adapt.config.ModelConfig` field, e.g. ``model.output_stride=8``), e.g.::

    python benchmarks/rare_classes.py --data $DATA --seeds 0 1 2 --work runs/rare --json runs/rare/rare.json \\
        --variant baseline --variant rcs:rare_class_sampling=true \\
        --variant rcs_balanced:rare_class_sampling=true,loss=balanced --variant ohem:loss=ohem \\
        --variant rcs_144:rare_class_sampling=true,size=[144,192]

``--adapt`` then runs the main job's adaptation (150 steps, the default selection rule) of each source model on
dusk and on KITTI and reports the four rare classes' IoU before and after.

$DATA is the data root (holding camvid-day2dusk/ and kitti-semantics/). Runs resume: a finished source model is
scored again, not retrained. Output: per variant and seed the mIoU and per-class IoU on ``source_val``, dusk and
KITTI ``target_adapt``, the training seconds, and per variant the mean and the spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segadapt.adapt.config import ModelConfig, SourceTrainConfig
from segadapt.adapt.evaluate import evaluate_checkpoint
from segadapt.adapt.train_source import train_source
from segadapt.runtime.files import write_json

#: the four classes at 0 IoU for the main job's source model under the earlier recipe (CamVid's 11-class set)
RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")


def parse_variant(text: str) -> tuple:
    """``NAME[:field=value,...]`` -> (name, {field: value}); values are JSON when they parse (``size=[144,192]``),
    else strings."""
    name, _, rest = text.partition(":")
    fields = {}
    for kv in filter(None, re.split(r",(?=[\w.]+=)", rest)):
        k, _, v = kv.partition("=")
        try:
            fields[k] = json.loads(v)
        except json.JSONDecodeError:
            fields[k] = v
    return name, fields


def source_config(data: Path, out: Path, seed: int, fields: dict, steps: int) -> SourceTrainConfig:
    """The earlier quick-preset source training (segadapt/pipeline.py: 120x160, cross-entropy) with ``fields`` on
    top (validation and save intervals and warm-up follow the variant's own ``steps``, as in the pipeline)."""
    steps = int(fields.get("steps", steps))
    base = dict(data=str(data / "camvid-day2dusk"), out=str(out), size=(120, 160), steps=steps, batch_size=8,
                device="cpu", seed=seed, val_every=max(50, steps // 4), save_every=max(50, steps // 10),
                resume="auto", warmup_steps=min(200, steps // 10), model=ModelConfig())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("model.")}
    fields = {k: v for k, v in fields.items() if not k.startswith("model.")}
    return SourceTrainConfig(**{**base, **fields, "model": ModelConfig(**model)})


def score(ckpt: Path, data: Path, size=(120, 160)) -> dict:
    """{split: {miou, iou: {class: IoU}}} of one checkpoint on the three scored splits, at the training ``size``
    (KITTI: its short side, at the frames' own aspect)."""
    size = tuple(size)
    splits = {"source_val": (data / "camvid-day2dusk" / "source_val", size, 0),
              "dusk": (data / "camvid-day2dusk" / "target_adapt", size, 0),
              "kitti": (data / "kitti-semantics" / "target_adapt", None, size[0])}
    out = {}
    for name, (split, size, keep) in splits.items():
        m = evaluate_checkpoint(ckpt, split, size=size, keep_aspect=keep, batch_size=8, progress=False)
        out[name] = {"miou": m["miou"], "iou": dict(zip(m["classes"], m["iou"]))}
    return out


def run_one(a, name: str, fields: dict, seed: int) -> dict:
    """Train (or reuse) one source model and score it."""
    out = Path(a.work) / name / f"seed{seed}"
    t0 = time.time()
    cfg = source_config(Path(a.data), out, seed, fields, a.steps)
    if not (out / "best").is_dir() or not (out / "history.json").is_file():
        train_source(cfg, log=lambda m: print(m, flush=True))
    seconds = time.time() - t0
    res = {"variant": name, "fields": fields, "seed": seed, "train_seconds": seconds,
           "scores": score(out / "best", Path(a.data), cfg.size)}
    print(f"== {name} seed {seed}: " + "  ".join(
        f"{s} {v['miou']:.2f} [" + " ".join(f"{c} {v['iou'].get(c, float('nan')):.1f}" for c in RARE) + "]"
        for s, v in res["scores"].items()), flush=True)
    return res


def adapt_one(a, name: str, fields: dict, seed: int) -> dict:
    """The main job's adaptation of one variant's source model (seed ``seed``) on both target domains, with
    benchmarks/selection.py's runner (150 steps, a save every 37; resumable): per domain the source model's and the
    adapted model's (the default selection rule's pick) mIoU and rare-class IoU, and the verdict."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/selection.py
    from selection import collect_run
    from selection import parse_args as selection_args

    from segadapt.adapt.config import SelectionConfig
    from segadapt.adapt.selection import pick, verdict

    run = Path(a.work) / name / f"seed{seed}"
    size = source_config(Path(a.data), run, seed, fields, a.steps).size
    data = Path(a.data)
    names = json.loads((data / "camvid-day2dusk" / "classes.json").read_text())["classes"]
    sa = selection_args(["--checkpoint", str(run / "best")])
    doms = [{"name": "dusk", "target": str(data / "camvid-day2dusk" / "target_adapt"), "size": size,
             "keep_aspect": 0},
            {"name": "kitti", "target": str(data / "kitti-semantics" / "target_adapt"), "size": (0, 0),
             "keep_aspect": size[0]}]
    sel, out = SelectionConfig(), {}
    for dom in doms:
        c = collect_run(sa, dom, seed, run / "adapt")["candidates"]
        p = pick(c, sel.rule)
        v = verdict(c, p, sel.confidence, seed=seed)
        out[dom["name"]] = {"pick": p.name, "verdict": v.verdict, **{
            model: {"miou": c[cand]["miou"], "iou": dict(zip(names, c[cand]["iou"]))}
            for model, cand in (("source", "source"), ("adapted", p.name))}}
        print(f"== {name} seed {seed} {dom['name']}: source {c['source']['miou']:.2f} -> adapted "
              f"{c[p.name]['miou']:.2f} ({p.name}, {v.verdict}); rare before/after: " + " ".join(
                  f"{k} {out[dom['name']]['source']['iou'][k]:.1f}/{out[dom['name']]['adapted']['iou'][k]:.1f}"
                  for k in RARE), flush=True)
    return {"variant": name, "fields": fields, "seed": seed, "domains": out}


def summarise_adapt(runs: list) -> dict:
    """{variant: {domain: {model: {miou: [mean, std], rare: {class: [mean, std]}}}}} over seeds."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        out[name] = {d: {m: {"miou": _mean_std([r["domains"][d][m]["miou"] for r in mine]),
                             "rare": {c: _mean_std([r["domains"][d][m]["iou"][c] for r in mine]) for c in RARE}}
                         for m in ("source", "adapted")} for d in mine[0]["domains"]}
    return out


def _mean_std(v: list) -> list:
    return [float(np.mean(v)), float(np.std(v))]


def summarise(runs: list) -> dict:
    """{variant: {split: {miou: [mean, std], rare: {class: [mean, std]}, rare_above_zero: n of seeds}}}."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        out[name] = {}
        for split in mine[0]["scores"]:
            miou = [r["scores"][split]["miou"] for r in mine]
            rare = {c: [r["scores"][split]["iou"].get(c, float("nan")) for r in mine] for c in RARE}
            out[name][split] = {"miou": _mean_std(miou),
                                "rare": {c: _mean_std(v) for c, v in rare.items()},
                                "rare_classes_above_zero_in_every_seed": sum(min(v) > 0 for v in rare.values())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--work", default="runs/rare")
    ap.add_argument("--json", default=None)
    ap.add_argument("--adapt", action="store_true",
                    help="also adapt each source model on both target domains with the main job's settings")
    a = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (a.variant or ["baseline"])]
    runs = [run_one(a, *v, seed) for v in variants for seed in a.seeds]
    res = {"runs": runs, "summary": summarise(runs), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if a.adapt:
        if a.json:  # the source scores survive a crash in the adaptation runs
            write_json(a.json, res)
        res["adapt_runs"] = [adapt_one(a, *v, seed) for v in variants for seed in a.seeds]
        res["adapt_summary"] = summarise_adapt(res["adapt_runs"])
        print(json.dumps(res["adapt_summary"], indent=1))
    print(json.dumps(res["summary"], indent=1))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
