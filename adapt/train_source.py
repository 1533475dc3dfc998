"""Supervised training of the source model (``segadapt train-source``).

One readable loop: AdamW with a warmup + poly schedule, cross-entropy with the ignore index on logits upsampled to
the crop, photometric augmentation on the image (a source model must not hinge on one exposure), bf16 autocast on
CUDA, periodic validation on the source validation split, ``best`` and ``last`` checkpoints, and ``--resume`` from
``last`` (weights, optimizer, schedule, RNG, elapsed time).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segadapt.adapt.augment import normalize_float, photometric
from segadapt.adapt.config import SourceTrainConfig, to_dict
from segadapt.adapt.data.datasets import LabeledImageFolder, collate, find_classes_json
from segadapt.adapt.data.transforms import Resize, train_transform
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.models.checkpoint import CheckpointMeta, load_checkpoint, load_training_state, save_checkpoint
from segadapt.adapt.models.segmenter import build_segmenter, upsample_logits
from segadapt.adapt.data.sampling import data_state, resumable_loader
from segadapt.adapt.resume import resume_from
from segadapt.adapt.train_utils import (autocast, nan_check, pick_device, rng_state, seed_everything, set_rng_state,
                               warmup_poly)
from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import write_atomic


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of (B, K, h, w) logits upsampled to the (B, H, W) int64 labels, ignoring ``ignore_index``."""
    logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def train_source(cfg: SourceTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train a source model as configured; returns a summary dict (best mIoU and step, steps done, seconds).

    Writes ``<out>/last`` (with training state) and ``<out>/best`` (best validation mIoU) checkpoints and
    ``<out>/history.json``.

    Raises:
        FileNotFoundError / ValueError: missing or malformed data (the message names the file).
    """
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    resume_dir = resume_from(cfg.out, cfg.resume, log)  # before any work: --resume with nothing is an error
    data = Path(cfg.data)
    train_dir, val_dir = data / cfg.train_split, data / cfg.val_split
    classes = ClassInfo.load(find_classes_json(train_dir))
    crop = tuple(cfg.crop) if all(cfg.crop) else tuple(cfg.size)
    geo = (train_transform(crop, cfg.size, cfg.scale, classes.ignore_index) if cfg.augment
           else Resize(crop))
    train_ds = LabeledImageFolder(train_dir, classes, transform=geo)
    val_ds = LabeledImageFolder(val_dir, classes) if cfg.val_split and val_dir.exists() else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = CheckpointMeta(classes=classes, input_size=tuple(cfg.size),
                          info={"command": "train-source", "config": to_dict(cfg)})

    start_step, best, best_step, elapsed_before, history, run_loss = 0, -1.0, -1, 0.0, [], None
    state = load_training_state(resume_dir) if resume_dir is not None else None
    if state is not None:
        model, _ = load_checkpoint(resume_dir, map_location=device)
        log(f"resuming from {resume_dir} at step {state['step']}")
    else:
        mc = cfg.model
        if mc.pretrained:
            from segadapt.adapt.models.checkpoint import is_checkpoint

            model = (load_checkpoint(mc.pretrained)[0] if is_checkpoint(mc.pretrained)
                     else build_segmenter(mc.arch, classes.num_classes, pretrained=mc.pretrained,
                                          ignore_index=classes.ignore_index))
        else:
            model = build_segmenter(mc.arch, classes.num_classes, mc.variant, 3, mc.output_stride, mc.dropout,
                                    classes.ignore_index)
    model.to(device).train()
    opt = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), betas=(0.9, 0.999))
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start_step, best, best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        elapsed_before = float(state.get("elapsed", 0.0))
        history = json.loads(state.get("history", "[]"))
        run_loss = state.get("run_loss")
        set_rng_state(state["rng"])
    # batch k of the run depends only on (seed, k): a resumed run continues the data order exactly
    consumed = int(state.get("data", {}).get("consumed", start_step)) if state is not None else 0
    loader = resumable_loader(train_ds, cfg.batch_size, cfg.seed, start=consumed, num_workers=cfg.num_workers,
                              collate_fn=collate)

    def save_last(step: int, elapsed: float) -> None:
        # everything the next step depends on: exact resume (issue #18)
        ts = {"optimizer": opt.state_dict(), "step": step, "best": best, "best_step": best_step,
              "elapsed": elapsed, "rng": rng_state(), "data": data_state(loader, step), "history": json.dumps(history),
              "run_loss": run_loss}
        meta.info.update(step=step)
        save_checkpoint(out / "last", model, meta, ts)

    def validate(step: int) -> float:
        nonlocal best, best_step
        if val_ds is None:
            return float("nan")
        m = evaluate(model, val_ds, meta.mean, meta.std, tuple(cfg.size), device, batch_size=8)
        history.append({"step": step, "val_miou": m["miou"], "val_pixel_acc": m["pixel_acc"]})
        if m["miou"] > best:
            best, best_step = m["miou"], step
            meta.info.update(step=step, val_miou=m["miou"], val_iou=m["iou"])
            save_checkpoint(out / "best", model, meta)
        log(f"step {step}: val mIoU {m['miou']:.2f} (best {best:.2f} at {best_step})")
        return m["miou"]

    t0 = time.time()
    batches = iter(loader)
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train-source", unit="step", dynamic_ncols=True)
    stopped_early = False
    while step < cfg.steps:
        batch = next(batches)
        budget = cfg.max_minutes * 60
        time_progress = (elapsed_before + time.time() - t0) / budget if budget > 0 else None
        f = warmup_poly(step, cfg.steps, cfg.warmup_steps, cfg.poly_power, progress=time_progress)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * f
        imgs = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        x = imgs.float() / 255.0
        if cfg.augment:
            x = photometric(x, cfg.photometric)
        x = normalize_float(x, meta.mean, meta.std)
        with autocast(device, cfg.amp):
            logits = model(x)
        loss = supervised_loss(logits, labels, classes.ignore_index)
        nan_check(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        elapsed = elapsed_before + time.time() - t0
        out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        if step % 20 == 0 or step == cfg.steps:
            history.append({"step": step, "loss": run_loss, "lr": opt.param_groups[0]["lr"]})
        if (cfg.val_every > 0 and step % cfg.val_every == 0) or step == cfg.steps or out_of_time:
            validate(step)
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.steps or out_of_time:
            save_last(step, elapsed)
        if out_of_time:
            log(f"time budget of {cfg.max_minutes} min reached at step {step}; stopping")
            stopped_early = True
            break
    bar.close()
    if step == start_step and not (out / "last").exists():
        save_last(step, elapsed_before)
    summary = {"best_val_miou": best, "best_step": best_step, "steps": step, "stopped_early": stopped_early,
               "seconds": elapsed_before + time.time() - t0, "out": str(out), "device": str(device)}
    write_atomic(out / "history.json", json.dumps({"summary": summary, "history": history}, indent=1).encode())
    return summary
