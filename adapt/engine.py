"""Adaptation (``segadapt adapt``): the one loop, read top to bottom.

Inputs are a source checkpoint and unlabelled target footage: the target datasets have no label field, and without
``--source-data`` nothing reads source data. Per run and step (a mean-teacher self-training loop after DAFormer,
Hoyer et al. CVPR 2022, without its source side; DACS's ClassMix, Tranheden et al. WACV 2021; CBST's thresholds,
Zou et al. ECCV 2018):

0. AdaBN: the source model's BatchNorm statistics are re-estimated on the target frames (Li et al. 2016; blended
   with the source's, ``adabn_alpha``) and then frozen; the EMA teacher starts as this model;
1. weak view (resize, random scale/crop, flip) -> EMA teacher -> probabilities;
2. pseudo-labels: class-balanced confidence thresholds and CBST's class-normalised rule; crop padding is never
   labelled; class-frequency loss weights on the final labels;
3. strong view: target-to-target ClassMix + colour jitter + blur (image only);
4. loss: pixel-weighted cross-entropy on the pseudo-labels, or the rectification-aware mixture loss when a
   component gives a per-pixel reliability r; plus the components' loss terms;
5. optimiser step (AdamW), EMA update of the teacher.

The methods (CrossMatch's RGB-D stream, IR2F's rectifier, SeCo, RCCR, BiDA, the UDA mode) are components
(:mod:`segadapt.adapt.methods`) that hook into these points; this module knows none of them by name.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segadapt.adapt.adabn import adabn_source_model, freeze_batchnorm
from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import class_mix_masks, mix, normalize, normalize_float, photometric
from segadapt.adapt.config import AdaptConfig, check_config, to_dict
from segadapt.adapt.data.datasets import collate, is_video
from segadapt.adapt.data.depth import make_depth_provider
from segadapt.adapt.data.depth_cache import prepare_depth_cache
from segadapt.adapt.data.sampling import resumable_loader
from segadapt.adapt.data.target import target_dataset
from segadapt.adapt.data.transforms import Resize, train_transform
from segadapt.adapt.losses import mixture_loss, weighted_ce
from segadapt.adapt.methods.base import PseudoLabels, RunContext, Step, StrongView, TeacherView
from segadapt.adapt.methods.components import build_components
from segadapt.adapt.models.checkpoint import (CheckpointMeta, checkpoint_hash, is_checkpoint, load_checkpoint,
                                              load_segmenter, load_training_state, save_checkpoint)
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.monitor import LabelFreeMonitor
from segadapt.adapt.select_adapted import select_adapted
from segadapt.adapt.pseudo_label import ClassFrequencyWeights, ThresholdTracker, kept_fraction, pseudo_label
from segadapt.adapt.teacher import EMATeacher
from segadapt.adapt.training import distributed
from segadapt.adapt.training.run_log import StepLogger, gradient_shares
from segadapt.adapt.training.resume import clear_stale_saves, resume_from
from segadapt.adapt.training.run_state import STATE_FORMAT, restore_state, save_state
from segadapt.adapt.training.train_utils import autocast, nan_check, pick_device, seed_everything, set_rng_state
from segadapt.runtime.files import write_json

__all__ = ["Engine", "adapt", "target_dataset"]

def adapt(cfg: AdaptConfig, log: Callable[[str], None] = print) -> dict:
    """Run adaptation as configured; returns the summary dict (also ``<out>/summary.json``).

    Writes ``<out>/adapted`` (the adapted checkpoint), ``<out>/last`` (+ training state for ``--resume``),
    ``<out>/coverage.jsonl`` (per logged step: losses, pseudo-label coverage per class, the label-free monitor's
    signals, :mod:`segadapt.adapt.monitor`), ``<out>/monitor.png``, ``<out>/debug/*.png``; with ``select`` auto
    also ``<out>/saves/step_N`` and ``<out>/selection.json``, and ``adapted/`` holds the label-free pick
    (:mod:`segadapt.adapt.select_adapted`); under torchrun rank 0 scores the candidates after the process group
    ends.

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, target or settings (one line naming the input).
    """
    check_config(cfg)
    seed_everything(cfg.seed)
    with distributed.session(cfg.device):  # under torchrun: data-parallel (training/distributed.py); else a no-op
        engine = Engine(cfg, distributed.main_only(log))
        if not cfg.self_training:
            return engine.finish_adabn_only() if distributed.is_main() else {"steps": 0}
        engine.setup_training()
        summary = engine.run()
        main = distributed.is_main()
    if cfg.select == "auto" and main:  # after leaving the process group: rank 0 alone, no collective operation
        summary["selection"] = select_adapted(engine, engine.log)
        write_json(engine.out / "summary.json", summary)
    return summary


class Engine:
    """One ``segadapt adapt`` run: the target data, the student, its EMA teacher, the optional frozen anchor (the
    source model after AdaBN), the enabled components, the optimiser and the loop (module docstring)."""

    def __init__(self, cfg: AdaptConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.device = pick_device(cfg.device)
        self.out = Path(cfg.out)
        self.resume_dir = resume_from(self.out, cfg.resume, log)  # before any model loads: nothing to resume = error
        self.components = build_components(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            clear_stale_saves(self.out, self.resume_dir is not None, log)
        self.setup_data()
        self.setup_student()

    # ---- set-up -------------------------------------------------------------------------------------------------
    def setup_data(self) -> None:
        """Read the checkpoint's metadata, resolve the input size, build the target dataset and the output metadata."""
        cfg = self.cfg
        self.loaded = load_segmenter(cfg.checkpoint, map_location=self.device)  # the source model, read once
        model, self.meta = self.loaded
        if model.in_channels != 3:
            raise ValueError(f"{cfg.checkpoint}: expected an RGB model, got {model.in_channels} input channels")
        self.K, self.ignore = self.meta.classes.num_classes, self.meta.classes.ignore_index
        self.size = resolve_size(cfg.size, cfg.keep_aspect, cfg.target, self.meta.input_size, model.arch,
                                 model.output_stride)
        crop = tuple(cfg.crop) if all(cfg.crop) else self.size
        d = cfg.depth
        self.depth_provider = make_depth_provider(d.provider, d.directory, d.right_dir, d.model_dir, d.focal_px,
                                                  d.baseline_m, d.file_kind, d.png_scale, str(self.device))
        if self.depth_provider is not None and not is_video(cfg.target):  # computed once, here; workers read a cache
            self.depth_provider = prepare_depth_cache(self.depth_provider, cfg.target, d.cache_dir, self.out, self.log)
        self.ds = target_dataset(cfg, self.size, train_transform(crop, self.size, tuple(cfg.scale), self.ignore),
                                 self.depth_provider)
        self.log(f"target: {len(self.ds)} frames from {cfg.target} at {self.size[0]}x{self.size[1]}; depth: "
                 f"{d.provider}; device: {self.device}; methods: {', '.join(self.names()) or 'none'}")
        info = {"command": "adapt", "config": to_dict(cfg), "source_checkpoint": str(cfg.checkpoint),
                "source_checkpoint_sha256": checkpoint_hash(cfg.checkpoint) if is_checkpoint(cfg.checkpoint) else ""}
        self.out_meta = CheckpointMeta(classes=self.meta.classes, mean=self.meta.mean, std=self.meta.std,
                                       input_size=self.size, info=info)

    def plain_frames(self, depth: bool = True):
        """The target frames resized to the run's size, no augmentation, in order."""
        return target_dataset(self.cfg, self.size, Resize(self.size), self.depth_provider if depth else None)

    def source_model(self):
        """The source model after AdaBN (AdaBN skipped with ``adabn`` off), built by the one function that builds it
        (:func:`~segadapt.adapt.adabn.adabn_source_model`)."""
        c, loaded, self.loaded = self.cfg, self.loaded, None
        return adabn_source_model(c.checkpoint, self.plain_frames(), self.device, c.adabn_alpha, c.adabn_layers,
                                  c.adabn, loaded=loaded)[0]

    def setup_student(self) -> None:
        """The student: from the checkpoint being resumed, or the source model after AdaBN. The anchor (a frozen
        copy of the latter) when a component or ``pseudo.anchor_weight`` reads it."""
        self.resume_state = None
        if self.resume_dir is not None:
            self.resume_state = load_training_state(self.resume_dir)
            if self.resume_state.get("format") != STATE_FORMAT:
                raise ValueError(f"{self.resume_dir}: its training state was written by an older segadapt (layout "
                                 f"{self.resume_state.get('format', 1)}, this one reads {STATE_FORMAT}); start a "
                                 "fresh run (--resume false)")
            distributed.check_world_size(self.resume_state, str(self.resume_dir))
            self.student, _ = load_checkpoint(self.resume_dir, map_location=self.device)
            self.log(f"resuming from {self.resume_dir} at step {self.resume_state['step']}")
        else:
            self.student = self.source_model()
            if self.cfg.adabn:
                self.log(f"AdaBN: BatchNorm statistics from {len(self.ds)} target frames (blend "
                         f"{self.cfg.adabn_alpha} with the source's)")
        self.anchor = None
        if any(c.needs_anchor for c in self.components) or self.cfg.pseudo.anchor_weight > 0:
            import copy

            self.anchor = copy.deepcopy(self.student).eval().requires_grad_(False)  # restored on resume

    def step0_model(self):
        """The source model after AdaBN as this run started: the student before its first step, on resume the
        anchor (or, without one, rebuilt)."""
        if self.resume_state is None:
            return self.student
        return self.anchor if self.anchor is not None else self.source_model()

    def names(self) -> list:
        return [c.name for c in self.components]

    def finish_adabn_only(self) -> dict:
        """``self_training`` off: the AdaBN model is the adapted checkpoint."""
        save_checkpoint(self.out / "adapted", self.student, self.out_meta)
        summary = {"steps": 0, "adabn": self.cfg.adabn, "adabn_layers": self.cfg.adabn_layers,
                   "adabn_alpha": self.cfg.adabn_alpha, "adapted": str(self.out / "adapted"), "size": list(self.size)}
        write_json(self.out / "summary.json", summary)
        return summary

    def setup_training(self) -> None:
        """EMA teacher, components, optimiser and pseudo-label statistics (restored on resume), then the loader."""
        cfg, p = self.cfg, self.cfg.pseudo
        self.teacher = EMATeacher(self.student, cfg.teacher.alpha)
        fresh = self.resume_state is None
        run = RunContext(cfg=cfg, device=self.device, out=self.out, classes=self.meta.classes, num_classes=self.K,
                         ignore_index=self.ignore, mean=self.meta.mean, std=self.meta.std, size=self.size,
                         student=lambda: self.student, teacher=self.teacher, source_model=self.step0_model,
                         frames=lambda: self.plain_frames(depth=False), dataset=self.ds, fresh=fresh, log=self.log)
        for c in self.components:
            c.setup(run)
        self.student.train()  # after the components' set-up, which may run the student as it is at step 0
        freeze_batchnorm(self.student)
        self.lr = cfg.learning_rate()
        groups = self.student.param_groups(self.lr, cfg.weight_decay, cfg.head_lr_mult)
        self.opt = torch.optim.AdamW(groups + [g for c in self.components for g in c.param_groups()],
                                     betas=(0.9, 0.999))
        self.tracker = ThresholdTracker(self.K, p.fraction, p.threshold, p.floor)
        self.class_weights = None
        if p.class_weight_power > 0:
            self.class_weights = ClassFrequencyWeights(self.K, p.class_weight_power, max_weight=p.class_weight_max)
        self.start, self.elapsed_before = 0, 0.0
        if not fresh:
            restore_state(self, self.resume_state)
        distributed.rank_rng(cfg.seed, self.resume_state, set_rng_state)  # data-parallel: a stream per rank
        for g in self.opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.setup_loader()
        # data-parallel: DDP around the student; the components' parameters are averaged in update()
        self.student = distributed.wrap(self.student, self.device)
        self.extra_params = distributed.unwrapped_params(self.opt, (self.student,))

    def setup_loader(self) -> None:
        """The target stream: batch k depends only on (seed, k), so a resumed run continues the data order exactly;
        data-parallel: rank r reads its share of each batch (of a video, its own range of frames)."""
        st = self.resume_state
        consumed = int(st.get("data", {}).get("consumed", self.start)) if st is not None else 0
        ds, rank, world, seed = self.ds, distributed.rank(), distributed.world_size(), self.cfg.seed
        if world > 1 and is_video(self.cfg.target):
            ds, rank, world, seed = distributed.shard_frames(ds), 0, 1, distributed.rank_seed(seed)
        self.loader = resumable_loader(ds, self.cfg.batch_size, seed, start=consumed, rank=rank, world_size=world,
                                       num_workers=self.cfg.num_workers, collate_fn=collate)
        if distributed.world_size() > 1:
            w = distributed.world_size()
            self.log(f"data-parallel: {w} processes, {self.cfg.batch_size} frames each, global batch "
                     f"{w * self.cfg.batch_size}")
        self.batches = iter(self.loader)

    # ---- one step -----------------------------------------------------------------------------------------------
    def train_step(self, batch: dict, index: int) -> Step:
        """Steps 1-5 of the module docstring on one batch of (B, 3, H, W) uint8 target frames."""
        img = batch["image"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device) if "valid" in batch and self.cfg.mask_padding else None
        s = Step(index=index, steps=self.cfg.steps, num_classes=self.K, ignore_index=self.ignore, batch=batch,
                 image=img, valid=valid)
        for c in self.components:
            c.start_step(s)
        s.view = self.teacher_view(s)
        for c in self.components:
            c.teacher_view(s)
        s.labels = self.pseudo_labels(s)
        terms: Dict[str, torch.Tensor] = {}
        for c in self.components:
            r, t = c.reliability(s)
            terms.update(t)
            if r is not None:
                s.reliability = r if s.reliability is None else s.reliability * r
        s.strong = next((v for v in (c.strong_view(s) for c in self.components) if v is not None), None)
        if s.strong is None:
            s.strong = self.class_mix_view(s)
        terms = {"pl": self.pseudo_label_loss(s), **terms}
        for c in self.components:
            terms.update(c.loss(s))
        if self.cfg.grad_share_every and (index % self.cfg.grad_share_every == 0 or index == self.cfg.steps - 1):
            s.logs["grad_share"] = gradient_shares(terms, self.student, s, self.ignore)
        self.update(sum(terms.values()), index)
        s.logs.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
        return s

    def teacher_view(self, s: Step) -> TeacherView:
        """1. The EMA teacher (flip-averaged with ``teacher.flip``) and the anchor on the weak view."""
        hw = tuple(s.image.shape[-2:])
        x = normalize(s.image, self.meta.mean, self.meta.std)
        with torch.no_grad(), autocast(self.device, self.cfg.amp):
            logits, feats = self.teacher.forward_features(x)
            probs = F.softmax(upsample_logits(logits.float(), hw), 1)
            if self.cfg.teacher.flip:  # the mean with the mirrored view's softmax, flipped back
                probs = 0.5 * (probs + F.softmax(upsample_logits(self.teacher(x.flip(-1)).float(), hw), 1).flip(-1))
            la = pa = None
            if self.anchor is not None:
                la = self.anchor(x).float()
                pa = F.softmax(upsample_logits(la, hw), 1)
        return TeacherView(image=s.image, x=x, logits=logits, features=feats, probs=probs, anchor_logits=la,
                           anchor_probs=pa, valid=s.valid)

    def pseudo_labels(self, s: Step) -> PseudoLabels:
        """2. Thresholds (class-balanced by default) on the teacher's probabilities (as the components and
        ``pseudo.anchor_weight`` change them), the components' refinements, then the class-frequency weights."""
        p, v = self.cfg.pseudo, s.view
        probs = v.probs
        for c in self.components:
            probs = c.label_probs(s, probs)
        if v.anchor_probs is not None and p.anchor_weight > 0:
            probs = (1 - p.anchor_weight) * probs + p.anchor_weight * v.anchor_probs
        self.tracker.fraction = kept_fraction(s.index, p.fraction, p.fraction_start, p.fraction_ramp_steps)
        th = self.tracker.update(probs, v.valid) if p.class_balanced else p.threshold
        labels, mask, _ = pseudo_label(probs, th, self.ignore, p.rule, v.valid)
        pl = PseudoLabels(labels, mask, mask.float(), th, v.valid)
        for c in self.components:
            pl = c.refine(s, pl)
        if self.class_weights is not None:  # on the labels the student trains on, after every refinement
            self.class_weights.update(pl.labels, self.ignore)
            pl.weights = pl.weights * self.class_weights.pixel_weights(pl.labels, self.ignore)
        return pl

    def class_mix_view(self, s: Step) -> StrongView:
        """3. Target-to-target ClassMix (labels, weights and r mixed alike) + colour jitter and blur."""
        pl, r = s.labels, s.reliability
        x01, m = s.image.float() / 255.0, None
        labels, weights = pl.labels, pl.weights
        if self.cfg.class_mix and s.image.shape[0] > 1:
            m = class_mix_masks(pl.labels, self.ignore)
            x01, labels, weights = mix(x01, m), mix(labels, m), mix(weights, m)
            r = mix(r, m) if r is not None else None
        x = normalize_float(photometric(x01, self.cfg.strong), self.meta.mean, self.meta.std)
        return StrongView(x, labels, weights, r, m)

    def pseudo_label_loss(self, s: Step) -> torch.Tensor:
        """4. The student on the strong view; pixel-weighted CE on its labels, or the rectification-aware mixture
        loss with r (:func:`~segadapt.adapt.losses.mixture_loss`)."""
        v = s.strong
        with autocast(self.device, self.cfg.amp):
            s.student_logits, s.student_features = self.student.forward_features(v.x)
        logits = upsample_logits(s.student_logits.float(), tuple(v.x.shape[-2:]))
        if v.reliability is not None:
            return mixture_loss(logits, v.labels, v.reliability, v.weights, self.ignore)
        return weighted_ce(logits, v.labels, v.weights, self.ignore)

    def update(self, loss: torch.Tensor, index: int) -> None:
        """5. Optimiser step, the teacher's EMA update, then the components' (momentum heads, prototypes)."""
        nan_check(loss, index)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.extra_params)  # data-parallel: what DDP does not hold
        self.opt.step()
        self.teacher.update(distributed.unwrap(self.student))
        for c in self.components:
            c.after_update()

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the start (or resumed) step to ``cfg.steps``, the time budget or the monitor's stop rule."""
        cfg = self.cfg
        self.monitor = LabelFreeMonitor(self.K, self.ignore, cfg.monitor)
        self.logger = StepLogger(self, resumed=self.resume_state is not None)
        self.t0 = time.time()
        self.bar = tqdm(total=cfg.steps, initial=self.start, desc="adapt", unit="step", dynamic_ncols=True,
                        **distributed.bar_kwargs())
        step, stopped, last_logs = self.start, None, {}
        try:
            while step < cfg.steps:
                s = self.train_step(next(self.batches), step)
                step += 1
                last_logs = s.logs
                stopped = self.after_step(step, s)
                if stopped:
                    break
        finally:
            self.bar.close()
            self.logger.close()
        world = distributed.world_size()
        summary = {"steps": step, "seconds": self.elapsed(), "adapted": str(self.out / "adapted"), "keep": cfg.keep,
                   "methods": self.names(), "lr": self.lr, "last_losses": last_logs, "device": str(self.device),
                   "size": list(self.size), "processes": world, "global_batch": world * cfg.batch_size,
                   "monitor": self.monitor.summary(), "stopped_early": stopped if stopped != "time" else None}
        summary["monitor_plot"] = str(self.out / "monitor.png") if (self.out / "monitor.png").is_file() else None
        if distributed.is_main():
            write_json(self.out / "summary.json", summary)
        return summary

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def after_step(self, step: int, s: Step) -> Optional[str]:
        """Progress, the log (:class:`~segadapt.adapt.training.run_log.StepLogger`), checkpoints; returns why the run
        stops here (the monitor's rule with ``monitor.stop``, or ``"time"`` for the budget), else None."""
        cfg = self.cfg
        self.bar.update(1)
        stop = self.logger.log(step, s)
        elapsed = self.elapsed()
        if cfg.max_minutes > 0:  # data-parallel: rank 0's clock, so that every rank stops at the same step
            elapsed = distributed.broadcast_float(elapsed)
        out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time or stop:
            save_state(self, step, elapsed)
            self.logger.plot()
        if stop:
            self.log(f"{stop}: stopping at step {step} (--monitor.stop)")
            return stop
        if out_of_time:
            self.log(f"time budget of {cfg.max_minutes} min reached at step {step}; stopping")
            return "time"
        return None
