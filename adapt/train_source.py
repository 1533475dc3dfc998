"""Supervised training of the source model (``segadapt train-source``).

One readable loop: AdamW with a warmup + poly schedule, cross-entropy with the ignore index on logits upsampled to
the crop, photometric augmentation on the image (a source model must not hinge on one exposure), bf16 autocast on
CUDA, periodic validation on the source validation split, ``best`` and ``last`` checkpoints, and ``--resume`` from
``last`` (weights, optimizer, schedule, RNG, elapsed time).

Against rare classes, both off by default: ``--rare-class-sampling`` draws the frames by DAFormer's rare-class
sampling (:mod:`segadapt.adapt.data.rare_class`), and ``--loss balanced`` / ``--loss ohem`` replace the plain
cross-entropy (:mod:`segadapt.adapt.source_losses`); the sampling and the balanced loss write the class pixel
counts to ``<out>/class_stats.json``, read back on ``--resume``.

Under ``torchrun`` the loop is data-parallel (:mod:`segadapt.adapt.training.distributed`): DDP (with SyncBatchNorm on
GPUs), each rank a share of every batch, rank 0 validates and writes; ``--resume`` needs the same number of processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segadapt.adapt.training import distributed
from segadapt.adapt.augment import normalize_float, photometric
from segadapt.adapt.config import SourceTrainConfig, to_dict
from segadapt.adapt.data.datasets import LabeledImageFolder, collate, find_classes_json
from segadapt.adapt.data.transforms import Resize, train_transform
from segadapt.adapt.evaluate import evaluate
from segadapt.adapt.models.checkpoint import CheckpointMeta, load_checkpoint, load_training_state, save_checkpoint
from segadapt.adapt.models.segmenter import build_segmenter, upsample_logits
from segadapt.adapt.data.rare_class import rare_class_loader, run_class_stats
from segadapt.adapt.data.sampling import data_state, resumable_loader
from segadapt.adapt.source_losses import balanced_ce, median_frequency_weights, ohem_ce
from segadapt.adapt.training.resume import resume_from
from segadapt.adapt.training.train_utils import (autocast, nan_check, pick_device, rng_state, seed_everything,
                                                 set_rng_state, warmup_poly)
from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import write_atomic


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, loss: str = "ce",
                    class_weights: torch.Tensor | None = None, ohem_thresh: float = 0.7,
                    ohem_min_kept: int = 4000) -> torch.Tensor:
    """The training loss of (B, K, h, w) logits upsampled to the (B, H, W) int64 labels, ignoring ``ignore_index``.

    Args:
        loss: ``ce`` (cross-entropy), ``balanced`` (class-weighted with ``class_weights`` (K,), from
            :func:`~segadapt.adapt.source_losses.median_frequency_weights`) or ``ohem``
            (:func:`~segadapt.adapt.source_losses.ohem_ce` with ``ohem_thresh``, ``ohem_min_kept``).

    Raises:
        ValueError: another ``loss``, or ``balanced`` without ``class_weights``.
    """
    logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]))
    if loss == "ce":
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if loss == "balanced" and class_weights is not None:
        return balanced_ce(logits, labels, class_weights, ignore_index)
    if loss == "ohem":
        return ohem_ce(logits, labels, ignore_index, ohem_thresh, ohem_min_kept)
    raise ValueError(f"loss {loss!r}: expected ce, balanced (with class weights) or ohem")


def check_same_sampling(state: dict, cfg: SourceTrainConfig, where: str) -> None:
    """Refuse to resume a run whose data order the settings would change: the checkpoint's data state names its
    sampler (rare-class sampling with its temperature and minimum pixels, or uniform frames).

    Raises:
        ValueError: one line naming ``where`` (the checkpoint folder) and both settings.
    """
    data = state.get("data", {})
    was = (data.get("sampler", "uniform"), data.get("temperature"), data.get("min_pixels"))
    now = (("rare_class", cfg.rare_class_temperature, cfg.rare_class_min_pixels) if cfg.rare_class_sampling
           else ("uniform", None, None))
    if was != now:
        def text(s):
            return f"rare-class sampling (T {s[1]:g}, min pixels {s[2]})" if s[0] == "rare_class" else "uniform frames"

        raise ValueError(f"{where}: this run drew {text(was)}; resuming with {text(now)} would change its data "
                         f"order: give the run's own --rare-class-* settings, or start afresh (--resume false)")


def train_source(cfg: SourceTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train a source model as configured; returns a summary dict (best mIoU and step, steps done, seconds).

    Writes ``<out>/last`` (with training state) and ``<out>/best`` (best validation mIoU) checkpoints and
    ``<out>/history.json``.

    Raises:
        FileNotFoundError / ValueError: missing or malformed data (the message names the file).
    """
    seed_everything(cfg.seed)
    with distributed.session(cfg.device):  # under torchrun: data-parallel; else a no-op
        return _SourceRun(cfg, distributed.main_only(log)).run()


class _SourceRun:
    """One ``segadapt train-source`` run: data, model, optimiser, schedule, validation and checkpoints."""

    def __init__(self, cfg: SourceTrainConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.device = pick_device(cfg.device)
        resume_dir = resume_from(cfg.out, cfg.resume, log)  # before any work: --resume with nothing is an error
        self.setup_data()
        self.start_step, self.best, self.best_step, self.elapsed_before = 0, -1.0, -1, 0.0
        self.history: list = []
        self.run_loss = None
        state = load_training_state(resume_dir) if resume_dir is not None else None
        if state is not None:
            distributed.check_world_size(state, str(resume_dir))
            check_same_sampling(state, cfg, str(resume_dir))
        self.model = self.build_model(resume_dir, state)
        self.model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult),
                                     betas=(0.9, 0.999))
        for g in self.opt.param_groups:
            g["initial_lr"] = g["lr"]
        if state is not None:
            self.restore(state)
        distributed.rank_rng(cfg.seed, state, set_rng_state)  # data-parallel: a random stream per rank
        # batch k of the run depends only on (seed, k): a resumed run continues the data order exactly
        consumed = int(state.get("data", {}).get("consumed", self.start_step)) if state is not None else 0
        self.loader = self.make_loader(consumed, resumed=state is not None)
        self.model = distributed.wrap(self.model, self.device, sync_batchnorm=True)  # no-op without torchrun

    def make_loader(self, consumed: int, resumed: bool):
        """The training stream at batch ``consumed``: uniform frames, or rare-class sampling; with rare-class
        sampling or the balanced loss, the class pixel counts (``<out>/class_stats.json``, reused on resume) and
        the loss's class weights."""
        cfg = self.cfg
        self.class_weights = None
        stats = None
        if cfg.rare_class_sampling or cfg.loss == "balanced":
            # data-parallel: rank 0 counts and writes, every rank samples with its counts
            stats = distributed.broadcast_object(run_class_stats(self.out, self.train_ds, resumed, self.log)
                                                 if distributed.is_main() else None)
        if cfg.loss == "balanced":
            w = median_frequency_weights(stats.counts, cfg.class_weight_power)
            self.class_weights = torch.from_numpy(w).to(self.device)
            self.log(f"balanced loss, median-frequency class weights ^ {cfg.class_weight_power:g}: " + ", ".join(
                f"{n} {w:.2f}" for n, w in zip(self.classes.names, self.class_weights.tolist())))
        kw = dict(num_workers=cfg.num_workers, collate_fn=collate, rank=distributed.rank(),
                  world_size=distributed.world_size())
        if cfg.rare_class_sampling:
            return rare_class_loader(self.train_ds, stats, cfg.batch_size, cfg.seed, consumed,
                                     cfg.rare_class_temperature, cfg.rare_class_min_pixels, cfg.rare_class_crop_tries,
                                     **kw)
        return resumable_loader(self.train_ds, cfg.batch_size, cfg.seed, start=consumed, **kw)

    def setup_data(self) -> None:
        """Classes, the training set (with the geometric augmentation), the validation set, output metadata."""
        cfg = self.cfg
        data = Path(cfg.data)
        train_dir, val_dir = data / cfg.train_split, data / cfg.val_split
        self.classes = classes = ClassInfo.load(find_classes_json(train_dir))
        crop = tuple(cfg.crop) if all(cfg.crop) else tuple(cfg.size)
        geo = (train_transform(crop, cfg.size, cfg.scale, classes.ignore_index) if cfg.augment
               else Resize(crop))
        self.train_ds = LabeledImageFolder(train_dir, classes, transform=geo)
        self.val_ds = LabeledImageFolder(val_dir, classes) if cfg.val_split and val_dir.exists() else None
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta = CheckpointMeta(classes=classes, input_size=tuple(cfg.size),
                                   info={"command": "train-source", "config": to_dict(cfg)})

    def build_model(self, resume_dir: Path | None, state: dict | None):
        """The model being resumed, a pretrained one (checkpoint or transformers directory), or a fresh one."""
        classes = self.classes
        if state is not None:
            model, _ = load_checkpoint(resume_dir, map_location=self.device)
            self.log(f"resuming from {resume_dir} at step {state['step']}")
            return model
        mc = self.cfg.model
        if mc.pretrained:
            from segadapt.adapt.models.checkpoint import is_checkpoint

            return (load_checkpoint(mc.pretrained)[0] if is_checkpoint(mc.pretrained)
                    else build_segmenter(mc.arch, classes.num_classes, pretrained=mc.pretrained,
                                         ignore_index=classes.ignore_index))
        return build_segmenter(mc.arch, classes.num_classes, mc.variant, 3, mc.output_stride, mc.dropout,
                               classes.ignore_index)

    def restore(self, state: dict) -> None:
        """Optimiser, position, best score, history, running loss and RNG states from the training state."""
        self.opt.load_state_dict(state["optimizer"])
        self.start_step, self.best, self.best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.history = json.loads(state.get("history", "[]"))
        self.run_loss = state.get("run_loss")
        set_rng_state(state["rng"])

    def save_last(self, step: int, elapsed: float) -> None:
        """``<out>/last`` with everything the next step depends on (exact resume); data-parallel: every
        rank's RNG state, written by rank 0 only."""
        rng_ranks = distributed.gather_object(rng_state())  # None without torchrun
        if not distributed.is_main():
            return
        ts = {"optimizer": self.opt.state_dict(), "step": step, "best": self.best, "best_step": self.best_step,
              "elapsed": elapsed, "rng": rng_state(), "data": data_state(self.loader, step),
              "history": json.dumps(self.history), "run_loss": self.run_loss}
        if rng_ranks is not None:
            ts["rng_ranks"], ts["world_size"] = rng_ranks, len(rng_ranks)
        self.meta.info.update(step=step)
        save_checkpoint(self.out / "last", distributed.unwrap(self.model), self.meta, ts)

    def validate(self, step: int) -> float:
        """mIoU (percent) on the validation split (NaN without one, and on ranks other than 0 of a data-parallel
        run); a new best is saved as ``<out>/best``."""
        if self.val_ds is None or not distributed.is_main():
            return float("nan")
        model = distributed.unwrap(self.model)
        m = evaluate(model, self.val_ds, self.meta.mean, self.meta.std, tuple(self.cfg.size), self.device,
                     batch_size=8)
        self.history.append({"step": step, "val_miou": m["miou"], "val_pixel_acc": m["pixel_acc"]})
        if m["miou"] > self.best:
            self.best, self.best_step = m["miou"], step
            self.meta.info.update(step=step, val_miou=m["miou"], val_iou=m["iou"])
            save_checkpoint(self.out / "best", model, self.meta)
        self.log(f"step {step}: val mIoU {m['miou']:.2f} (best {self.best:.2f} at {self.best_step})")
        return m["miou"]

    def set_lr(self, step: int) -> None:
        """Warmup + poly schedule; with a time budget the decay follows the elapsed fraction when that is further."""
        cfg = self.cfg
        budget = cfg.max_minutes * 60
        # data-parallel: rank 0's clock, so that every rank has the same learning rate
        time_progress = distributed.broadcast_float(self.elapsed_before + time.time() - self.t0) / budget \
            if budget > 0 else None
        f = warmup_poly(step, cfg.steps, cfg.warmup_steps, cfg.poly_power, progress=time_progress)
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * f

    def train_step(self, batch: dict, step: int) -> torch.Tensor:
        """One supervised step on (B, 3, H, W) uint8 images and (B, H, W) int64 labels; returns the loss."""
        imgs = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        x = imgs.float() / 255.0
        if self.cfg.augment:
            x = photometric(x, self.cfg.photometric)
        x = normalize_float(x, self.meta.mean, self.meta.std)
        with autocast(self.device, self.cfg.amp):
            logits = self.model(x)
        loss = supervised_loss(logits, labels, self.classes.ignore_index, self.cfg.loss, self.class_weights,
                               self.cfg.ohem_thresh, self.cfg.ohem_min_kept)
        nan_check(loss, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def after_step(self, step: int) -> bool:
        """History, validation and ``last`` after ``step`` steps; True when the time budget is spent."""
        cfg = self.cfg
        elapsed = self.elapsed_before + time.time() - self.t0
        if cfg.max_minutes > 0:  # data-parallel: rank 0's clock, so that every rank stops at the same step
            elapsed = distributed.broadcast_float(elapsed)
        out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        if step % 20 == 0 or step == cfg.steps:
            self.history.append({"step": step, "loss": self.run_loss, "lr": self.opt.param_groups[0]["lr"]})
        if (cfg.val_every > 0 and step % cfg.val_every == 0) or step == cfg.steps or out_of_time:
            self.validate(step)
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.steps or out_of_time:
            self.save_last(step, elapsed)
        if out_of_time:
            self.log(f"time budget of {cfg.max_minutes} min reached at step {step}; stopping")
        return out_of_time

    def run(self) -> dict:
        """Train from the start (or resumed) step to ``cfg.steps`` or the time budget; returns the summary."""
        cfg, out = self.cfg, self.out
        self.t0 = time.time()
        batches = iter(self.loader)
        step = self.start_step
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train-source", unit="step", dynamic_ncols=True,
                   **distributed.bar_kwargs())
        stopped_early = False
        while step < cfg.steps:
            batch = next(batches)
            self.set_lr(step)
            loss = self.train_step(batch, step)
            step += 1
            lv = float(loss.detach())
            self.run_loss = lv if self.run_loss is None else 0.95 * self.run_loss + 0.05 * lv
            bar.update(1)
            bar.set_postfix(loss=f"{self.run_loss:.3f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}", refresh=False)
            if self.after_step(step):
                stopped_early = True
                break
        bar.close()
        if step == self.start_step and not (out / "last").exists():
            self.save_last(step, self.elapsed_before)
        summary = {"best_val_miou": self.best, "best_step": self.best_step, "steps": step,
                   "stopped_early": stopped_early, "seconds": self.elapsed_before + time.time() - self.t0,
                   "out": str(out), "device": str(self.device)}
        if distributed.is_main():
            write_atomic(out / "history.json", json.dumps({"summary": summary, "history": self.history},
                                                          indent=1).encode())
        return summary
