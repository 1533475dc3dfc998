"""Source-free adaptation benchmark: mIoU on a labelled target set after adapting on its images.

Rows (each self-training row for every seed; source-only and AdaBN are deterministic):
  source_only      the source checkpoint as it is
  adabn            BatchNorm statistics re-estimated on the target images
  self_training    AdaBN + EMA teacher self-training, fixed confidence threshold, ClassMix, strong photometric view
  + rectifier      the same with IR2F's mixture loss, r = the teacher-anchor confidence prior (the default;
                   --ablate full+inr:rectifier.inr=true adds the learned INR correction)
  full             + class-balanced (CBST) thresholds and class-frequency loss weights (the PseudoLabelConfig
                   defaults): the full method as far as it runs without depth
  full + depth     only with --depth: + CrossMatch RGB-D auxiliary stream (dual-head fusion, cross-modal consistency)

Target labels are used only for measuring, after adaptation. Also reports how well the rectifier's reliability
predicts pseudo-label correctness (AUROC against the real labels) next to its confidence prior alone and the
teacher's max-softmax confidence.

$DATA is the data root (the folder holding camvid-day2dusk/ and kitti-semantics/).
CamVid day -> dusk (docs/results.md; the source model from benchmarks/source_only.py, 4000 steps):
    python benchmarks/adaptation.py --checkpoint runs/source_long/best --steps 150 --seeds 0 1 2 \
        --work runs/bench/adapt_camvid --json runs/bench/adaptation_camvid.json
CamVid -> KITTI (kitti-semantics/target_adapt: 100 frames, 3.3:1; the same source model, at its short side 180):
    python benchmarks/adaptation.py --checkpoint runs/source_long/best \
        --target $DATA/kitti-semantics/target_adapt --keep-aspect 180 --steps 150 --seeds 0 1 2 \
        --rows self_training full --work runs/bench/adapt_kitti --json runs/bench/adaptation_kitti.json
Ablations: the full method without one component, paired on the same seeds (a row per --ablate):
    python benchmarks/adaptation.py --checkpoint runs/source_long/best --rows self_training full \
        --ablate full-classmix:class_mix=false --ablate full-class_weights:pseudo.class_weight_power=0.0 \
        --work runs/bench/adapt_ablate --json runs/bench/ablate_camvid.json
UDA mode (labelled source frames join, --source-data; rows = the full method + source data, with and
without RCCR/BiDA in their paper forms; source_mix=false = source CE with the source-free target-to-target mix):
    S=$DATA/camvid-day2dusk/source_train
    python benchmarks/adaptation.py --checkpoint runs/pipeline/source/best --skip-baselines --rows \
        --ablate uda:source_data=$S --ablate uda+rccr:source_data=$S,rccr.enabled=true \
        --ablate uda+bida:source_data=$S,bida.enabled=true --steps 150 --seeds 0 1 2 \
        --work runs/uda/adapt --json runs/uda/adaptation_uda.json
One row with a changed setting (every self-training row gets the --set overrides):
    python benchmarks/adaptation.py --checkpoint runs/source_long/best --skip-baselines --rows full \
        --set pseudo.class_weight_power=0.0 --work runs/bench/adapt_nocw
The rectifier's INR, its target and features (each run prints r's AUROC next to its prior's and
max-softmax's):
    python benchmarks/adaptation.py --checkpoint runs/source_long/best --skip-baselines --rows full \
        --set rectifier.inr=true --set rectifier.features=stride4 --set rectifier.view_consensus=true \
        --set rectifier.anchor_consistency=false --work runs/bench/adapt_views
Any folder with depth (KITTI stereo here, a functional check on 5 frames):
    python benchmarks/adaptation.py --checkpoint runs/bench/source_dlv3/best --target $DATA/kitti5/image_2 \
        --labels $DATA/kitti5/label_camvid11 --depth stereo --right-dir $DATA/kitti5/image_3 \
        --size 120 400 --steps 30 --seeds 0 --json runs/bench/adaptation_kitti5.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import normalize
from segadapt.adapt.config import (AdaptConfig, DepthConfig, PseudoLabelConfig, RectifierConfig, TeacherConfig,
                                   default_camvid_dir)
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.metrics import auroc
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.models.rectifier import confidence_prior
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.engine import adapt
from segadapt.adapt.methods.rectifier import load_run, rectification
from segadapt.adapt.methods.rectifier_signals import rectifier_input
from segadapt.runtime.files import write_json


def measure(ckpt, ds, size) -> dict:
    model, meta = load_segmenter(ckpt)
    m = evaluate(model, ds, meta.mean, meta.std, size, "cpu", batch_size=8)
    return {"miou": m["miou"], "iou": m["iou"], "pixel_acc": m["pixel_acc"]}


@torch.no_grad()
def reliability_auroc(cfg: AdaptConfig, ds_eval: LabeledImageFolder, size) -> dict:
    """AUROC for 'teacher pseudo-label == true label' of the rectifier's r, of its confidence prior alone (when the
    run has one) and of the teacher's max-softmax confidence."""
    teacher, anchor, rect, meta, cfg = load_run(cfg.out)
    ignore = meta.classes.ignore_index
    scores: dict = {"rectifier": [], "prior": [], "max_softmax": []}
    ok_all = []
    ds = copy.copy(ds_eval)
    ds.transform = Resize(size)
    for i in range(len(ds)):
        it = ds[i]
        img, lab = it["image"][None], it["label"][None]
        x = normalize(img, meta.mean, meta.std)
        logits, feats = rectifier_input(teacher, x, cfg.rectifier)
        la = anchor(x) if anchor is not None else None
        probs = F.softmax(upsample_logits(logits.float(), size), 1)
        conf, pred = probs.max(1)
        valid = lab != ignore
        scores["rectifier"].append(rectification(cfg, rect, feats, logits, la, size)[valid].numpy())
        if cfg.rectifier.prior != "none":
            pn = F.softmax(upsample_logits(la.float(), size), 1) if cfg.rectifier.prior == "teacher_anchor" else None
            scores["prior"].append(confidence_prior(probs, pn)[valid].numpy())
        scores["max_softmax"].append(conf[valid].numpy())
        ok_all.append((pred == lab)[valid].numpy())
    ok = np.concatenate(ok_all)
    res = {f"auroc_{k}": auroc(np.concatenate(v), ok) for k, v in scores.items() if v}
    return {**res, "rectifier_learned": rect is not None, "pixels": int(ok.size),
            "pseudo_label_accuracy": float(ok.mean())}


def grad_shares(out: Path) -> dict:
    """{step: {loss term: gradient share}} from a run's coverage.jsonl (empty without ``--grad-share-every``)."""
    shares = {}
    log = out / "coverage.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        rec = json.loads(line)
        if "grad_share" in rec:
            shares[rec["step"]] = rec["grad_share"]
    return shares


def override(cfg: AdaptConfig, item: str) -> None:
    """Apply ``FIELD=VALUE`` (dotted field path) to ``cfg``, converting VALUE to the field's current type.

    Raises:
        SystemExit: malformed item or unknown field.
    """
    key, sep, val = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
    *path, name = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p, None)
    if obj is None or not hasattr(obj, name):
        raise SystemExit(f"--set {item!r}: AdaptConfig has no field {key!r}")
    cur = getattr(obj, name)
    setattr(obj, name, val.lower() in ("1", "true", "yes") if isinstance(cur, bool) else type(cur)(val))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv`` None: ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--labels", default="", help="label folder for measuring (default: <target>/labels)")
    ap.add_argument("--size", type=int, nargs=2, default=None, help="H W of adaptation and evaluation (default: "
                    "the checkpoint's input size)")
    ap.add_argument("--keep-aspect", type=int, default=0, metavar="SHORT",
                    help="instead of --size: short side in pixels, the long side from the target frames' aspect, "
                    "rounded to the model's stride (KITTI: 120 -> 120 400)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=AdaptConfig.lr,
                    help="backbone learning rate (default 0: the CLI's, by mode: 2e-5 source-free, 6e-5 UDA)")
    ap.add_argument("--grad-share-every", type=int, default=0, metavar="N",
                    help="log each loss term's gradient share on the backbone every N steps and at the last "
                         "(AdaptConfig.grad_share_every); the runs' shares go to the JSON")
    ap.add_argument("--teacher-alpha", type=float, default=0.99,
                    help="EMA momentum of the teacher: 0.99 for the 150-step rows (the quick preset's, what every "
                         "150-step table in docs/results.md used); the CLI's 1000-step default is 0.999")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="*", default=["self_training", "+rectifier", "full"])
    ap.add_argument("--rectifier-prior", default="teacher_anchor", choices=["none", "teacher", "teacher_anchor"],
                    help="what the rectifier corrects (RectifierConfig.prior)")
    ap.add_argument("--skip-baselines", action="store_true", help="leave out the source-only and AdaBN rows")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an AdaptConfig field in every self-training row, e.g. pseudo.floor=0.0")
    ap.add_argument("--ablate", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                    help="one more row: the full method with these fields changed, e.g. "
                    "'full-classmix:class_mix=false' (runs after --rows, on the same seeds: a paired comparison)")
    ap.add_argument("--depth", default="none", choices=["none", "files", "stereo", "model"])
    ap.add_argument("--depth-dir", default="")
    ap.add_argument("--right-dir", default="")
    ap.add_argument("--depth-model", default="")
    ap.add_argument("--work", default="runs/bench/adapt_work")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not 0.0 <= a.teacher_alpha < 1.0:
        ap.error(f"--teacher-alpha must be in [0, 1), got {a.teacher_alpha}")
    return a


def baseline_rows(a: argparse.Namespace, base: dict, ds_eval: LabeledImageFolder, size, work: Path) -> dict:
    """The deterministic rows: the source checkpoint as it is, and AdaBN only (alpha 1: Li et al.'s AdaBN, whatever
    the default blend)."""
    rows = {"source_only": {"runs": [measure(a.checkpoint, ds_eval, size)]}}
    cfg = AdaptConfig(**copy.deepcopy(base), out=str(work / "adabn"), self_training=False, adabn_alpha=1.0)
    adapt(cfg, log=lambda *_: None)
    rows["adabn"] = {"runs": [measure(work / "adabn" / "adapted", ds_eval, size)]}
    print(f"source-only {rows['source_only']['runs'][0]['miou']:.2f}, "
          f"AdaBN {rows['adabn']['runs'][0]['miou']:.2f}", flush=True)
    return rows


def row_variants(a: argparse.Namespace) -> dict:
    """The self-training rows' config fields by row name (``full+depth`` added to ``a.rows`` with ``--depth``)."""
    def rectifier_on() -> RectifierConfig:
        return RectifierConfig(enabled=True, prior=a.rectifier_prior)

    plain = PseudoLabelConfig(class_balanced=False, class_weight_power=0.0)  # one fixed threshold, no class weights
    variants = {
        "self_training": dict(pseudo=plain, rectifier=RectifierConfig(enabled=False), adabn_alpha=1.0),  # on AdaBN
        "+rectifier": dict(pseudo=plain, rectifier=rectifier_on(), adabn_alpha=1.0),
        "full": dict(pseudo=PseudoLabelConfig(), rectifier=rectifier_on()),  # the defaults: CBST + class weights
    }
    if a.depth != "none":
        variants["full+depth"] = dict(pseudo=PseudoLabelConfig(),
                                      rectifier=rectifier_on(),
                                      depth=DepthConfig(provider=a.depth, directory=a.depth_dir,
                                                        right_dir=a.right_dir, model_dir=a.depth_model,
                                                        cache_dir=str(Path(a.work) / "depth_cache")))  # once per work
        a.rows = list(a.rows) + ["full+depth"]
    for spec in a.ablate:
        name, sep, items = spec.partition(":")
        if not sep or not name or not items:
            raise SystemExit(f"--ablate {spec!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE]")
        variants[name] = dict(copy.deepcopy(variants["full"]), overrides=items.split(","))
        a.rows = list(a.rows) + [name]
    return variants


def run_row(a: argparse.Namespace, row: str, variant: dict, base: dict, ds_eval: LabeledImageFolder, size,
            work: Path) -> list:
    """Adapt and measure one self-training row for every seed; one result dict per seed."""
    runs = []
    for seed in a.seeds:
        out = work / f"{row.replace('+', 'plus_')}_s{seed}"
        fields = copy.deepcopy(variant)
        row_overrides = fields.pop("overrides", [])
        cfg = AdaptConfig(**copy.deepcopy(base), out=str(out), seed=seed, **fields)
        for item in list(a.set) + row_overrides:
            override(cfg, item)
        t = time.time()
        s = adapt(cfg, log=lambda *_: None)
        r = measure(out / "adapted", ds_eval, size)
        r.update(seed=seed, seconds=time.time() - t, steps=s["steps"], last_losses=s.get("last_losses", {}))
        if cfg.rectifier.enabled and s["steps"] > 0:  # an AdaBN-only row trains nothing and keeps no state
            r.update(reliability_auroc(cfg, ds_eval, size))
        r["grad_share"] = grad_shares(out)
        runs.append(r)
        print(f"{row} seed {seed}: mIoU {r['miou']:.2f}" +
              (f", AUROC rectifier {r['auroc_rectifier']:.4f} vs prior {r.get('auroc_prior', float('nan')):.4f} "
               f"vs max-softmax {r['auroc_max_softmax']:.4f}" if "auroc_rectifier" in r else "") +
              f" ({r['seconds']:.0f} s)", flush=True)
    return runs


def summarise(rows: dict) -> None:
    """Add mean and standard deviation over seeds of mIoU, and per-class mean IoU, to each row (in place)."""
    for v in rows.values():
        m = np.array([r["miou"] for r in v["runs"]])
        v["miou_mean"], v["miou_std"] = float(m.mean()), float(m.std(ddof=1)) if len(m) > 1 else 0.0
        iou = np.array([[np.nan if x is None else x for x in r["iou"]] for r in v["runs"]])
        v["iou_mean"] = [None if np.isnan(x) else float(x) for x in np.nanmean(iou, 0)] if iou.size else []


def main() -> int:
    a = parse_args()
    model, meta = load_segmenter(a.checkpoint)
    target = Path(a.target)
    labels = Path(a.labels) if a.labels else target / "labels"
    image_dir = target / "images" if (target / "images").is_dir() else target
    size = resolve_size(a.size or (0, 0), a.keep_aspect, image_dir, meta.input_size, model.arch, model.output_stride)
    print(f"adaptation and evaluation at {size[0]}x{size[1]} on {image_dir}", flush=True)
    ds_eval = LabeledImageFolder(target, classes=meta.classes, image_dir=image_dir, label_dir=labels)
    work = Path(a.work)
    res: dict = {"rows": {}, "config": vars(a), "size": list(size), "classes": list(meta.classes.names),
                 "machine": {"platform": platform.platform(), "torch": torch.__version__,
                             "threads": torch.get_num_threads()}}
    t0 = time.time()
    base = dict(checkpoint=a.checkpoint, target=str(target), size=size, steps=a.steps, batch_size=a.batch_size,
                lr=a.lr, teacher=TeacherConfig(alpha=a.teacher_alpha), num_workers=0, debug_every=0, log_every=10,
                save_every=a.steps, grad_share_every=a.grad_share_every,
                select="last")  # the method's last model; label-free selection: benchmarks/selection.py
    if not a.skip_baselines:
        res["rows"].update(baseline_rows(a, base, ds_eval, size, work))
    variants = row_variants(a)
    for row in a.rows:
        res["rows"][row] = {"runs": run_row(a, row, variants[row], base, ds_eval, size, work)}
    summarise(res["rows"])
    res["seconds"] = time.time() - t0
    print(json.dumps({k: (round(v["miou_mean"], 2), round(v["miou_std"], 2)) for k, v in res["rows"].items()}))
    if a.json:
        write_json(a.json, res, what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
