"""Can a label-free signal tell when AdaBN helps? AdaBN blends and the signals a user without labels can compute.

AdaBN (Li et al. 2016) replaces the source BatchNorm statistics by the target's. On CamVid dusk (a lighting shift)
it helps the quick source model by +5.3 mIoU, on KITTI (another city and camera) it costs -1.9 (measured 2026-12-02).
This script measures, for each blend ``alpha`` of the statistics (0 = source statistics, 1 = AdaBN;
``mean = (1 - alpha) * mean_s + alpha * mean_t``, same for the variance: the alpha-BN form of Schneider et al.
2020, "Improving robustness against common corruptions by covariate shift adaptation", section 3; our option, see
docs/method-notes.md, AdaBN), the mIoU (labels read only to score) next to label-free signals on the same
unlabelled target frames. It also measures AdaBN in only the first share of the BatchNorm layers (``--first``;
``segadapt adapt --adabn-layers``): the input side, where a lighting change shows, while the deeper layers'
statistics also carry the target's class mix (our option, see docs/method-notes.md, AdaBN).

  entropy      mean per-pixel softmax entropy / log K (0..1; lower = more confident)
  max_softmax  mean per-pixel max probability
  flip_agree   share of pixels whose argmax is the same for the frame and its mirror image (mirrored back)
  scale_agree  share of pixels whose argmax is the same at the run size and at 1.5x that size (resized back)
  source_agree share of pixels whose argmax equals the source model's (alpha = 0)

A signal is useful as a rule if ranking the blends by it puts the best-mIoU blend first on both domains.

    CK=runs/pipeline/source/best; DATA=path/to/data  # the quick pipeline's source model; the data root
    python benchmarks/probes/adabn_choice.py --checkpoint $CK --json runs/adabn_dusk.json
    python benchmarks/probes/adabn_choice.py --checkpoint $CK \
        --target $DATA/kitti-semantics/target_adapt --keep-aspect 120 --json runs/adabn_kitti.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segadapt.adapt.adabn import adapt_batchnorm
from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import normalize
from segadapt.adapt.config import default_camvid_dir
from segadapt.adapt.data.datasets import ImageFolder, LabeledImageFolder, collate
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.runtime.files import write_json


def bn_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def blend(source: nn.Module, target: nn.Module, alpha: float, first: float = 1.0) -> nn.Module:
    """A copy of ``source`` whose BatchNorm running mean/var are ``(1 - alpha) * source + alpha * target`` in the
    first ``first`` share of its BatchNorm layers (module order: input side first) and the source's in the rest."""
    out = copy.deepcopy(source)
    layers = list(zip(bn_layers(out), bn_layers(source), bn_layers(target)))
    for m, s, t in layers[:max(1, round(first * len(layers))) if first > 0 else 0]:
        m.running_mean.copy_((1 - alpha) * s.running_mean + alpha * t.running_mean)
        m.running_var.copy_((1 - alpha) * s.running_var + alpha * t.running_var)
    return out.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, size) -> torch.Tensor:
    """(B, K, H, W) float32 softmax at ``size`` of normalised input ``x``."""
    return F.softmax(upsample_logits(model(x).float(), tuple(size)), 1)


@torch.no_grad()
def signals(model: nn.Module, frames: DataLoader, mean, std, size, reference: list | None) -> tuple:
    """The label-free signals over all frames; also returns the argmax maps (for ``source_agree``)."""
    ent, conf, flip, scale, src, preds, n = 0.0, 0.0, 0.0, 0.0, 0.0, [], 0
    big = (int(size[0] * 1.5) // 16 * 16, int(size[1] * 1.5) // 16 * 16)
    for i, b in enumerate(frames):
        x = normalize(b["image"], mean, std)
        p = predict(model, x, size)
        k = p.shape[1]
        pred = p.argmax(1)
        ent += float((-(p * p.clamp_min(1e-12).log()).sum(1) / math.log(k)).mean()) * len(x)
        conf += float(p.max(1).values.mean()) * len(x)
        pf = predict(model, x.flip(-1), size).flip(-1).argmax(1)
        flip += float((pf == pred).float().mean()) * len(x)
        ps = predict(model, F.interpolate(x, size=big, mode="bilinear", align_corners=False), size).argmax(1)
        scale += float((ps == pred).float().mean()) * len(x)
        if reference is not None:
            src += float((reference[i] == pred).float().mean()) * len(x)
        preds.append(pred)
        n += len(x)
    out = {"entropy": ent / n, "max_softmax": conf / n, "flip_agree": flip / n, "scale_agree": scale / n}
    if reference is not None:
        out["source_agree"] = src / n
    return out, preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--keep-aspect", type=int, default=0)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--first", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                    help="also AdaBN (alpha 1) in only the first share of the BatchNorm layers (input side)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    source, meta = load_segmenter(a.checkpoint)
    target_dir = Path(a.target)
    image_dir = target_dir / "images" if (target_dir / "images").is_dir() else target_dir
    size = resolve_size((0, 0), a.keep_aspect, image_dir, meta.input_size, source.arch, source.output_stride)
    frames = ImageFolder(image_dir, transform=Resize(size))
    loader = DataLoader(frames, batch_size=8, shuffle=False, collate_fn=collate)
    adabn = copy.deepcopy(source)
    adapt_batchnorm(adabn, loader, meta.mean, meta.std, "cpu")
    ds_eval = LabeledImageFolder(target_dir, classes=meta.classes, image_dir=image_dir, label_dir=target_dir / "labels")
    rows, reference, t0 = [], None, time.time()
    variants = [(alpha, 1.0) for alpha in sorted(a.alphas)] + [(1.0, f) for f in a.first]
    for alpha, first in variants:
        model = blend(source.eval(), adabn, alpha, first)
        sig, preds = signals(model, loader, meta.mean, meta.std, size, reference)
        if alpha == 0.0:
            reference = preds
        miou = evaluate(model, ds_eval, meta.mean, meta.std, size, "cpu", batch_size=8)["miou"]  # measurement only
        rows.append({"alpha": alpha, "first": first, "miou": miou, **sig})
        print(f"alpha {alpha:.2f} first {first:.2f}: mIoU {miou:.2f} "
              + " ".join(f"{k} {v:.4f}" for k, v in sig.items()), flush=True)
    rep = {"checkpoint": a.checkpoint, "target": str(target_dir), "size": list(size), "frames": len(frames),
           "rows": rows, "seconds": round(time.time() - t0, 1),
           "best_by": {k: {x: max(rows, key=lambda r: r[k] * (-1 if k == "entropy" else 1))[x]
                           for x in ("alpha", "first")}
                for k in ("miou", "entropy", "max_softmax", "flip_agree", "scale_agree")}}
    print(json.dumps(rep["best_by"]))
    if a.json:
        write_json(a.json, rep, what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
