"""Source-only baseline: the domain gap that adaptation must close.

Trains a source model on ``source_train``, selects the best checkpoint on ``source_val`` and reports mIoU and
per-class IoU on ``source_val`` and on ``target_adapt`` (target labels used for measuring only). Prints and writes
JSON.

Example (how the source model of docs/results.md was trained):
    python benchmarks/source_only.py --arch deeplabv3-mobilenetv2 --size 180 240 --steps 1600 --minutes 35 \
        --out runs/bench/source_dlv3 --json runs/bench/source_dlv3.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from segadapt.adapt.config import ModelConfig, SourceTrainConfig, default_camvid_dir, to_dict
from segadapt.adapt.evaluate import evaluate_checkpoint
from segadapt.adapt.metrics import format_table
from segadapt.adapt.train_source import train_source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=default_camvid_dir())
    ap.add_argument("--arch", default="deeplabv3-mobilenetv2")
    ap.add_argument("--variant", default="")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=(360, 480))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget for training (0 = none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-every", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/source")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()

    cfg = SourceTrainConfig(
        data=a.data, out=a.out, size=tuple(a.size), steps=a.steps, max_minutes=a.minutes, batch_size=a.batch_size,
        lr=a.lr, val_every=a.val_every, save_every=a.val_every, seed=a.seed, num_workers=a.num_workers,
        resume=a.resume, warmup_steps=min(200, a.steps // 10),
        model=ModelConfig(arch=a.arch, variant=a.variant, output_stride=a.output_stride))
    t0 = time.time()
    summary = train_source(cfg)
    train_s = time.time() - t0
    result = {"config": to_dict(cfg), "train": summary, "train_seconds": train_s,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": summary["device"],
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    best = Path(a.out) / "best"
    for split in ("source_val", "target_adapt"):
        m = evaluate_checkpoint(best, Path(a.data) / split, device=summary["device"], progress=False)
        result[split] = {k: m[k] for k in ("miou", "pixel_acc", "mean_acc", "iou", "num_images")}
        print(format_table(m, m["classes"], title=f"{split}: {a.arch} {a.variant} at {a.size[0]}x{a.size[1]}"))
    result["classes"] = m["classes"]
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    print(json.dumps({"source_val_miou": result["source_val"]["miou"],
                      "target_adapt_miou": result["target_adapt"]["miou"], "steps": summary["steps"],
                      "train_seconds": round(train_s)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
