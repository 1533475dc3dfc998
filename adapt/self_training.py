"""Source-free adaptation (``segadapt adapt``): one readable loop.

Inputs are a source checkpoint and unlabelled target footage, nothing else: the target dataset types
(:class:`~segadapt.adapt.data.datasets.ImageFolder`, :class:`~segadapt.adapt.data.footage.VideoFootage`) have no
label field, and with ``source_data`` empty (the default) nothing reads source data. With ``--source-data`` (the
UDA mode, :mod:`segadapt.adapt.uda`) each step adds the source cross-entropy and the strong view becomes DACS's
source->target ClassMix.

Per step (methods.md 0.2 source-free recipe + CrossMatch 1.3 + IR2F 5.3, the [RECON] parts configurable):

1. weak view (resize, random scale/crop, flip; depth follows) -> EMA teacher(s) -> probabilities;
2. pseudo-labels: class-balanced confidence thresholds and CBST's class-normalised rule (``pseudo.rule``); with
   depth, dual-head fusion of the RGB and RGB-D teachers (average softmax, keep agreeing pixels); crop padding
   (``batch["valid"]`` False) is never labelled and never counted in the statistics;
3. strong view: target-to-target ClassMix + colour jitter + blur (image only);
4. student loss: pixel-weighted CE on the pseudo-labels, or the rectification-aware mixture loss with the per-pixel
   rectification value r (by default the teacher-anchor confidence prior; ``rectifier.inr`` adds IR2F's learned
   correction); with depth, the RGB-D student learns the fused labels too, and each stream is trained
   toward the other stream's weak-view pseudo-label (cross-modal consistency);
5. rectifier loss (only with ``rectifier.inr``): BCE toward what is observable on the target: by default the
   agreement of the teacher's label with the *anchor* (a frozen copy of the source model after AdaBN, whose
   probabilities also enter the rectifier), optionally flip/photometric stability, the consensus of views the
   rectifier never sees (``rectifier.view_consensus``, issue #12), and with depth the RGB/RGB-D agreement;
6. optimiser step, EMA update of the teacher(s).

BatchNorm statistics are re-estimated on the target first (AdaBN) and then frozen in the student.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from segadapt.adapt import distributed
from segadapt.adapt.adabn import adapt_batchnorm, freeze_batchnorm
from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import class_mix_masks, mix, normalize, normalize_float, photometric
from segadapt.adapt.components import StepContext, apply_votes, build_components, component_losses, source_batches
from segadapt.adapt.config import AdaptConfig, to_dict
from segadapt.adapt.data.datasets import ImageFolder, collate, is_video
from segadapt.adapt.data.footage import VideoFootage, is_video_folder
from segadapt.adapt.data.depth import make_depth_provider
from segadapt.adapt.data.transforms import Resize, train_transform
from segadapt.adapt.debug import save_debug_grid
from segadapt.adapt.depth_stream import (depth_input, depth_valid_mask, depth_weight_norm, extra_channels,
                                         fusion_removed, prepare_depth_cache, split_depth_group, stream_agreement)
from segadapt.adapt.models.aux_stream import make_auxiliary_stream
from segadapt.adapt.data.sampling import data_state, resumable_loader
from segadapt.adapt.models.checkpoint import (CheckpointMeta, checkpoint_hash, is_checkpoint, load_checkpoint,
                                     load_segmenter, load_training_state, save_checkpoint)
from segadapt.adapt.models.rectifier import ImplicitRectifier, confidence_prior, mixture_loss, weighted_ce
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.monitor import LabelFreeMonitor, write_monitor_plot
from segadapt.adapt.rectifier_signals import (agreement_target, masked_bce, rectifier_feature_channels,
                                              rectifier_input, view_consensus_probs)
from segadapt.adapt.pseudo_label import (ClassFrequencyWeights, ThresholdTracker, coverage_per_class, fuse_dual_head,
                                kept_fraction, kept_share, pseudo_label)
from segadapt.adapt.resume import resume_from
from segadapt.adapt.teacher import EMATeacher
from segadapt.adapt.train_utils import autocast, nan_check, pick_device, rng_state, seed_everything, set_rng_state
from segadapt.runtime.files import write_atomic


def target_dataset(cfg: AdaptConfig, size, transform, depth_provider, rank: int = 0, world_size: int = 1):
    """The unlabelled target dataset: an image folder, or the frames of a video file or a folder of videos
    (:class:`~segadapt.adapt.data.footage.VideoFootage`: ``video_stride``, a ``video_max_frames`` budget per video,
    decoded on demand at ``size``). ``rank``/``world_size`` give a data-parallel rank its disjoint share of a
    video target's frames (an image folder is not sharded here).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable target (the message names it).
    """
    if not cfg.target:
        raise ValueError("--target is required (an image folder or a video file)")
    if is_video(cfg.target) or is_video_folder(cfg.target):
        if depth_provider is not None:
            raise ValueError("depth providers need image files; extract the video's frames first")
        return VideoFootage(cfg.target, cfg.video_stride, cfg.video_max_frames, size=size, transform=transform,
                            skip_duplicates=cfg.video_skip_duplicates, cache_dir=cfg.video_cache or None,
                            rank=rank, world_size=world_size)
    return ImageFolder(cfg.target, transform=transform, depth_provider=depth_provider)


def adapt(cfg: AdaptConfig, log: Callable[[str], None] = print) -> dict:
    """Run source-free adaptation as configured; returns a summary dict.

    Writes ``<out>/adapted`` (the adapted checkpoint), ``<out>/last`` (+ training state for ``--resume``),
    ``<out>/coverage.jsonl`` (pseudo-label coverage per class and the label-free monitor's signals,
    :mod:`segadapt.adapt.monitor`), ``<out>/monitor.png`` (their plot), ``<out>/debug/*.png`` and
    ``<out>/summary.json`` (with ``stopped_early``: the stopping rule's reason when ``--monitor.stop`` ended the run).

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, target or depth settings.
    """
    if cfg.rectifier.prior not in RECTIFIER_PRIORS:
        raise ValueError(f"rectifier.prior must be one of {RECTIFIER_PRIORS}, got {cfg.rectifier.prior!r}")
    if cfg.rectifier.enabled and not cfg.rectifier.inr and cfg.rectifier.prior == "none":
        raise ValueError("--rectifier.inr false needs --rectifier.prior teacher or teacher_anchor")
    seed_everything(cfg.seed)
    with distributed.session(cfg.device):  # under torchrun: data-parallel (adapt/distributed.py); else a no-op
        run = _AdaptRun(cfg, distributed.main_only(log))
        if not cfg.self_training:
            return run.finish_adabn_only() if distributed.is_main() else {"steps": 0}
        run.seco_pass()
        run.setup_training()
        return run.run()


def _rgbd(x_norm: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised image and (B, E, H, W) depth (+ validity, :func:`~segadapt.adapt.depth_stream.
    depth_input`) -> (B, 3 + E, H, W) input of the RGB-D stream."""
    return torch.cat([x_norm, d], 1)


@dataclass
class _TeacherView:
    """The teacher(s) on the weak view (no gradients). Probabilities are (B, K, H, W) float32 at the input size."""

    logits: torch.Tensor  # (B, K, h, w) EMA teacher logits at the decoder's resolution
    features: torch.Tensor  # (B, D, h', w') EMA teacher features (the rectifier's input, rectifier.features)
    probs: torch.Tensor  # EMA teacher
    aux_probs: torch.Tensor | None  # EMA RGB-D teacher (depth runs)
    anchor_logits: torch.Tensor | None  # (B, K, h, w) frozen AdaBN anchor (when the config uses it)
    anchor_probs: torch.Tensor | None
    flip_probs: torch.Tensor | None  # teacher on the flipped view, flipped back (rectifier.flip_consistency)
    photo_probs: torch.Tensor | None  # teacher on a photometric view (rectifier.photometric_consistency)
    view_probs: torch.Tensor | None  # teacher's mean over views the rectifier never sees (rectifier.view_consensus)
    valid: torch.Tensor | None = None  # (B, H, W) bool, False on crop padding (batch["valid"]); None = all real


@dataclass
class _PseudoLabels:
    """Pseudo-labels of one batch: (B, H, W) int64 labels (``ignore`` where dropped), bool mask of kept pixels,
    float32 per-pixel loss weights, and the confidence threshold(s) used (a (K,) tensor or a float)."""

    labels: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    threshold: torch.Tensor | float
    valid: torch.Tensor | None = None  # (B, H, W) bool, False on crop padding (never labelled, never counted)
    stats: dict | None = None  # per-step diagnostics for the log (depth runs: fusion_removed)


@dataclass
class _StrongView:
    """The strong (ClassMix + photometric) view and its targets, mixed with the same (B, H, W) masks ``mix_masks``
    (None when ClassMix is off or the batch holds one image)."""

    x: torch.Tensor  # (B, 3, H, W) normalised float32 image
    labels: torch.Tensor
    weights: torch.Tensor
    reliability: torch.Tensor | None  # (B, H, W) rectification r, when the rectifier is on
    depth: torch.Tensor | None  # (B, 1, H, W), depth runs
    mix_masks: torch.Tensor | None


@dataclass
class _StepResult:
    """What one step leaves for logging, the coverage log and the debug grid."""

    loss: torch.Tensor
    logs: dict
    pl: _PseudoLabels
    image: torch.Tensor  # (B, 3, H, W) uint8 weak view
    reliability: torch.Tensor | None
    depth: torch.Tensor | None
    view: Optional[_TeacherView] = None  # the weak view's teacher output (the label-free monitor reads it)


class _AdaptRun:
    """One ``segadapt adapt`` run: the data, the models (student, EMA teacher, optional RGB-D stream, rectifier and
    frozen anchor), the optimiser, the pseudo-label statistics and the loop that trains them (module docstring)."""

    def __init__(self, cfg: AdaptConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.device = pick_device(cfg.device)
        self.out = Path(cfg.out)
        self.resume_dir = resume_from(self.out, cfg.resume, log)  # before any model loads: nothing to resume = error
        self.out.mkdir(parents=True, exist_ok=True)
        self.setup_data()
        self.setup_student()

    # ---- setup ------------------------------------------------------------------------------------------------
    def setup_data(self) -> None:
        """Load the source model and build the target dataset and the output metadata."""
        cfg = self.cfg
        self.src_model, self.meta = load_segmenter(cfg.checkpoint, map_location=self.device)
        if self.src_model.in_channels != 3:
            raise ValueError(f"{cfg.checkpoint}: expected an RGB model")
        self.classes = self.meta.classes
        self.K, self.ignore = self.classes.num_classes, self.classes.ignore_index
        self.size = size = resolve_size(cfg.size, cfg.keep_aspect, cfg.target, self.meta.input_size,
                                        self.src_model.arch, self.src_model.output_stride)
        crop = tuple(cfg.crop) if all(cfg.crop) else size
        self.depth_provider = make_depth_provider(cfg.depth.provider, cfg.depth.directory, cfg.depth.right_dir,
                                                  cfg.depth.model_dir, cfg.depth.focal_px, cfg.depth.baseline_m,
                                                  cfg.depth.file_kind, cfg.depth.png_scale, str(self.device))
        self.use_depth = self.depth_provider is not None
        if self.use_depth and not is_video(cfg.target):  # depth computed once, here; workers read the cache
            self.depth_provider = prepare_depth_cache(self.depth_provider, cfg.target, cfg.depth.cache_dir, self.out,
                                                      self.log)
        transform = train_transform(crop, size, tuple(cfg.scale), self.ignore)
        self.ds = target_dataset(cfg, size, transform, self.depth_provider)
        self.uda = None  # UDA mode (--source-data, adapt/uda.py): the labelled source side, checked here
        if cfg.source_data:
            from segadapt.adapt.uda import UDASource

            self.uda = UDASource(cfg, self.classes, size, crop, self.meta.mean, self.meta.std, self.device)
            self.log(f"UDA mode: {len(self.uda.ds)} labelled source frames from {cfg.source_data}")
        self.log(f"target: {len(self.ds)} frames from {cfg.target} at {size[0]}x{size[1]}; depth: "
                 f"{cfg.depth.provider}; device: {self.device}")
        info = {"command": "adapt", "config": to_dict(cfg), "source_checkpoint": str(cfg.checkpoint),
                "source_checkpoint_sha256": checkpoint_hash(cfg.checkpoint) if is_checkpoint(cfg.checkpoint) else ""}
        self.out_meta = CheckpointMeta(classes=self.classes, mean=self.meta.mean, std=self.meta.std,
                                       input_size=size, info=info)

    def setup_student(self) -> None:
        """The student: from the checkpoint being resumed, or the source model after AdaBN (deterministic, no
        augmentation: resized frames in order)."""
        cfg, size = self.cfg, self.size
        self.resume_state = None
        if self.resume_dir is not None:
            self.resume_state = load_training_state(self.resume_dir)
            distributed.check_world_size(self.resume_state, str(self.resume_dir))
            self.student, _ = load_checkpoint(self.resume_dir, map_location=self.device)
            self.log(f"resuming from {self.resume_dir} at step {self.resume_state['step']}")
            return
        self.student = self.src_model
        if cfg.adabn:
            plain = target_dataset(cfg, size, Resize(size), self.depth_provider)
            loader = DataLoader(distributed.shard_batches(plain, 8), batch_size=8, shuffle=False, collate_fn=collate,
                                num_workers=0)  # data-parallel: each rank its share of the batches
            n = adapt_batchnorm(self.student, loader, self.meta.mean, self.meta.std, self.device,
                                layers=cfg.adabn_layers, alpha=cfg.adabn_alpha)
            distributed.pool_batchnorm(self.student)  # data-parallel: the statistics of every rank's frames
            self.log(f"AdaBN: re-estimated {n} BatchNorm layers on {len(plain)} target frames")

    def finish_adabn_only(self) -> dict:
        """``self_training`` off: the AdaBN model is the adapted checkpoint."""
        save_checkpoint(self.out / "adapted", self.student, self.out_meta)
        summary = {"steps": 0, "adabn": self.cfg.adabn, "adabn_layers": self.cfg.adabn_layers,
                   "adabn_alpha": self.cfg.adabn_alpha,
                   "adapted": str(self.out / "adapted"), "size": list(self.size)}
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=1).encode())
        return summary

    # ---- SeCo (methods.md 3): offline fixed pseudo-labels, segadapt.adapt.seco -------------------------------------
    def seco_pass(self) -> None:
        """With ``seco.enabled``: SeCo's pseudo-label pass with the source model after AdaBN (the student at step 0)
        on the frames at the training size, written to ``<out>/seco_labels/`` (reused when its inputs are unchanged),
        then attached to the training frames as ``fixed_pseudo_label``. The global RNG state is kept as it was, so
        a run that reuses the labels trains exactly like the run that made them.

        Raises:
            ValueError: the class file has no ``stuff`` flags and a class name without a built-in one.
        """
        cfg = self.cfg
        if not cfg.seco.enabled:
            return
        from segadapt.adapt.seco import LABEL_DIR, FixedLabels, run_seco

        stuff = self.classes.stuff_flags()
        plain = target_dataset(cfg, self.size, Resize(self.size), None)
        fp = {"source": self.out_meta.info.get("source_checkpoint_sha256") or str(cfg.checkpoint),
              "size": list(self.size), "adabn": cfg.adabn, "frames": len(plain),
              "names": [f.name for f in getattr(plain, "files", [])]}
        if cfg.adabn and cfg.adabn_layers < 1:  # only then: labels of earlier runs stay reusable
            fp["adabn_layers"] = cfg.adabn_layers
        if cfg.adabn and cfg.adabn_alpha < 1:
            fp["adabn_alpha"] = cfg.adabn_alpha
        rng = rng_state()
        if distributed.is_main():  # data-parallel: one rank writes the labels, every rank reads them
            run_seco(self._seco_model, plain, self.out, cfg.seco, stuff, self.ignore, self.meta.mean, self.meta.std,
                     self.device, fp, cfg.seed, self.log)
        distributed.barrier()
        set_rng_state(rng)
        self.ds.transform = FixedLabels(self.out / LABEL_DIR, self.ds.transform)

    def _seco_model(self):
        """The model SeCo labels with: the student before any step, or on resume the source model with AdaBN
        redone as :meth:`setup_student` does it."""
        if self.resume_state is None:
            return self.student
        model, _ = load_segmenter(self.cfg.checkpoint, map_location=self.device)
        if self.cfg.adabn:
            plain = target_dataset(self.cfg, self.size, Resize(self.size), self.depth_provider)
            adapt_batchnorm(model, DataLoader(plain, batch_size=8, collate_fn=collate), self.meta.mean,
                            self.meta.std, self.device, layers=self.cfg.adabn_layers,
                            alpha=self.cfg.adabn_alpha)
        return model

    def merge_fixed_labels(self, pl: _PseudoLabels, batch: dict) -> _PseudoLabels:
        """SeCo's fixed labels (``batch["fixed_pseudo_label"]``, (B, H, W) int64) joined to the online pseudo-labels
        by ``seco.merge`` (:func:`segadapt.adapt.seco.merge_fixed`); ``pl`` unchanged when the batch has none."""
        if "fixed_pseudo_label" not in batch:
            return pl
        from segadapt.adapt.seco import merge_fixed

        fixed = batch["fixed_pseudo_label"].to(self.device)
        pl.labels, pl.mask, pl.weights = merge_fixed(pl.labels, pl.mask, pl.weights, fixed, self.cfg.seco.merge,
                                                     self.cfg.seco.fill_weight, self.ignore)
        return pl

    def setup_training(self) -> None:
        """Models, optimiser and pseudo-label statistics, restored from the training state on resume, then the
        data loader."""
        self.setup_models()
        self.setup_optimiser()
        self.start, self.elapsed_before = 0, 0.0
        if self.resume_state is not None:
            self.restore(self.resume_state)
        distributed.rank_rng(self.cfg.seed, self.resume_state, set_rng_state)  # data-parallel: a stream per rank
        for g in self.opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        # batch k of the run depends only on (seed, k): a resumed run continues the data order exactly
        st = self.resume_state
        consumed = int(st.get("data", {}).get("consumed", self.start)) if st is not None else 0
        # data-parallel: rank r reads its share of each batch; of a video, its own range of frames
        ds, rank, world, seed = self.ds, distributed.rank(), distributed.world_size(), self.cfg.seed
        if world > 1 and is_video(self.cfg.target):
            ds, rank, world, seed = distributed.shard_frames(ds), 0, 1, distributed.rank_seed(seed)
        self.loader = resumable_loader(ds, self.cfg.batch_size, seed, start=consumed, rank=rank, world_size=world,
                                       num_workers=self.cfg.num_workers, collate_fn=collate)
        self.batches = iter(self.loader)
        if self.uda is not None:  # one source batch per step: the steps done resume the source stream exactly
            self.uda.start(self.start, distributed.rank(), distributed.world_size())
        # data-parallel: DDP around what trains (rank 0's weights everywhere; gradients averaged in backward), the
        # other trained parameters (loss components) averaged in update(); no-ops without torchrun
        self.student = distributed.wrap(self.student, self.device)
        self.aux = distributed.wrap(self.aux, self.device)
        self.rect = distributed.wrap(self.rect, self.device)
        self.extra_params = distributed.unwrapped_params(self.opt, (self.student, self.aux, self.rect))

    def setup_models(self) -> None:
        """Student (BatchNorm frozen), EMA teacher, optional RGB-D stream and its teacher, rectifier, anchor."""
        cfg, student = self.cfg, self.student
        student.train()
        freeze_batchnorm(student)
        self.teacher = EMATeacher(student, cfg.teacher.alpha)
        self.aux = self.aux_teacher = None
        if self.use_depth:
            self.aux = make_auxiliary_stream(student, extra_channels(cfg.depth.validity_channel)).to(self.device)
            self.aux.train()
            freeze_batchnorm(self.aux)
            self.aux_teacher = EMATeacher(self.aux, cfg.teacher.alpha)
        self.rect = self.anchor = None
        if cfg.rectifier.enabled and cfg.rectifier.inr:
            self.rect = make_rectifier(cfg, rectifier_feature_channels(student, cfg.rectifier), self.K).to(self.device)
        if uses_anchor(cfg):
            # the anchor: a frozen copy of the model as it is after AdaBN (restored from the training state on resume)
            self.anchor = copy.deepcopy(student).eval()
            self.anchor.requires_grad_(False)

        def frames(n: int):  # BiDA's source side: the teacher (= the source model after AdaBN) on n resized frames
            plain = target_dataset(cfg, self.size, Resize(self.size), None)
            return source_batches(plain, self.meta.mean, self.meta.std, self.device, n)

        # optional loss components (RCCR, BiDA; adapt/components.py): none by default
        self.components = build_components(cfg, self.teacher.model, self.K, self.device, frames,
                                           fresh=self.resume_state is None)

    def setup_optimiser(self) -> None:
        """AdamW over the student, the RGB-D stream and the rectifier; the class-balanced threshold trackers and
        the class-frequency loss weights."""
        cfg, K, p = self.cfg, self.K, self.cfg.pseudo
        groups = self.student.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
        if self.aux is not None:
            groups += split_depth_group(self.aux.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), self.aux,
                                        cfg.depth.input_lr)
        if self.rect is not None:
            groups.append({"params": list(self.rect.parameters()), "lr": cfg.rectifier.lr, "weight_decay": 0.0})
        for c in self.components:  # projection heads: the head's learning rate (RCCR code: the 10x group)
            groups.append({"params": c.parameters(), "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": cfg.weight_decay})
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.tracker = ThresholdTracker(K, p.fraction, p.threshold, p.floor)
        self.class_weights = None
        if p.class_weight_power > 0:
            self.class_weights = ClassFrequencyWeights(K, p.class_weight_power, max_weight=p.class_weight_max)
        self.tracker_aux = ThresholdTracker(K, p.fraction, p.threshold, p.floor)

    def restore(self, state: dict) -> None:
        """Everything :meth:`save` wrote into the training state, the RNG states last."""
        if self.anchor is not None:
            self.anchor.load_state_dict(state["anchor"])
        self.teacher.model.load_state_dict(state["teacher"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
            self.aux_teacher.model.load_state_dict(state["aux_teacher"])
        if self.rect is not None:
            self.rect.load_state_dict(state["rectifier"])
        self.opt.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        if self.class_weights is not None and "class_weights" in state:
            self.class_weights.load_state_dict(state["class_weights"])
        self.tracker_aux.load_state_dict(state["tracker_aux"])
        for c in self.components:
            c.load_state_dict(state["components"][c.name])
        self.start, self.elapsed_before = int(state["step"]), float(state["elapsed"])
        set_rng_state(state["rng"])

    def save(self, step: int, elapsed: float) -> None:
        """``<out>/last`` with everything the next step depends on (exact resume, issue #18) and ``<out>/adapted``;
        data-parallel: every rank's RNG state, written by rank 0 only."""
        rng_ranks = distributed.gather_object(rng_state())  # None without torchrun
        if not distributed.is_main():
            return
        student, aux, rect = (distributed.unwrap(m) for m in (self.student, self.aux, self.rect))
        ts = {"teacher": self.teacher.model.state_dict(), "optimizer": self.opt.state_dict(), "step": step,
              "elapsed": elapsed, "rng": rng_state(), "data": data_state(self.loader, step),
              "tracker": self.tracker.state_dict(), "tracker_aux": self.tracker_aux.state_dict()}
        if rng_ranks is not None:
            ts["rng_ranks"], ts["world_size"] = rng_ranks, len(rng_ranks)
        if aux is not None:
            ts["aux"], ts["aux_teacher"] = aux.state_dict(), self.aux_teacher.model.state_dict()
        if rect is not None:
            ts["rectifier"] = rect.state_dict()
        if self.anchor is not None:
            ts["anchor"] = self.anchor.state_dict()
        if self.class_weights is not None:
            ts["class_weights"] = self.class_weights.state_dict()
        if self.components:
            ts["components"] = {c.name: c.state_dict() for c in self.components}
        self.out_meta.info.update(step=step)
        keep = self.teacher.model if self.cfg.keep == "teacher" else student
        if self.cfg.keep_saves:  # before last/: a kill after last/ cannot lose this step's copy
            save_checkpoint(self.out / "saves" / f"step_{step:06d}", keep, self.out_meta)
        save_checkpoint(self.out / "last", student, self.out_meta, ts)
        save_checkpoint(self.out / "adapted", keep, self.out_meta)

    # ---- one step ---------------------------------------------------------------------------------------------
    def train_step(self, batch: dict, step: int) -> _StepResult:
        """Steps 1-6 of the module docstring on one batch of (B, 3, H, W) uint8 target frames."""
        img = batch["image"].to(self.device, non_blocking=True)
        depth = depth_input(batch, self.cfg.depth.validity_channel).to(self.device) if self.use_depth else None
        hw = tuple(img.shape[-2:])
        if self.uda is not None:  # UDA mode: the step's labelled source batch and its DACS masks
            self.uda.next()
        t = self.teacher_view(img, depth)
        if "valid" in batch and self.cfg.mask_padding:
            t.valid = batch["valid"].to(self.device)  # crop padding: never labelled
        p = self.cfg.pseudo
        self.tracker.fraction = self.tracker_aux.fraction = kept_fraction(step, p.fraction, p.fraction_start,
                                                                          p.fraction_ramp_steps)
        pl = self.pseudo_labels(t)
        pl = self.merge_fixed_labels(pl, batch)
        ctx, pl = self.component_vote(t, pl, step, img)
        loss_rect, r_full = self.rectifier_loss(t, hw)
        use_r = r_full is not None and step >= self.cfg.rectifier.warmup_steps
        sv = self.strong_view(img, pl, r_full, depth)
        loss_src = self.uda.loss(self.student.forward_features, ctx) if self.uda is not None else None
        loss, logs = self.student_loss(sv, pl, t, loss_rect, use_r, hw, ctx)
        if loss_src is not None:  # UDA mode: the source cross-entropy (adapt/uda.py)
            loss, logs = loss + self.cfg.source_weight * loss_src, {**logs, "loss_src": float(loss_src.detach())}
        if self.use_depth:  # how far the two streams differ, and what the dual-head fusion drops (issue #12)
            logs.update(pl.stats or {})
            logs["stream_agreement"] = stream_agreement(t.probs, t.aux_probs, depth_valid_mask(depth))
        self.update(loss, step)
        return _StepResult(loss, logs, pl, img, r_full, depth, view=t)

    def teacher_view(self, img: torch.Tensor, depth: torch.Tensor | None) -> _TeacherView:
        """1. The EMA teacher(s) and the anchor on the weak view; the teacher on the mirrored view when
        ``teacher.flip`` averages it in (probs is then the mean of both) or the rectifier's target uses it, and on the
        photometric views when the rectifier's target uses them."""
        cfg, hw, rect = self.cfg, tuple(img.shape[-2:]), self.rect
        x_w = normalize(img, self.meta.mean, self.meta.std)
        with torch.no_grad(), autocast(self.device, cfg.amp):
            self.teacher.model.eval()
            if rect is not None:  # the rectifier's features as configured (decoder, or stride-4/8 + decoder)
                lt, ft = rectifier_input(self.teacher.model, x_w, cfg.rectifier)
            else:
                lt, ft = self.teacher.forward_features(x_w)
            pt = F.softmax(upsample_logits(lt.float(), hw), 1)
            pa = None
            if self.use_depth:
                pa = F.softmax(upsample_logits(self.aux_teacher(_rgbd(x_w, depth)).float(), hw), 1)
            pt_flip = pt_photo = pn = ln = None
            if self.anchor is not None:
                ln = self.anchor(x_w).float()
                pn = F.softmax(upsample_logits(ln, hw), 1)
            if cfg.teacher.flip or (rect is not None and cfg.rectifier.flip_consistency):
                pt_flip = F.softmax(upsample_logits(self.teacher(x_w.flip(-1)).float(), hw), 1).flip(-1)
            if cfg.teacher.flip:  # flip-averaged pseudo-labeller (TeacherConfig.flip)
                pt = 0.5 * (pt + pt_flip)
            if rect is None or not cfg.rectifier.flip_consistency:
                pt_flip = None
            if rect is not None and cfg.rectifier.photometric_consistency:
                x_p = normalize_float(photometric(img.float() / 255.0, cfg.strong), self.meta.mean, self.meta.std)
                pt_photo = F.softmax(upsample_logits(self.teacher(x_p).float(), hw), 1)
            pv = None
            if rect is not None and cfg.rectifier.view_consensus:
                pv = view_consensus_probs(self.teacher.model, img, self.meta.mean, self.meta.std, cfg.rectifier,
                                          cfg.strong)
        return _TeacherView(logits=lt, features=ft, probs=pt, aux_probs=pa, anchor_logits=ln, anchor_probs=pn,
                            flip_probs=pt_flip, photo_probs=pt_photo, view_probs=pv)

    def pseudo_labels(self, t: _TeacherView) -> _PseudoLabels:
        """2. Class-balanced confidence thresholds on the teacher's probabilities (fused with the RGB-D teacher's,
        agreeing pixels only, with depth; blended with the anchor's when ``pseudo.anchor_weight`` > 0), and the
        class-frequency loss weights."""
        cfg, ignore = self.cfg, self.ignore
        if self.use_depth:
            probs, agree = fuse_dual_head(t.probs, t.aux_probs, cfg.depth.require_agreement)
        else:
            probs, agree = t.probs, None
        if t.anchor_probs is not None and cfg.pseudo.anchor_weight > 0:
            probs = (1 - cfg.pseudo.anchor_weight) * probs + cfg.pseudo.anchor_weight * t.anchor_probs
        th = self.tracker.update(probs, t.valid) if cfg.pseudo.class_balanced else cfg.pseudo.threshold
        labels, mask, _ = pseudo_label(probs, th, ignore, cfg.pseudo.rule, t.valid)
        stats = None
        if agree is not None:
            stats = {"fusion_removed": fusion_removed(mask, agree, t.valid)}
            mask &= agree
            labels = torch.where(mask, labels, torch.full_like(labels, ignore))
        weights = mask.float()
        if self.class_weights is not None:
            self.class_weights.update(labels, ignore)
            weights = weights * self.class_weights.pixel_weights(labels, ignore)
        return _PseudoLabels(labels, mask, weights, th, t.valid, stats=stats)

    def rectifier_loss(self, t: _TeacherView, hw: tuple) -> tuple:
        """5. (training-only) IR2F reliability r from an implicit head on the teacher's features, and its BCE toward
        the observable agreement target (anchor, flip, photometric, view consensus, RGB/RGB-D agreement as
        configured), over real pixels only (``t.valid`` when the view has one). With ``rectifier.inr`` off, r is the
        confidence prior alone and there is no loss.

        Returns:
            (scalar loss, (B, H, W) detached r at the input size or None without a rectifier).
        """
        cfg, rect, rc = self.cfg, self.rect, self.cfg.rectifier
        if rect is None:
            zero = torch.zeros((), device=self.device)
            if not (rc.enabled and not rc.inr):
                return zero, None
            return zero, rectification(cfg, None, None, t.logits, t.anchor_logits, hw)
        H, W = hw
        qs = max(1, rc.query_stride)
        hq, wq = max(1, H // qs), max(1, W // qs)
        r_small = rectification(cfg, rect, t.features, t.logits, t.anchor_logits, (hq, wq))
        target = agreement_target(t.probs.argmax(1), [t.anchor_probs if rc.anchor_consistency else None,
                                                      t.flip_probs, t.photo_probs, t.view_probs, t.aux_probs])
        loss_rect = masked_bce(r_small, target, getattr(t, "valid", None))
        r_full = F.interpolate(r_small[:, None].detach(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        return loss_rect, r_full

    def strong_view(self, img: torch.Tensor, pl: _PseudoLabels, r_full: torch.Tensor | None,
                    depth: torch.Tensor | None) -> _StrongView:
        """3. Target-to-target ClassMix (labels, weights, r and depth mixed alike) + colour jitter and blur."""
        if self.uda is not None and self.cfg.source_mix:  # UDA mode: DACS source->target ClassMix (adapt/uda.py)
            return _StrongView(*self.uda.strong_view(img, pl.labels, pl.weights, r_full)[:4], None, None)
        x01 = img.float() / 255.0
        if self.cfg.class_mix and img.shape[0] > 1:
            m = class_mix_masks(pl.labels, self.ignore)
            x01, labels_s, weights_s = mix(x01, m), mix(pl.labels, m), mix(pl.weights, m)
            r_s = mix(r_full, m) if r_full is not None else None
            depth_s = mix(depth, m) if depth is not None else None
        else:
            m, labels_s, weights_s, r_s, depth_s = None, pl.labels, pl.weights, r_full, depth
        x_s = normalize_float(photometric(x01, self.cfg.strong), self.meta.mean, self.meta.std)
        return _StrongView(x_s, labels_s, weights_s, r_s, depth_s, m)

    def student_loss(self, v: _StrongView, pl: _PseudoLabels, t: _TeacherView, loss_rect: torch.Tensor,
                     use_r: bool, hw: tuple, ctx: StepContext | None = None) -> tuple:
        """4. The student(s) on the strong view: pixel-weighted CE on the pseudo-labels, or the rectification-aware
        mixture loss once the rectifier is warm; plus the rectifier loss, and with depth the RGB-D student's CE
        and the cross-modal consistency.

        Returns:
            (total scalar loss, dict of the loss terms as floats).
        """
        cfg, ignore = self.cfg, self.ignore
        with autocast(self.device, cfg.amp):
            lo, fs = self.student.forward_features(v.x)
            ls = upsample_logits(lo.float(), hw)
            la_s = upsample_logits(self.aux(_rgbd(v.x, v.depth)).float(), hw) if self.use_depth else None
        if use_r:
            loss_pl = mixture_loss(ls, v.labels, v.reliability, v.weights, ignore)
        else:
            loss_pl = weighted_ce(ls, v.labels, v.weights, ignore)
        loss = loss_pl + cfg.rectifier.loss_weight * loss_rect
        logs = {"loss_pl": float(loss_pl.detach()), "loss_rect": float(loss_rect.detach())}
        if self.use_depth:
            loss_aux = weighted_ce(la_s, v.labels, v.weights, ignore)
            loss_cm = self.cross_modal_loss(ls, la_s, t, pl.threshold, v.mix_masks)
            loss = loss + loss_aux + cfg.depth.cross_modal_weight * loss_cm
            logs.update(loss_aux=float(loss_aux.detach()), loss_cm=float(loss_cm.detach()))
        if ctx is not None:  # the optional loss components (RCCR, BiDA) on the strong view
            ctx.student_logits, ctx.student_features, ctx.strong_labels, ctx.strong_weights, ctx.mix_masks = (
                lo, fs, v.labels, v.weights, v.mix_masks)
            loss_c, logs_c = component_losses(self.components, ctx)
            loss, logs = loss + loss_c, {**logs, **logs_c}
        return loss, logs

    def component_vote(self, t: _TeacherView, pl: _PseudoLabels, step: int, img: torch.Tensor) -> tuple:
        """The loss components' :class:`StepContext` (teacher side) and the pseudo-labels after their votes (BiDA's
        label transfer drops the pixels it disagrees with); ``(None, pl)`` without components."""
        if not self.components:
            return None, pl
        from dataclasses import replace

        ft = t.features
        if ft.shape[1] != self.teacher.model.feature_channels or ft.shape[-2:] != t.logits.shape[-2:]:
            with torch.no_grad():  # the rectifier reads low-level features: the components need the decoder's
                ft = self.teacher.forward_features(normalize(img, self.meta.mean, self.meta.std))[1]
        ctx = StepContext(step=step, steps=self.cfg.steps, ignore_index=self.ignore, teacher_logits=t.logits.float(),
                          teacher_features=ft.float(), teacher_probs=t.probs, labels=pl.labels,
                          weights=pl.weights, mask=pl.mask, valid=getattr(pl, "valid", None))
        if self.uda is not None:  # UDA mode: the source batch for the components' paper forms
            ctx.source = self.uda.context(img, self.student.forward_features, self.teacher.forward_features)
        voted = apply_votes(self.components, ctx)
        if voted is not None:
            ctx.labels, ctx.mask, ctx.weights = voted
            pl = replace(pl, labels=voted[0], mask=voted[1], weights=voted[2])
        return ctx, pl

    def cross_modal_loss(self, ls: torch.Tensor, la_s: torch.Tensor, t: _TeacherView, th,
                         m: torch.Tensor | None) -> torch.Tensor:
        """Each stream toward the other stream's own weak-view pseudo-label (mixed like the strong view)."""
        cfg, ignore = self.cfg, self.ignore
        th_a = self.tracker_aux.update(t.aux_probs, t.valid) if cfg.pseudo.class_balanced else cfg.pseudo.threshold
        lab_rgb, m_rgb, _ = pseudo_label(t.probs, th, ignore, cfg.pseudo.rule, t.valid)
        lab_aux, m_aux, _ = pseudo_label(t.aux_probs, th_a, ignore, cfg.pseudo.rule, t.valid)
        if m is not None:
            lab_rgb, m_rgb = mix(lab_rgb, m), mix(m_rgb.float(), m)
            lab_aux, m_aux = mix(lab_aux, m), mix(m_aux.float(), m)
        return (weighted_ce(ls, lab_aux, m_aux.float(), ignore) +
                weighted_ce(la_s, lab_rgb, m_rgb.float(), ignore))

    def update(self, loss: torch.Tensor, step: int) -> None:
        """6. Optimiser step, then the EMA update of the teacher(s)."""
        nan_check(loss, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.extra_params)  # data-parallel: what DDP does not hold
        self.opt.step()
        self.teacher.update(distributed.unwrap(self.student))
        if self.aux is not None:
            self.aux_teacher.update(distributed.unwrap(self.aux))
        for c in self.components:
            c.after_update()

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the start (or resumed) step to ``cfg.steps`` or the time budget; returns the summary."""
        cfg, out = self.cfg, self.out
        self.monitor, self.stopped_early = LabelFreeMonitor(self.K, self.ignore, cfg.monitor), None
        main = distributed.is_main()  # data-parallel: rank 0 writes the logs
        if self.resume_state is not None:
            if main:
                _truncate_log(out / "coverage.jsonl", self.start)
            distributed.barrier()
            self.monitor.load_log(out / "coverage.jsonl")
        self.cov_file = open(out / "coverage.jsonl" if main else os.devnull, "a")
        self.t0 = time.time()
        self.bar = tqdm(total=cfg.steps, initial=self.start, desc="adapt", unit="step", dynamic_ncols=True,
                        **distributed.bar_kwargs())
        step = self.start
        last_logs: dict = {}
        try:
            while step < cfg.steps:
                res = self.train_step(next(self.batches), step)
                step += 1
                last_logs = res.logs
                if self.after_step(step, res):
                    break
        finally:
            self.bar.close()
            self.cov_file.close()
        summary = {"steps": step, "seconds": self.elapsed_before + time.time() - self.t0,
                   "adapted": str(out / "adapted"), "keep": cfg.keep, "depth": cfg.depth.provider,
                   "rectifier": cfg.rectifier.enabled, "last_losses": last_logs, "device": str(self.device),
                   "size": list(self.size)}
        summary.update(monitor=self.monitor.summary(), stopped_early=self.stopped_early,
                       monitor_plot=str(out / "monitor.png") if (out / "monitor.png").is_file() else None)
        if main:
            write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode())
        return summary

    def after_step(self, step: int, res: _StepResult) -> bool:
        """Progress bar, coverage log (with the label-free monitor's signals), debug grid, checkpoints and
        ``monitor.png`` after ``step`` steps; True when the time budget is spent or the monitor's stopping rule fired
        with ``monitor.stop`` (a checkpoint was written)."""
        cfg, K, pl = self.cfg, self.K, res.pl
        stop = None  # the label-free stopping rule's reason (monitor.stop, checked on logged steps)
        self.bar.update(1)
        kept = kept_share(pl.mask, pl.valid)  # share of the real (unpadded) pixels
        self.bar.set_postfix(loss=f"{float(res.loss.detach()):.3f}", kept=f"{kept:.2f}", refresh=False)
        if step % cfg.log_every == 0 or step == cfg.steps:  # data-parallel: means over every rank's frames
            cov = distributed.all_reduce_mean(coverage_per_class(pl.labels, K, self.ignore, pl.valid))
            th = pl.threshold
            logs = distributed.mean_over_ranks({"kept": kept, **res.logs})
            rec = {"step": step, **logs, **depth_weight_norm(distributed.unwrap(self.aux)),
                   "coverage": {n: round(float(c), 4) for n, c in zip(self.classes.names, cov)},
                   "thresholds": [round(float(v), 3) for v in (th if torch.is_tensor(th) else torch.full((K,), th))]}
            t = res.view
            if t is not None:  # the anchor's probabilities only when the run keeps it: no extra forward pass
                rec.update(self.monitor.update(t.probs, t.anchor_probs, pl.labels, getattr(t, "valid", None), step))
                stop = self.monitor.stop_reason() if cfg.monitor.stop else None
            stop = distributed.broadcast_object(stop)  # data-parallel: rank 0 decides, every rank stops
            self.cov_file.write(json.dumps(rec) + "\n")
            self.cov_file.flush()
        res.view = None  # read: free the teacher's maps before the next step
        if cfg.debug_every and (step % cfg.debug_every == 0 or step == 1) and distributed.is_main():
            save_debug_grid(self.out / "debug" / f"step_{step:06d}.png", res.image, pl.labels, self.classes.palette,
                            self.ignore, res.reliability, res.depth)
        elapsed = self.elapsed_before + time.time() - self.t0
        if cfg.max_minutes > 0:  # data-parallel: rank 0's clock, so that every rank stops at the same step
            elapsed = distributed.broadcast_float(elapsed)
        out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time or stop:
            self.save(step, elapsed)
            if distributed.is_main():
                write_monitor_plot(self.monitor.history, self.out / "monitor.png", self.classes.names, self.log,
                                   self.classes.palette)
        if stop:
            self.stopped_early = stop
            self.log(f"{stop}: stopping at step {step} (--monitor.stop)")
            return True
        if out_of_time:
            self.log(f"time budget of {cfg.max_minutes} min reached at step {step}; stopping")
        return out_of_time


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` from a JSON-lines log (written by a run that was killed after its
    last checkpoint; the resumed run writes them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
    write_atomic(path, "".join(k + "\n" for k in keep).encode())


RECTIFIER_PRIORS = ("none", "teacher", "teacher_anchor")


def uses_anchor(cfg: AdaptConfig) -> bool:
    """Whether the run keeps the frozen AdaBN anchor (rectifier target, input or prior, or anchor-weighted
    pseudo-labels)."""
    r = cfg.rectifier
    return (r.enabled and (r.anchor_consistency or r.prior == "teacher_anchor")) or cfg.pseudo.anchor_weight > 0


def make_rectifier(cfg: AdaptConfig, feature_channels: int, num_classes: int) -> ImplicitRectifier:
    """The IR2F rectifier as configured: its latent grid takes the teacher's features and class probabilities, and
    the anchor's class probabilities too when ``rectifier.anchor_consistency`` is on.

    Raises:
        ValueError: ``rectifier.prior`` is not one of ``RECTIFIER_PRIORS``.
    """
    if cfg.rectifier.prior not in RECTIFIER_PRIORS:
        raise ValueError(f"rectifier.prior must be one of {RECTIFIER_PRIORS}, got {cfg.rectifier.prior!r}")
    k = num_classes * (2 if cfg.rectifier.anchor_consistency else 1)
    return ImplicitRectifier(feature_channels, k, cfg.rectifier.latent_dim, cfg.rectifier.hidden, cfg.rectifier.layers,
                             prior_residual=cfg.rectifier.prior != "none")


def rectification(cfg: AdaptConfig, rect: Optional[ImplicitRectifier], features: Optional[torch.Tensor],
                  logits: torch.Tensor, anchor_logits: Optional[torch.Tensor], out_size) -> torch.Tensor:
    """Rectification values r on an ``out_size`` grid, from the teacher's output, as configured.

    Args:
        rect: from :func:`make_rectifier` with the same ``cfg``, or None for the confidence prior alone
            (``rectifier.inr`` off).
        features: (B, D, h', w') teacher features from
            :func:`~segadapt.adapt.rectifier_signals.rectifier_input` (None with ``rect`` None).
        logits: (B, K, h, w) teacher logits (brought to the features' grid for the latent).
        anchor_logits: (B, K, h, w) logits of the frozen anchor, or None when the config does not use it.
        out_size: (H, W) query grid.

    Returns:
        (B, H, W) float in (0, 1); gradients reach only the rectifier's parameters.

    Raises:
        ValueError: ``rect`` None with ``rectifier.prior`` "none" (nothing to give r).
    """
    rc = cfg.rectifier
    prior = None
    if rc.prior != "none":
        with torch.no_grad():
            pt = F.softmax(upsample_logits(logits.detach().float(), out_size), 1)
            pn = None
            if rc.prior == "teacher_anchor":
                pn = F.softmax(upsample_logits(anchor_logits.detach().float(), out_size), 1)
            prior = confidence_prior(pt, pn)
    if rect is None:
        if prior is None:
            raise ValueError("rectifier.inr off needs a prior (rectifier.prior teacher or teacher_anchor)")
        return prior
    grid = tuple(features.shape[-2:])
    probs = F.softmax(upsample_logits(logits.detach().float(), grid), 1)
    if rc.anchor_consistency:
        probs = torch.cat([probs, F.softmax(upsample_logits(anchor_logits.detach().float(), grid), 1)], 1)
    return rect(features.detach().float(), probs, out_size, prior=prior)


def load_run(run: str | Path):
    """Rebuild a finished adaptation run from ``<run>/last`` for analysis (benchmarks): its EMA teacher, its frozen
    anchor and its rectifier, with the run's own saved config.

    A run that did not keep an anchor gets one rebuilt from its source checkpoint (AdaBN on its target images, at the
    run's input size), as :func:`adapt` would have made it; video targets get none.

    Returns:
        (teacher segmenter in eval mode, anchor segmenter in eval mode or None, rectifier in eval mode or None,
        checkpoint metadata, the run's :class:`AdaptConfig`).

    Raises:
        FileNotFoundError: ``<run>/last/training_state.pt`` is missing (not a finished ``segadapt adapt`` run).
    """
    from segadapt.adapt.config import from_dict
    from segadapt.adapt.data.transforms import Resize

    d = Path(run) / "last"
    if not (d / "training_state.pt").is_file():
        raise FileNotFoundError(f"{d / 'training_state.pt'}: not found; expected the output folder of a finished "
                                "`segadapt adapt` run")
    st = torch.load(d / "training_state.pt", map_location="cpu", weights_only=True)
    student, meta = load_checkpoint(d)
    saved = meta.info["config"]
    saved.setdefault("rectifier", {}).setdefault("prior", "none")  # runs from before the prior option had none
    saved["rectifier"].setdefault("features", "decoder")  # runs from before issue #12 read the decoder features
    saved.setdefault("adabn_alpha", 1.0)  # runs from before session 11 used plain AdaBN (the anchor rebuilt below)
    cfg = from_dict(AdaptConfig, saved)
    teacher = copy.deepcopy(student)
    teacher.load_state_dict(st["teacher"])
    anchor = rect = None
    if "anchor" in st:
        anchor = copy.deepcopy(student)
        anchor.load_state_dict(st["anchor"])
        anchor.eval()
    elif cfg.checkpoint and Path(cfg.checkpoint).exists() and not is_video(cfg.target):
        anchor, _ = load_segmenter(cfg.checkpoint)
        plain = ImageFolder(cfg.target, transform=Resize(tuple(meta.input_size)))
        adapt_batchnorm(anchor, DataLoader(plain, batch_size=8, collate_fn=collate), meta.mean, meta.std, "cpu",
                        layers=cfg.adabn_layers, alpha=cfg.adabn_alpha)
    if "rectifier" in st:
        # runs made before the anchor existed have no such config key: read the rectifier's input width instead
        d_in = rectifier_feature_channels(student, cfg.rectifier)
        k = st["rectifier"]["proj.weight"].shape[1] - d_in
        cfg.rectifier.anchor_consistency = k == 2 * meta.classes.num_classes
        rect = make_rectifier(cfg, d_in, meta.classes.num_classes)
        rect.load_state_dict(st["rectifier"])
        rect.eval()
    return teacher.eval(), anchor, rect, meta, cfg


__all__ = ["adapt", "target_dataset", "load_run", "make_rectifier", "rectification", "uses_anchor",
           "RECTIFIER_PRIORS"]
