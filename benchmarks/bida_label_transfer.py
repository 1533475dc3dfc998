"""BiDA's label transfer at step 0 with each source-prototype option (``--bida.source-prototypes``), issue #13.

The source model after AdaBN on the target images is the teacher (as in ``segadapt adapt`` at step 0); pseudo-labels
are its argmax where its max softmax >= 0.9. For each option and projection-head seed it reports the label-transfer
accuracy (nearest calibrated source prototype), the same rule in the raw decoder-feature space (no head), the share
of pseudo-labels the vote keeps and the accuracy of the ones it vetoes. Target labels are used only to measure.

    python benchmarks/bida_label_transfer.py --checkpoint runs/quick_s0_a/source/best \
        --target ../shared/data/camvid-day2dusk/target_adapt --size 120 160
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segadapt.adapt.adabn import adapt_batchnorm
from segadapt.adapt.augment import normalize
from segadapt.adapt.methods.bida import BiDA, class_means
from segadapt.adapt.methods.config import BiDAConfig
from segadapt.adapt.methods.base import StepContext, source_batches
from segadapt.adapt.data.datasets import ImageFolder, LabeledImageFolder, collate
from segadapt.adapt.data.transforms import Resize
from segadapt.adapt.models.checkpoint import load_segmenter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", required=True, help="labelled target split (<dir>/images, <dir>/labels)")
    ap.add_argument("--size", type=int, nargs=2, default=(120, 160))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    size = tuple(a.size)
    model, meta = load_segmenter(a.checkpoint)
    K, ign = meta.classes.num_classes, meta.classes.ignore_index
    plain = ImageFolder(a.target, transform=Resize(size))
    adapt_batchnorm(model, DataLoader(plain, batch_size=8, collate_fn=collate), meta.mean, meta.std, "cpu")
    model.eval()
    lab_ds = LabeledImageFolder(a.target, transform=Resize(size))
    batch = collate([lab_ds[i] for i in range(len(lab_ds))])
    gt = batch["label"]
    with torch.no_grad():
        logits, feats = model.forward_features(normalize(batch["image"], meta.mean, meta.std))
    probs = torch.softmax(F.interpolate(logits, size=size, mode="bilinear"), 1)
    conf, pl = probs.max(1)
    mask = conf >= 0.9
    labels = torch.where(mask, pl, torch.full_like(pl, ign))
    known = gt != ign
    acc = lambda pred, m: float((pred[m & known] == gt[m & known]).float().mean())  # noqa: E731
    print(f"teacher argmax accuracy {acc(pl, known):.3f}; pseudo-labels (conf >= 0.9) accuracy {acc(pl, mask):.3f}, "
          f"share of labelled pixels {float((mask & known).sum() / known.sum()):.3f}")
    for opt in ("features", "classifier"):
        for seed in a.seeds:
            torch.manual_seed(seed)
            b = BiDA(BiDAConfig(enabled=True, source_prototypes=opt), model.feature_channels, K)
            b.init_source(model, source_batches(plain, meta.mean, meta.std, "cpu", 64))
            ctx = StepContext(step=0, steps=1, ignore_index=ign, teacher_logits=logits, teacher_features=feats,
                              teacher_probs=probs, labels=labels, weights=mask.float(), mask=mask)
            keep = b.vote(ctx)
            tr = F.interpolate(b.transfer(ctx)[1], size=size, mode="bilinear").argmax(1)
            S, n = class_means(b.src_feats, b.src_labels, K)
            raw = torch.einsum("bdhw,kd->bkhw", F.normalize(feats, dim=1), F.normalize(S, dim=1))
            raw = F.interpolate(raw.masked_fill(~(n > 0)[None, :, None, None], -9), size=size, mode="bilinear")
            print(f"{opt:10s} seed {seed}: transfer accuracy {acc(tr, known):.3f} "
                  f"(no head {acc(raw.argmax(1), known):.3f}); pseudo-labels kept "
                  f"{float((mask & keep).sum() / mask.sum()):.4f}, accuracy kept "
                  f"{acc(pl, mask & keep):.3f}, vetoed {acc(pl, mask & ~keep):.3f}; source samples {len(b.src_labels)}")


if __name__ == "__main__":
    main()
