"""Which source-free signal predicts that a pseudo-label is right? Offline AUROC of candidate signals.

Takes one finished adaptation run (its ``last/training_state.pt`` holds the EMA teacher and, when the run used it,
the frozen AdaBN anchor) and a labelled target folder. The teacher's argmax is the pseudo-label; a pixel is
*positive* when it equals the true label (void pixels are left out). For each signal below it reports the AUROC of
"signal ranks right pseudo-labels above wrong ones" over all labelled pixels: this is the measurement behind the
choice of the IR2F rectifier's source-free training target (methods.md 5.3 [RECON]; docs/benchmarks.md, issue #3).

Signals, each (H, W) float per image, higher = more reliable:
  max_softmax         teacher's top class probability
  margin              top-1 minus top-2 probability
  neg_entropy         minus the entropy of the teacher's distribution (nats)
  view_agreement      share of the views (h-flip, scale 0.75, scale 1.25, gamma 0.7) whose argmax equals the label
  view_mean_prob      mean probability of the label over the original and those views
  mc_dropout          mean probability of the label over ``--mc-passes`` passes with dropout on
  anchor_agreement    1 where the anchor's argmax equals the label (needs the anchor)
  anchor_mean_prob    mean of teacher and anchor probability of the label (needs the anchor)
  rectifier_prior     the rectifier's confidence prior alone, as the run configured it (when it has one)
  rectifier           the run's rectifier r (its prior alone when the run did not learn the INR correction)

Target labels are read only here, to score the signals; nothing is trained.

    python benchmarks/reliability_signals.py --run runs/bench2/adapt_camvid/full_s0 \
        --json runs/bench2/reliability_full_s0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.adapt.augment import normalize
from segadapt.adapt.config import default_camvid_dir
from segadapt.adapt.data.datasets import LabeledImageFolder
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.metrics import auroc
from segadapt.adapt.models.rectifier import confidence_prior
from segadapt.adapt.methods.rectifier_signals import rectifier_input
from segadapt.adapt.engine import load_run, rectification

VIEWS = ("flip", "scale0.75", "scale1.25", "gamma0.7")


def _probs(model: nn.Module, x: torch.Tensor, size) -> torch.Tensor:
    return F.softmax(F.interpolate(model(x).float(), size=size, mode="bilinear", align_corners=False), 1)


def _view_probs(model: nn.Module, img: torch.Tensor, view: str, mean, std, size) -> torch.Tensor:
    """Probabilities of one view, mapped back to the original frame: (B, K, H, W) float."""
    x = img.float()
    if view == "flip":
        return _probs(model, normalize(x.flip(-1), mean, std), size).flip(-1)
    if view.startswith("scale"):
        s = float(view[5:])
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False).clamp(0, 255)
        return _probs(model, normalize(xs, mean, std), size)
    if view.startswith("gamma"):
        g = float(view[5:])
        return _probs(model, normalize(255.0 * (x / 255.0) ** g, mean, std), size)
    raise ValueError(f"unknown view {view!r}")


def _set_dropout(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(on)


@torch.no_grad()
def signal_maps(teacher: nn.Module, img: torch.Tensor, mean, std, anchor: Optional[nn.Module] = None,
                mc_passes: int = 8) -> Dict[str, torch.Tensor]:
    """All candidate reliability signals for a batch.

    Args:
        teacher: the pseudo-labelling segmenter, eval mode (dropout is switched on only for ``mc_dropout`` and
            switched off again).
        img: (B, 3, H, W) uint8 or float RGB in [0, 255].
        mean, std: RGB normalisation of the checkpoint.
        anchor: optional second model (the frozen AdaBN source model) for the anchor signals.
        mc_passes: dropout passes for ``mc_dropout``; 0 leaves that signal out.

    Returns:
        dict: ``pseudo_label`` (B, H, W) int64 and one (B, H, W) float32 map per signal (see the module docstring);
        every probability-based map is in [0, 1], ``neg_entropy`` in [-log K, 0].
    """
    size = tuple(img.shape[-2:])
    p = _probs(teacher, normalize(img.float(), mean, std), size)
    top2 = p.topk(2, dim=1).values
    label = p.argmax(1)
    out = {"pseudo_label": label, "max_softmax": top2[:, 0], "margin": top2[:, 0] - top2[:, 1],
           "neg_entropy": (p * p.clamp_min(1e-12).log()).sum(1)}
    idx = label[:, None]
    agree, mean_prob = torch.zeros_like(top2[:, 0]), p.gather(1, idx)[:, 0]
    for v in VIEWS:
        pv = _view_probs(teacher, img, v, mean, std, size)
        agree += (pv.argmax(1) == label).float()
        mean_prob += pv.gather(1, idx)[:, 0]
    out["view_agreement"] = agree / len(VIEWS)
    out["view_mean_prob"] = mean_prob / (len(VIEWS) + 1)
    if mc_passes > 0:
        _set_dropout(teacher, True)
        try:
            out["mc_dropout"] = sum(_probs(teacher, normalize(img.float(), mean, std), size).gather(1, idx)[:, 0]
                                    for _ in range(mc_passes)) / mc_passes
        finally:
            _set_dropout(teacher, False)
    if anchor is not None:
        pa = _probs(anchor, normalize(img.float(), mean, std), size)
        out["anchor_agreement"] = (pa.argmax(1) == label).float()
        out["anchor_mean_prob"] = 0.5 * (p.gather(1, idx)[:, 0] + pa.gather(1, idx)[:, 0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="output folder of a finished `segadapt adapt` run (has last/)")
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--labels", default="", help="label folder (default: <target>/labels)")
    ap.add_argument("--size", type=int, nargs=2, default=None, help="input size H W (default: the checkpoint's)")
    ap.add_argument("--mc-passes", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)

    teacher, anchor, rect, meta, cfg = load_run(a.run)
    size = tuple(a.size) if a.size else tuple(meta.input_size)
    target = Path(a.target)
    image_dir = target / "images" if (target / "images").is_dir() else target
    ds = LabeledImageFolder(target, classes=meta.classes, image_dir=image_dir,
                            label_dir=Path(a.labels) if a.labels else target / "labels")
    ds = copy.copy(ds)
    ds.transform = Resize(size)
    scores: Dict[str, list] = {}
    positives = []
    t0 = time.time()
    for i in range(len(ds)):
        it = ds[i]
        img, lab = it["image"][None], it["label"][None]
        maps = signal_maps(teacher, img, meta.mean, meta.std, anchor, a.mc_passes)
        if cfg.rectifier.enabled:
            with torch.no_grad():
                x = normalize(img.float(), meta.mean, meta.std)
                logits, feats = rectifier_input(teacher, x, cfg.rectifier)
                la = anchor(x) if anchor is not None else None
                maps["rectifier"] = rectification(cfg, rect, feats, logits, la, size)
                if cfg.rectifier.prior != "none":
                    pt = _probs(teacher, x, size)
                    pn = _probs(anchor, x, size) if cfg.rectifier.prior == "teacher_anchor" else None
                    maps["rectifier_prior"] = confidence_prior(pt, pn)
        valid = lab != meta.classes.ignore_index
        positives.append((maps.pop("pseudo_label") == lab)[valid].numpy())
        for k, m in maps.items():
            scores.setdefault(k, []).append(m[valid].numpy())
    ok = np.concatenate(positives)
    res = {"run": a.run, "target": str(target), "size": list(size), "pixels": int(ok.size),
           "pseudo_label_accuracy": float(ok.mean()), "seconds": time.time() - t0,
           "auroc": {k: auroc(np.concatenate(v), ok) for k, v in scores.items()}}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
