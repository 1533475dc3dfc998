"""How good are SeCo's pseudo-labels? Per-class precision and coverage of each stage against the real labels.

Runs SeCo's pass (:mod:`segadapt.adapt.methods.seco.labels`) exactly as ``segadapt adapt --seco.enabled`` does
it:
the source model after AdaBN on the target frames at the training size, the class-wise top fraction of its pixels,
PSA over SAM masks (``--sam-dir``) or superpixels, SCC. Then, for measurement only, it reads the target split's
labels (resized to the training size, nearest) and reports per class and stage ("argmax" = every pixel of the
model's prediction, "pixel" = the initial pixel pseudo-labels, "psa", "seco" = after SCC):

  precision  share of the pixels the stage labels c whose real label is c (void pixels left out)
  coverage   share of the real-c pixels the stage labels at all (any class)
  recall     share of the real-c pixels the stage labels c

Target labels are read only here, after the labels are made; nothing is trained on them.

    python benchmarks/probes/seco_labels.py --checkpoint runs/pipeline/source/best --json runs/seco_labels.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segadapt.adapt.adabn import adabn_source_model
from segadapt.adapt.config import AdaptConfig, default_camvid_dir
from segadapt.adapt.data.datasets import ImageFolder, LabeledImageFolder
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.methods.seco.labels import predict_frames, seco_labels
from segadapt.adapt.methods.config import SecoConfig
from segadapt.runtime.files import write_json


def stage_scores(labels: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int) -> dict:
    """Per-class precision, coverage and recall of (N, H, W) ``labels`` (``ignore`` = unlabelled) against ``truth``
    (same shape, ``ignore`` = void); values are None where the denominator is 0."""
    valid = truth != ignore
    has = (labels != ignore) & valid
    out = {"labelled_share": float(has.sum() / max(valid.sum(), 1)),
           "accuracy": float((labels[has] == truth[has]).mean()) if has.any() else None, "classes": {}}
    for c in range(num_classes):
        said, real = has & (labels == c), valid & (truth == c)
        out["classes"][c] = {
            "precision": float((truth[said] == c).mean()) if said.any() else None,
            "coverage": float(has[real].mean()) if real.any() else None,
            "recall": float((labels[real] == c).mean()) if real.any() else None,
            "labelled_pixels": int(said.sum()), "real_pixels": int(real.sum())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="source checkpoint (segadapt or transformers directory)")
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"),
                    help="labelled target split (<split>/images, <split>/labels)")
    ap.add_argument("--size", type=int, nargs=2, default=None, help="H W; default: the checkpoint's input size")
    ap.add_argument("--sam-dir", default="", help="local transformers SAM directory; empty = superpixels")
    ap.add_argument("--superpixels", default="slic", choices=["slic", "felzenszwalb"])
    ap.add_argument("--pixel-fraction", type=float, default=SecoConfig.pixel_fraction)
    ap.add_argument("--scc-iterations", type=int, default=SecoConfig.scc_iterations)
    ap.add_argument("--scc-rule", default=SecoConfig.scc_rule, choices=["both_loss", "class_median"])
    ap.add_argument("--no-adabn", action="store_true")
    ap.add_argument("--adabn-alpha", type=float, default=AdaptConfig.adabn_alpha,
                    help="AdaBN blend, as segadapt adapt's --adabn-alpha")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the numbers here")
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    meta = load_segmenter(a.checkpoint)[1]
    size = tuple(a.size) if a.size else tuple(meta.input_size)
    cls, ignore = meta.classes, meta.classes.ignore_index
    plain = ImageFolder(a.target, transform=Resize(size))
    # the source model after AdaBN, built by the function segadapt adapt uses
    model = adabn_source_model(a.checkpoint, plain, "cpu", alpha=a.adabn_alpha, enabled=not a.no_adabn)[0]
    cfg = SecoConfig(enabled=True, sam_dir=a.sam_dir, superpixels=a.superpixels, pixel_fraction=a.pixel_fraction,
                     scc_iterations=a.scc_iterations, scc_rule=a.scc_rule)
    t0 = time.time()
    frames, pred, conf, names = predict_frames(model, plain, meta.mean, meta.std, "cpu")
    labels, stats = seco_labels(frames, pred, conf, cls.stuff_flags(), cfg, ignore, meta.mean, meta.std, "cpu",
                                a.seed, log=lambda m: print(m, file=sys.stderr))
    seconds = time.time() - t0
    stages = {"argmax": pred, "pixel": np.stack(stats["stages"]["pixel"]), "psa": np.stack(stats["stages"]["psa"]),
              "seco": np.stack(labels)}
    truth_ds = LabeledImageFolder(a.target, transform=Resize(size))  # measurement only, after the labels exist
    truth = {truth_ds.files[i].stem: truth_ds[i]["label"].numpy() for i in range(len(truth_ds))}
    truth = np.stack([truth[n] for n in names])
    scores = {k: stage_scores(v, truth, cls.num_classes, ignore) for k, v in stages.items()}
    stats.pop("stages")
    rep = {"checkpoint": a.checkpoint, "target": a.target, "size": list(size), "frames": len(names),
           "region_source": stats["region_source"], "sam": "not measured (no SAM checkpoint given)"
           if not a.sam_dir else a.sam_dir, "config": cfg.__dict__ | {"scc_crop": list(cfg.scc_crop)},
           "stats": stats, "seconds_shared_machine": round(seconds, 1),
           "stages": {k: {**v, "classes": {cls.names[c]: s for c, s in v["classes"].items()}}
                      for k, v in scores.items()}}
    print(f"{len(names)} frames at {size[0]}x{size[1]}, regions: {stats['region_source']}")
    print(f"{'class':<12}" + "".join(f"{k + ' P/cov':>16}" for k in stages))
    fmt = (lambda v: "   -" if v is None else f"{100 * v:4.0f}")
    for c, n in enumerate(cls.names):
        row = "".join(f"{fmt(scores[k]['classes'][c]['precision'])}/{fmt(scores[k]['classes'][c]['coverage'])}"
                      .rjust(16) for k in stages)
        print(f"{n:<12}{row}")
    print(f"{'all':<12}" + "".join(f"{fmt(scores[k]['accuracy'])}/{fmt(scores[k]['labelled_share'])}".rjust(16)
                                   for k in stages))
    if a.json:
        write_json(a.json, rep, what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
