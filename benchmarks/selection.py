"""Label-free model selection benchmark: every candidate's mIoU against every validator, on two target domains.

For each target domain and seed, one adaptation run with the main job's settings keeps a save every
``--save-every`` steps; the candidates are the source model, AdaBN at blends 0.5 / 0.75 / 1 and the saves (with
``--uda``, the saves of a UDA-mode run too). Each candidate is scored by the validators on a fixed sample of the
target images (:mod:`segadapt.adapt.selection_scores`) and, for measuring only, by its mIoU on the domain's labels.
The analysis (``--analyse``, also run after collecting) gives per domain the rank correlation of each validator with
mIoU (Spearman, Kendall; mean over seeds) and each rule's regret (mIoU of the pick minus the best candidate's) and
loss against the source model; a rule is chosen on one domain and reported on the other (leave-one-domain-out).

$DATA is the data root (the folder holding camvid-day2dusk/ and kitti-semantics/); SRC a source checkpoint, e.g.
the main job's (``segadapt pipeline --preset quick --seed 0``: runs/pipeline/source/best):
    python benchmarks/selection.py --checkpoint SRC --steps 150 --seeds 0 1 2 \
        --domain dusk=$DATA/camvid-day2dusk/target_adapt:size=120x160 \
        --domain kitti=$DATA/kitti-semantics/target_adapt:keep_aspect=120 \
        --work runs/selection --json runs/selection/selection_150.json
Runs are resumable (a finished run's scores are read back from ``<work>/<domain>/seed<N>/candidates.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from segadapt.adapt.adabn import adabn_source_model
from segadapt.adapt.config import AdaptConfig, TeacherConfig
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.data.target import target_dataset
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.engine import adapt
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.select_adapted import BLENDS
from segadapt.adapt.selection_scores import score_model, validation_frames
from segadapt.runtime.files import write_json



def parse_domain(text: str) -> dict:
    """``NAME=DIR[:size=HxW|:keep_aspect=N]`` -> {name, target, size, keep_aspect}."""
    name, _, rest = text.partition("=")
    target, *opts = rest.split(":")
    d = {"name": name, "target": target, "size": (0, 0), "keep_aspect": 0}
    for o in opts:
        k, _, v = o.partition("=")
        if k == "size":
            d["size"] = tuple(int(x) for x in v.split("x"))
        elif k == "keep_aspect":
            d["keep_aspect"] = int(v)
        else:
            raise SystemExit(f"--domain {text!r}: unknown option {k!r}")
    return d


def run_config(a: argparse.Namespace, dom: dict, seed: int, out: Path, source_data: str = "") -> AdaptConfig:
    """The main job's adaptation settings (segadapt pipeline, quick preset), keeping every save."""
    return AdaptConfig(checkpoint=a.checkpoint, target=dom["target"], out=str(out), size=dom["size"],
                       keep_aspect=dom["keep_aspect"], steps=a.steps, batch_size=4, device=a.device, seed=seed,
                       teacher=TeacherConfig(alpha=a.teacher_alpha), resume="auto", debug_every=0,
                       save_every=a.save_every, keep_saves=True, num_workers=0, source_data=source_data,
                       select="last")


def score_candidates(a, cfg: AdaptConfig, size, models: dict, ds_eval) -> dict:
    """{name: {miou, validators...}} for ``models`` ({name: callable returning (model, meta)}); the reference for
    agreement and drift is AdaBN at the run's blend."""
    frames = validation_frames(target_dataset(cfg, size, Resize(size)), a.frames)
    out, ref_pred = {}, None
    order = [f"adabn_{cfg.adabn_alpha:g}"] + [n for n in models if n != f"adabn_{cfg.adabn_alpha:g}"]
    for name in order:
        model, meta = models[name]()
        vals, pred = score_model(model, frames, meta.mean, meta.std, a.device, ref_pred, seed=a.snd_seed)
        if ref_pred is None:
            ref_pred = pred
            vals["agreement"], vals["drift"] = 1.0, 0.0
        m = evaluate(model, ds_eval, meta.mean, meta.std, size, a.device, batch_size=8)
        out[name] = {"miou": m["miou"], "iou": m["iou"], **vals}
        print(f"  {name:14s} mIoU {m['miou']:.2f}  " + "  ".join(f"{k} {v:.4f}" for k, v in vals.items()
                                                                if isinstance(v, float)), flush=True)
    return out


def collect_run(a, dom: dict, seed: int, work: Path, uda: str = "") -> dict:
    """Adapt (resumably; a finished run is not redone), then score the source model, the AdaBN blends and every
    save. A run scored before the per-frame counts existed is scored again from its saves."""
    out = work / dom["name"] / (f"uda_seed{seed}" if uda else f"seed{seed}")
    done = out / "candidates.json"
    old = json.loads(done.read_text()) if done.is_file() else None
    if old and all("mixval_intra_counts" in c for c in old["candidates"].values()):
        return old
    cfg = run_config(a, dom, seed, out, uda)
    t0 = time.time()
    if old and (out / "summary.json").is_file():
        summary, adapt_s = json.loads((out / "summary.json").read_text()), old["adapt_seconds"]
    else:
        summary = adapt(cfg, log=lambda m: print(m, flush=True))
        adapt_s = time.time() - t0
    size = tuple(summary["size"])
    ds_eval = LabeledImageFolder(dom["target"])
    plain = target_dataset(cfg, size, Resize(size))
    models = {"source": lambda: load_segmenter(a.checkpoint, map_location=a.device)}
    for b in BLENDS:
        models[f"adabn_{b:g}"] = (lambda b=b: adabn_source_model(a.checkpoint, plain, a.device, alpha=b))
    for save in sorted((out / "saves").iterdir()):
        models[save.name] = (lambda p=save: load_segmenter(p, map_location=a.device))
    t1 = time.time()
    cands = score_candidates(a, cfg, size, models, ds_eval)
    res = {"domain": dom["name"], "seed": seed, "uda": bool(uda), "steps": summary["steps"], "size": list(size),
           "adapt_seconds": adapt_s, "score_seconds": time.time() - t1, "candidates": cands}
    write_json(done, res)
    return res


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--domain", action="append", default=[], metavar="NAME=DIR[:size=HxW|:keep_aspect=N]")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--save-every", type=int, default=37, help="main job at 150 steps: max(25, steps // 4)")
    ap.add_argument("--teacher-alpha", type=float, default=0.99)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--uda", default="", help="also a UDA-mode run per seed with this labelled source split")
    ap.add_argument("--frames", type=int, default=16, help="validation frames per domain (the product's default)")
    ap.add_argument("--snd-seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="runs/selection")
    ap.add_argument("--json", default=None)
    ap.add_argument("--analyse", nargs="*", default=None, metavar="JSON",
                    help="only analyse these result files (no runs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from selection_analysis import analyse, print_analysis  # benchmarks/ beside this file

    a = parse_args(argv)
    if a.analyse is not None:
        runs = [r for f in a.analyse for r in json.loads(Path(f).read_text())["runs"]]
    else:
        if not a.checkpoint or not a.domain:
            raise SystemExit("--checkpoint and at least one --domain are required (or --analyse FILES)")
        doms = [parse_domain(d) for d in a.domain]
        runs = []
        for dom in doms:
            for seed in a.seeds:
                print(f"== {dom['name']} seed {seed}", flush=True)
                runs.append(collect_run(a, dom, seed, Path(a.work)))
                if a.uda:
                    runs.append(collect_run(a, dom, seed, Path(a.work), uda=a.uda))
    res = {"runs": runs, "analysis": analyse(runs), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print_analysis(res["analysis"])
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
