"""Would a multi-scale or finer-stride teacher make better pseudo-labels? Measured before building it.

The EMA teacher labels each target frame from one forward pass at the model's size and output stride. Two common
ways to get better labels from the same weights, neither in the five papers:

  scales   the mean of the softmax over resized copies of the frame (and their mirrors), resized back: the multi-scale
           test-time augmentation of segmentation codebases (DeepLabV3, section 4.3; DAFormer's and HRDA's
           evaluation). ``teacher.flip`` (adapt/config.py) is the mirror-only form of it.
  stride   a DeepLabV3-MobileNetV2 trained at output stride 16 run at stride 8 (the last stage dilated instead of
           strided; the same weights): DeepLabV3 (Chen et al. 2017, section 4.3) infers at 8 after training at 16.

Both are scored here on the model the teacher starts from (the source model with the AdaBN blend ``--adabn-alpha``,
the adaptation's default 0.75): its mIoU on the target's labels (read only to score) with each view set. A view set
that does not beat one pass on both domains is not worth a teacher option.

    # DATA: the data root
    python benchmarks/probes/teacher_views.py --checkpoint runs/source/best --json runs/teacher_views_dusk.json
    python benchmarks/probes/teacher_views.py --checkpoint runs/source/best \
        --target $DATA/kitti-semantics/target_adapt --keep-aspect 180 --json runs/teacher_views_kitti.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from segadapt.adapt.adabn import adapt_batchnorm
from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import normalize
from segadapt.adapt.config import default_camvid_dir
from segadapt.adapt.data.datasets import ImageFolder, LabeledImageFolder, collate
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.metrics import ConfusionMatrix
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.adapt.models.segmenter import Segmenter
from segadapt.runtime.files import write_atomic
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adabn_choice import blend  # the AdaBN blend of benchmarks/probes/adabn_choice.py

# name -> views (scale, mirrored); the softmax is averaged over the views
VIEW_SETS = {
    "one pass": [(1.0, False)],
    "flip": [(1.0, False), (1.0, True)],
    "x1.25 only": [(1.25, False)],
    "x1.5 only": [(1.5, False)],
    "1 + 1.5": [(1.0, False), (1.5, False)],
    "0.75 + 1 + 1.25": [(0.75, False), (1.0, False), (1.25, False)],
    "1 + 1.25 + 1.5": [(1.0, False), (1.25, False), (1.5, False)],
    "1 + 1.5, flipped too": [(1.0, False), (1.0, True), (1.5, False), (1.5, True)],
}


def at_output_stride(model: Segmenter, output_stride: int) -> Segmenter:
    """The same DeepLabV3-MobileNetV2 weights built at another output stride (8 or 16); eval mode.

    Raises:
        ValueError: for a model that has no output stride to change (SegFormer).
    """
    if model.model_type != "mobilenet_v2":
        raise ValueError(f"output stride is fixed for {model.arch}; only deeplabv3-mobilenetv2 has one to change")
    cfg = copy.deepcopy(model.hf.config)
    cfg.output_stride = output_stride
    hf = type(model.hf)(cfg)
    hf.load_state_dict(model.hf.state_dict())
    return Segmenter(hf).eval()


@torch.no_grad()
def view_probs(model: nn.Module, x: torch.Tensor, views: list, out_hw: tuple, cache: dict) -> torch.Tensor:
    """Mean softmax over ``views`` of normalised frames.

    Args:
        model: returns logits (B, K, h, w) for frames (B, 3, H', W').
        x: (B, 3, H, W) float32, normalised RGB.
        views: [(scale, mirrored)]: each view is x resized by ``scale`` (bilinear), mirrored left-right if asked;
            a mirrored view's logits are mirrored back before the softmax.
        out_hw: (H_out, W_out) the logits are resized to (bilinear) before the softmax.
        cache: per-frame store of each view's probabilities, shared by the view sets scored on the same frame.

    Returns:
        (B, K, H_out, W_out) float32 probabilities (each pixel sums to 1).
    """
    total = 0.0
    for scale, mirrored in views:
        if (scale, mirrored) not in cache:
            xi = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            logits = model(xi.flip(-1) if mirrored else xi).float()
            logits = logits.flip(-1) if mirrored else logits
            cache[(scale, mirrored)] = F.softmax(F.interpolate(logits, size=out_hw, mode="bilinear",
                                                               align_corners=False), 1)
        total = total + cache[(scale, mirrored)]
    return total / len(views)


@torch.no_grad()
def score_view_sets(model: nn.Module, ds: LabeledImageFolder, mean, std, size: tuple, view_sets: dict) -> dict:
    """mIoU (percent) and per-class IoU of each view set on the labelled frames, the frames resized to ``size``
    and the averaged softmax scored at the labels' size."""
    classes = ds.classes
    cms = {k: ConfusionMatrix(classes.num_classes, classes.ignore_index) for k in view_sets}
    for i in range(len(ds)):
        item = ds[i]
        label = item["label"][None]
        x = F.interpolate(normalize(item["image"][None], mean, std), size=size, mode="bilinear", align_corners=False)
        cache: dict = {}
        for name, views in view_sets.items():
            cms[name].update(view_probs(model, x, views, tuple(label.shape[-2:]), cache).argmax(1), label)
    out = {}
    for name, cm in cms.items():
        m = cm.compute()
        out[name] = {"miou": m["miou"], "iou": m["iou"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--keep-aspect", type=int, default=0)
    ap.add_argument("--adabn-alpha", type=float, default=0.75, help="AdaBN blend of the teacher's start (0 = none)")
    ap.add_argument("--strides", type=int, nargs="*", default=[8], choices=[8, 16, 32],
                    help="other output strides to score (one pass; deeplabv3-mobilenetv2 only)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if not 0.0 <= a.adabn_alpha <= 1.0:
        ap.error(f"--adabn-alpha must be in [0, 1], got {a.adabn_alpha}")
    target_dir = Path(a.target)
    for d in (target_dir / "images", target_dir / "labels"):
        if not d.is_dir():
            ap.error(f"{d}: no such folder (--target needs images/ and labels/)")
    source, meta = load_segmenter(a.checkpoint)
    if any(s != source.output_stride for s in a.strides) and source.model_type != "mobilenet_v2":
        ap.error(f"{a.checkpoint}: {source.arch} has a fixed output stride; pass --strides with no value")
    image_dir = target_dir / "images"
    size = resolve_size((0, 0), a.keep_aspect, image_dir, meta.input_size, source.arch, source.output_stride)
    loader = DataLoader(ImageFolder(image_dir, transform=Resize(size)), batch_size=8, shuffle=False,
                        collate_fn=collate)
    ds = LabeledImageFolder(target_dir, classes=meta.classes, image_dir=image_dir, label_dir=target_dir / "labels")
    t0 = time.time()

    def start_model(model: Segmenter) -> nn.Module:  # the teacher's start: the AdaBN blend of this model
        if a.adabn_alpha <= 0:
            return model.eval()
        adabn = copy.deepcopy(model)
        adapt_batchnorm(adabn, loader, meta.mean, meta.std, "cpu")
        return blend(model.eval(), adabn, a.adabn_alpha).eval()

    rows = score_view_sets(start_model(source), ds, meta.mean, meta.std, size, VIEW_SETS)
    for s in a.strides:
        if s != source.output_stride:
            other = start_model(at_output_stride(source, s))
            rows[f"output stride {s}"] = score_view_sets(other, ds, meta.mean, meta.std, size,
                                                         {"one pass": VIEW_SETS["one pass"]})["one pass"]
    base = rows["one pass"]["miou"]
    for name, r in rows.items():
        print(f"{name:<24} mIoU {r['miou']:6.2f}  ({r['miou'] - base:+.2f})", flush=True)
    rep = {"checkpoint": a.checkpoint, "target": str(target_dir), "size": list(size), "frames": len(ds),
           "adabn_alpha": a.adabn_alpha, "output_stride": source.output_stride, "classes": list(meta.classes.names),
           "rows": rows, "seconds": round(time.time() - t0, 1)}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.json, json.dumps(rep, indent=1).encode(), what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
