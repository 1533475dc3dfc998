"""Source-free adaptation (``segadapt adapt``): one readable loop.

Inputs are a source checkpoint and unlabelled target footage, nothing else: the target dataset types
(:class:`~segadapt.adapt.data.datasets.ImageFolder`, :class:`~segadapt.adapt.data.datasets.VideoFrames`) have no label field, and the
config has no field for source data.

Per step (methods.md 0.2 source-free recipe + CrossMatch 1.3 + IR2F 5.3, the [RECON] parts configurable):

1. weak view (resize, random scale/crop, flip; depth follows) -> EMA teacher(s) -> probabilities;
2. pseudo-labels: class-balanced confidence thresholds (CBST); with depth, dual-head fusion of the RGB and RGB-D
   teachers (average softmax, keep agreeing pixels);
3. strong view: target-to-target ClassMix + colour jitter + blur (image only);
4. student loss: pixel-weighted CE on the pseudo-labels, or the rectification-aware mixture loss with the rectifier's
   per-pixel reliability r; with depth, the RGB-D student learns the fused labels too, and each stream is trained
   toward the other stream's weak-view pseudo-label (cross-modal consistency);
5. rectifier loss: BCE toward what is observable on the target: by default the agreement of the teacher's label
   with the *anchor* (a frozen copy of the source model after AdaBN, whose probabilities also enter the
   rectifier), optionally flip/photometric stability, and with depth the RGB/RGB-D agreement;
6. optimiser step, EMA update of the teacher(s).

BatchNorm statistics are re-estimated on the target first (AdaBN) and then frozen in the student.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from segadapt.adapt.adabn import adapt_batchnorm, freeze_batchnorm
from segadapt.adapt.aspect import resolve_size
from segadapt.adapt.augment import class_mix_masks, mix, normalize, normalize_float, photometric
from segadapt.adapt.config import AdaptConfig, to_dict
from segadapt.adapt.data.datasets import ImageFolder, VideoFrames, collate, is_video
from segadapt.adapt.data.depth import make_depth_provider
from segadapt.adapt.data.transforms import train_transform
from segadapt.adapt.debug import save_debug_grid
from segadapt.adapt.models.aux_stream import make_auxiliary_stream
from segadapt.adapt.data.sampling import data_state, resumable_loader
from segadapt.adapt.models.checkpoint import (CheckpointMeta, checkpoint_hash, is_checkpoint, load_checkpoint,
                                     load_segmenter, load_training_state, save_checkpoint)
from segadapt.adapt.models.rectifier import ImplicitRectifier, confidence_prior, mixture_loss, weighted_ce
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.pseudo_label import (ClassFrequencyWeights, ThresholdTracker, coverage_per_class, fuse_dual_head,
                                pseudo_label)
from segadapt.adapt.resume import resume_from
from segadapt.adapt.teacher import EMATeacher
from segadapt.adapt.train_utils import autocast, nan_check, pick_device, rng_state, seed_everything, set_rng_state
from segadapt.runtime.files import write_atomic


def target_dataset(cfg: AdaptConfig, size, transform, depth_provider):
    """The unlabelled target dataset: an image folder or the frames of a video file.

    Raises:
        FileNotFoundError / ValueError: missing or unreadable target (the message names it).
    """
    if not cfg.target:
        raise ValueError("--target is required (an image folder or a video file)")
    if is_video(cfg.target):
        if depth_provider is not None:
            raise ValueError("depth providers need image files; extract the video's frames first")
        return VideoFrames(cfg.target, cfg.video_stride, cfg.video_max_frames, size=size, transform=transform)
    return ImageFolder(cfg.target, transform=transform, depth_provider=depth_provider)


def adapt(cfg: AdaptConfig, log: Callable[[str], None] = print) -> dict:
    """Run source-free adaptation as configured; returns a summary dict.

    Writes ``<out>/adapted`` (the adapted checkpoint), ``<out>/last`` (+ training state for ``--resume``),
    ``<out>/coverage.jsonl`` (pseudo-label coverage per class), ``<out>/debug/*.png`` and ``<out>/summary.json``.

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, target or depth settings.
    """
    if cfg.rectifier.prior not in RECTIFIER_PRIORS:
        raise ValueError(f"rectifier.prior must be one of {RECTIFIER_PRIORS}, got {cfg.rectifier.prior!r}")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    resume_dir = resume_from(out, cfg.resume, log)  # before any model loads: --resume with nothing is an error
    out.mkdir(parents=True, exist_ok=True)
    src_model, meta = load_segmenter(cfg.checkpoint, map_location=device)
    if src_model.in_channels != 3:
        raise ValueError(f"{cfg.checkpoint}: expected an RGB model")
    classes = meta.classes
    K, ignore = classes.num_classes, classes.ignore_index
    size = resolve_size(cfg.size, cfg.keep_aspect, cfg.target, meta.input_size, src_model.arch,
                        src_model.output_stride)
    crop = tuple(cfg.crop) if all(cfg.crop) else size
    depth_provider = make_depth_provider(cfg.depth.provider, cfg.depth.directory, cfg.depth.right_dir,
                                         cfg.depth.model_dir, cfg.depth.focal_px, cfg.depth.baseline_m,
                                         cfg.depth.file_kind, cfg.depth.png_scale, str(device))
    use_depth = depth_provider is not None
    transform = train_transform(crop, size, tuple(cfg.scale), ignore)
    ds = target_dataset(cfg, size, transform, depth_provider)
    log(f"target: {len(ds)} frames from {cfg.target} at {size[0]}x{size[1]}; depth: {cfg.depth.provider}; "
        f"device: {device}")
    info = {"command": "adapt", "config": to_dict(cfg), "source_checkpoint": str(cfg.checkpoint),
            "source_checkpoint_sha256": checkpoint_hash(cfg.checkpoint) if is_checkpoint(cfg.checkpoint) else ""}
    out_meta = CheckpointMeta(classes=classes, mean=meta.mean, std=meta.std, input_size=size, info=info)

    def rgbd(x_norm: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_norm, d], 1)

    # ---- 1. AdaBN (deterministic, no augmentation: resized frames in order)
    resume_state = None
    if resume_dir is not None:
        resume_state = load_training_state(resume_dir)
        student, _ = load_checkpoint(resume_dir, map_location=device)
        log(f"resuming from {resume_dir} at step {resume_state['step']}")
    else:
        student = src_model
        if cfg.adabn:
            from segadapt.adapt.data.transforms import Resize

            plain = target_dataset(cfg, size, Resize(size), depth_provider)
            loader = DataLoader(plain, batch_size=8, shuffle=False, collate_fn=collate, num_workers=0)
            n = adapt_batchnorm(student, loader, meta.mean, meta.std, device)
            log(f"AdaBN: re-estimated {n} BatchNorm layers on {len(plain)} target frames")
    if not cfg.self_training:
        save_checkpoint(out / "adapted", student, out_meta)
        summary = {"steps": 0, "adabn": cfg.adabn, "adapted": str(out / "adapted"), "size": list(size)}
        write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode())
        return summary

    # ---- 2. models: student, EMA teacher, optional RGB-D stream and rectifier
    student.train()
    freeze_batchnorm(student)
    teacher = EMATeacher(student, cfg.teacher.alpha)
    aux = aux_teacher = None
    if use_depth:
        aux = make_auxiliary_stream(student).to(device)
        aux.train()
        freeze_batchnorm(aux)
        aux_teacher = EMATeacher(aux, cfg.teacher.alpha)
    rect = anchor = None
    if cfg.rectifier.enabled:
        rect = make_rectifier(cfg, student.feature_channels, K).to(device)
    if uses_anchor(cfg):
        # the anchor: a frozen copy of the model as it is after AdaBN (restored from the training state on resume)
        anchor = copy.deepcopy(student).eval()
        anchor.requires_grad_(False)
        if resume_state is not None:
            anchor.load_state_dict(resume_state["anchor"])
    groups = student.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
    if aux is not None:
        groups += aux.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
    if rect is not None:
        groups.append({"params": list(rect.parameters()), "lr": cfg.rectifier.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    tracker = ThresholdTracker(K, cfg.pseudo.fraction, cfg.pseudo.threshold, cfg.pseudo.floor)
    class_weights = None
    if cfg.pseudo.class_weight_power > 0:
        class_weights = ClassFrequencyWeights(K, cfg.pseudo.class_weight_power, max_weight=cfg.pseudo.class_weight_max)
    tracker_aux = ThresholdTracker(K, cfg.pseudo.fraction, cfg.pseudo.threshold, cfg.pseudo.floor)
    start = 0
    elapsed_before = 0.0
    if resume_state is not None:
        teacher.model.load_state_dict(resume_state["teacher"])
        if aux is not None:
            aux.load_state_dict(resume_state["aux"])
            aux_teacher.model.load_state_dict(resume_state["aux_teacher"])
        if rect is not None:
            rect.load_state_dict(resume_state["rectifier"])
        opt.load_state_dict(resume_state["optimizer"])
        tracker.load_state_dict(resume_state["tracker"])
        if class_weights is not None and "class_weights" in resume_state:
            class_weights.load_state_dict(resume_state["class_weights"])
        tracker_aux.load_state_dict(resume_state["tracker_aux"])
        start, elapsed_before = int(resume_state["step"]), float(resume_state["elapsed"])
        set_rng_state(resume_state["rng"])
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])

    def save(step: int, elapsed: float) -> None:
        # everything the next step depends on: exact resume (issue #18)
        ts = {"teacher": teacher.model.state_dict(), "optimizer": opt.state_dict(), "step": step,
              "elapsed": elapsed, "rng": rng_state(), "data": data_state(loader, step), "tracker": tracker.state_dict(),
              "tracker_aux": tracker_aux.state_dict()}
        if aux is not None:
            ts["aux"], ts["aux_teacher"] = aux.state_dict(), aux_teacher.model.state_dict()
        if rect is not None:
            ts["rectifier"] = rect.state_dict()
        if anchor is not None:
            ts["anchor"] = anchor.state_dict()
        if class_weights is not None:
            ts["class_weights"] = class_weights.state_dict()
        out_meta.info.update(step=step)
        save_checkpoint(out / "last", student, out_meta, ts)
        save_checkpoint(out / "adapted", teacher.model if cfg.keep == "teacher" else student, out_meta)

    # batch k of the run depends only on (seed, k): a resumed run continues the data order exactly
    consumed = int(resume_state.get("data", {}).get("consumed", start)) if resume_state is not None else 0
    loader = resumable_loader(ds, cfg.batch_size, cfg.seed, start=consumed, num_workers=cfg.num_workers,
                              collate_fn=collate)
    batches = iter(loader)
    if resume_state is not None:
        _truncate_log(out / "coverage.jsonl", start)
    cov_file = open(out / "coverage.jsonl", "a")
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc="adapt", unit="step", dynamic_ncols=True)
    step = start
    last_logs: dict = {}
    try:
        while step < cfg.steps:
            b = next(batches)
            img = b["image"].to(device, non_blocking=True)
            depth = b["depth"].to(device) if use_depth else None
            H, W = img.shape[-2:]
            x_w = normalize(img, meta.mean, meta.std)
            # ---- teacher(s) on the weak view
            with torch.no_grad(), autocast(device, cfg.amp):
                lt, ft = teacher.forward_features(x_w)
                pt = F.softmax(upsample_logits(lt.float(), (H, W)), 1)
                pa = None
                if use_depth:
                    pa = F.softmax(upsample_logits(aux_teacher(rgbd(x_w, depth)).float(), (H, W)), 1)
                pt_flip = pt_photo = pn = ln = None
                if anchor is not None:
                    ln = anchor(x_w).float()
                    pn = F.softmax(upsample_logits(ln, (H, W)), 1)
                if rect is not None and cfg.rectifier.flip_consistency:
                    pt_flip = F.softmax(upsample_logits(teacher(x_w.flip(-1)).float(), (H, W)), 1).flip(-1)
                if rect is not None and cfg.rectifier.photometric_consistency:
                    x_p = normalize_float(photometric(img.float() / 255.0, cfg.strong), meta.mean, meta.std)
                    pt_photo = F.softmax(upsample_logits(teacher(x_p).float(), (H, W)), 1)
            # ---- pseudo-labels
            if use_depth:
                probs, agree = fuse_dual_head(pt, pa, cfg.depth.require_agreement)
            else:
                probs, agree = pt, None
            if pn is not None and cfg.pseudo.anchor_weight > 0:
                probs = (1 - cfg.pseudo.anchor_weight) * probs + cfg.pseudo.anchor_weight * pn
            th = tracker.update(probs) if cfg.pseudo.class_balanced else cfg.pseudo.threshold
            labels, mask, conf = pseudo_label(probs, th, ignore)
            if agree is not None:
                mask &= agree
                labels = torch.where(mask, labels, torch.full_like(labels, ignore))
            weights = mask.float()
            if class_weights is not None:
                class_weights.update(labels, ignore)
                weights = weights * class_weights.pixel_weights(labels, ignore)
            # ---- rectifier (training-only): reliability r from an implicit head on the teacher's features
            r_full = None
            loss_rect = torch.zeros((), device=device)
            if rect is not None:
                qs = max(1, cfg.rectifier.query_stride)
                hq, wq = max(1, H // qs), max(1, W // qs)
                r_small = rectification(cfg, rect, ft, lt, ln, (hq, wq))
                target = torch.ones_like(pt[:, 0], dtype=torch.bool)
                if cfg.rectifier.anchor_consistency:
                    target &= pt.argmax(1) == pn.argmax(1)
                if pt_flip is not None:
                    target &= pt.argmax(1) == pt_flip.argmax(1)
                if pt_photo is not None:
                    target &= pt.argmax(1) == pt_photo.argmax(1)
                if pa is not None:
                    target &= pt.argmax(1) == pa.argmax(1)
                tgt_small = F.interpolate(target[:, None].float(), size=(hq, wq), mode="nearest")[:, 0]
                loss_rect = F.binary_cross_entropy(r_small.clamp(1e-6, 1 - 1e-6), tgt_small)
                r_full = F.interpolate(r_small[:, None].detach(), size=(H, W), mode="bilinear",
                                       align_corners=False)[:, 0]
            use_r = r_full is not None and step >= cfg.rectifier.warmup_steps
            # ---- strong view: ClassMix between target images + photometric
            x01 = img.float() / 255.0
            if cfg.class_mix and img.shape[0] > 1:
                m = class_mix_masks(labels, ignore)
                x01, labels_s, weights_s = mix(x01, m), mix(labels, m), mix(weights, m)
                r_s = mix(r_full, m) if r_full is not None else None
                depth_s = mix(depth, m) if depth is not None else None
            else:
                m, labels_s, weights_s, r_s, depth_s = None, labels, weights, r_full, depth
            x_s = normalize_float(photometric(x01, cfg.strong), meta.mean, meta.std)
            # ---- students
            with autocast(device, cfg.amp):
                ls = upsample_logits(student(x_s).float(), (H, W))
                la_s = upsample_logits(aux(rgbd(x_s, depth_s)).float(), (H, W)) if use_depth else None
            if use_r:
                loss_pl = mixture_loss(ls, labels_s, r_s, weights_s, ignore)
            else:
                loss_pl = weighted_ce(ls, labels_s, weights_s, ignore)
            loss = loss_pl + cfg.rectifier.loss_weight * loss_rect
            logs = {"loss_pl": float(loss_pl.detach()), "loss_rect": float(loss_rect.detach())}
            if use_depth:
                loss_aux = weighted_ce(la_s, labels_s, weights_s, ignore)
                # cross-modal consistency: each stream toward the other stream's own weak-view pseudo-label
                th_a = tracker_aux.update(pa) if cfg.pseudo.class_balanced else cfg.pseudo.threshold
                lab_rgb, m_rgb, _ = pseudo_label(pt, th, ignore)
                lab_aux, m_aux, _ = pseudo_label(pa, th_a, ignore)
                if m is not None:
                    lab_rgb, m_rgb = mix(lab_rgb, m), mix(m_rgb.float(), m)
                    lab_aux, m_aux = mix(lab_aux, m), mix(m_aux.float(), m)
                loss_cm = (weighted_ce(ls, lab_aux, m_aux.float(), ignore) +
                           weighted_ce(la_s, lab_rgb, m_rgb.float(), ignore))
                loss = loss + loss_aux + cfg.depth.cross_modal_weight * loss_cm
                logs.update(loss_aux=float(loss_aux.detach()), loss_cm=float(loss_cm.detach()))
            nan_check(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            teacher.update(student)
            if aux is not None:
                aux_teacher.update(aux)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", kept=f"{float(mask.float().mean()):.2f}",
                            refresh=False)
            last_logs = logs
            if step % cfg.log_every == 0 or step == cfg.steps:
                cov = coverage_per_class(labels, K, ignore)
                rec = {"step": step, "kept": float(mask.float().mean()), **logs,
                       "coverage": {n: round(float(c), 4) for n, c in zip(classes.names, cov)},
                       "thresholds": [round(float(v), 3) for v in (th if torch.is_tensor(th) else torch.full((K,), th))]}
                cov_file.write(json.dumps(rec) + "\n")
                cov_file.flush()
            if cfg.debug_every and (step % cfg.debug_every == 0 or step == 1):
                save_debug_grid(out / "debug" / f"step_{step:06d}.png", img, labels, classes.palette, ignore,
                                r_full, depth)
            elapsed = elapsed_before + time.time() - t0
            out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                save(step, elapsed)
            if out_of_time:
                log(f"time budget of {cfg.max_minutes} min reached at step {step}; stopping")
                break
    finally:
        bar.close()
        cov_file.close()
    summary = {"steps": step, "seconds": elapsed_before + time.time() - t0, "adapted": str(out / "adapted"),
               "keep": cfg.keep, "depth": cfg.depth.provider, "rectifier": cfg.rectifier.enabled,
               "last_losses": last_logs, "device": str(device), "size": list(size)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


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


def rectification(cfg: AdaptConfig, rect: ImplicitRectifier, features: torch.Tensor, logits: torch.Tensor,
                  anchor_logits: Optional[torch.Tensor], out_size) -> torch.Tensor:
    """Rectification values r on an ``out_size`` grid, from the teacher's decoder output, as configured.

    Args:
        rect: from :func:`make_rectifier` with the same ``cfg``.
        features: (B, D, h, w) teacher decoder features; logits: (B, K, h, w) teacher logits.
        anchor_logits: (B, K, h, w) logits of the frozen anchor, or None when the config does not use it.
        out_size: (H, W) query grid.

    Returns:
        (B, H, W) float in (0, 1); gradients reach only the rectifier's parameters.
    """
    rc = cfg.rectifier
    probs = F.softmax(logits.detach().float(), 1)
    if rc.anchor_consistency:
        probs = torch.cat([probs, F.softmax(anchor_logits.detach().float(), 1)], 1)
    prior = None
    if rc.prior != "none":
        with torch.no_grad():
            pt = F.softmax(upsample_logits(logits.detach().float(), out_size), 1)
            pn = None
            if rc.prior == "teacher_anchor":
                pn = F.softmax(upsample_logits(anchor_logits.detach().float(), out_size), 1)
            prior = confidence_prior(pt, pn)
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
        adapt_batchnorm(anchor, DataLoader(plain, batch_size=8, collate_fn=collate), meta.mean, meta.std, "cpu")
    if "rectifier" in st:
        # runs made before the anchor existed have no such config key: read the rectifier's input width instead
        k = st["rectifier"]["proj.weight"].shape[1] - student.feature_channels
        cfg.rectifier.anchor_consistency = k == 2 * meta.classes.num_classes
        rect = make_rectifier(cfg, student.feature_channels, meta.classes.num_classes)
        rect.load_state_dict(st["rectifier"])
        rect.eval()
    return teacher.eval(), anchor, rect, meta, cfg


__all__ = ["adapt", "target_dataset", "load_run", "make_rectifier", "rectification", "uses_anchor",
           "RECTIFIER_PRIORS"]
