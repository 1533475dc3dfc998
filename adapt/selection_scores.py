"""Scoring one candidate model on a fixed sample of unlabelled target frames with every label-free validator.

:func:`validation_frames` draws the sample once per run (at most ``max_frames``, evenly spread when there
are more); :func:`score_model` runs a candidate over it twice (the frames, then MixVal's mixed frames) and returns
each validator's value (:mod:`segadapt.adapt.validators`) and its class map, so that the reference model's map can
serve the others' agreement and drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from segadapt.adapt.evaluate import predict_logits
from segadapt.adapt.validators import (agreement, class_share_drift, mix_frames, mixval_accuracy, row_entropy,
                                       snd)

__all__ = ["ValidationFrames", "score_model", "validation_frames"]


@dataclass
class ValidationFrames:
    """The frames every candidate is scored on.

    Attributes:
        images: (N, 3, H, W) uint8 RGB on the CPU, at the run's size.
        valid: (N, H, W) bool, False on padding.
        indices: the N frame indices in the target dataset.
    """

    images: torch.Tensor
    valid: torch.Tensor
    indices: List[int]

    def partner(self) -> List[int]:
        """MixVal's pairing: frame i is mixed with frame ``(i + N // 2) % N`` (never itself when N >= 2)."""
        n = len(self.indices)
        return [(i + n // 2) % n for i in range(n)]


def validation_frames(dataset, max_frames: int) -> ValidationFrames:
    """At most ``max_frames`` frames of ``dataset`` (a target dataset with a plain resize: items ``image`` (3, H, W)
    uint8, optional ``valid`` (H, W) bool), evenly spread over it, in order; all of them when fewer.

    Raises:
        ValueError: an empty dataset or ``max_frames`` < 2.
    """
    if max_frames < 2:
        raise ValueError(f"the validators need at least 2 frames (got max_frames={max_frames})")
    n = len(dataset)
    if n == 0:
        raise ValueError("no target frames to score the candidate models on")
    idx = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, max_frames))})
    items = [dataset[i] for i in idx]
    images = torch.stack([torch.as_tensor(it["image"]) for it in items])
    valid = torch.stack([torch.as_tensor(it["valid"]).bool() if it.get("valid") is not None
                         else torch.ones(images.shape[-2:], dtype=torch.bool) for it in items])
    return ValidationFrames(images, valid, idx)


def _snd_pick(valid: torch.Tensor, pixels: int, seed: int) -> torch.Tensor:
    """Sorted flat indices of ``pixels`` valid pixels of (N, H, W) ``valid``, drawn with ``seed`` (all when fewer)."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    if len(flat) > pixels:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(len(flat), generator=g)[:pixels]].sort().values
    return flat


@torch.no_grad()
def _forward(model, images: torch.Tensor, mean, std, device, batch_size: int):
    """Yield (start index, (B, K, H, W) float32 probabilities on the CPU) over (N, 3, H, W) frames."""
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        yield s, torch.softmax(predict_logits(model, x, mean, std), dim=1).cpu()


def score_model(model, frames: ValidationFrames, mean, std, device, reference: Optional[torch.Tensor] = None,
                batch_size: int = 8, snd_pixels: int = 4000, seed: int = 0) -> Tuple[Dict[str, object], torch.Tensor]:
    """Every validator of one model on ``frames`` (module docstring of :mod:`segadapt.adapt.validators`).

    Args:
        model: the segmenter, in eval mode, on ``device``.
        frames: the sample (:func:`validation_frames`).
        mean, std: the model's normalisation (RGB in [0, 1] units).
        device: where the model is (frames go there batch by batch; the results come back to the CPU).
        reference: (N, H, W) uint8 class map of the reference model (the AdaBN source model) for ``agreement`` and
            ``drift``; None leaves both out.
        batch_size: frames per forward pass.
        snd_pixels: SND's pixel sample (the same pixels for every model with the same ``seed``).

    Returns:
        ({validator: value}, (N, H, W) uint8 class map of the model). Keys: ``entropy`` (of log K), ``im``, ``snd``,
        ``mixval_intra``, ``mixval_inter`` (accuracies in [0, 1]; NaN when no pixel is of that kind),
        ``mixval_intra_counts`` (per frame [correct, total] pixel counts, a list of N pairs of ints), and with a
        reference ``agreement`` and ``drift``; plus ``seconds``.

    Raises:
        ValueError: a ``reference`` whose shape is not (N, H, W).
    """
    t0 = time.time()
    n, (h, w) = len(frames.indices), frames.images.shape[-2:]
    if reference is not None and tuple(reference.shape) != (n, h, w):
        raise ValueError(f"reference class map has shape {tuple(reference.shape)}, expected {(n, h, w)}")
    valid = frames.valid
    pick = _snd_pick(valid, snd_pixels, seed)
    pred = torch.empty((n, h, w), dtype=torch.uint8)
    ent_sum, count, p_sum, picked = 0.0, 0, None, []
    for s, probs in _forward(model, frames.images, mean, std, device, batch_size):
        b = probs.shape[0]
        pred[s:s + b] = probs.argmax(1).to(torch.uint8)
        flat = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
        m = valid[s:s + b].reshape(-1)
        ent_sum += float(row_entropy(flat[m]).sum())
        count += int(m.sum())
        p_sum = flat[m].sum(0) if p_sum is None else p_sum + flat[m].sum(0)
        lo, hi = s * h * w, (s + b) * h * w
        sel = pick[(pick >= lo) & (pick < hi)] - lo
        picked.append(flat[sel])
    k = p_sum.numel()
    log_k = float(np.log(k))
    mean_ent = ent_sum / max(1, count) / log_k
    p_bar = p_sum / max(1, count)
    values = {"entropy": mean_ent, "im": float(row_entropy(p_bar[None])[0]) / log_k - mean_ent}
    p_snd = torch.cat(picked)
    values["snd"] = snd(p_snd.t()[None, :, None, :], pixels=max(2, len(p_snd)))
    values.update(_mixval(model, frames, pred, mean, std, device, batch_size))
    if reference is not None:
        values["agreement"] = agreement(pred, reference, valid)
        values["drift"] = class_share_drift(pred, reference, k, valid)
    values["seconds"] = time.time() - t0
    return values, pred


def _mixval(model, frames: ValidationFrames, pred: torch.Tensor, mean, std, device, batch_size: int
            ) -> Dict[str, object]:
    """MixVal's ICE_intra and ICE_inter over the mixed frames (frame i dominant, mixed with its partner), and the
    per-frame intra counts ``mixval_intra_counts``: [[correct, total], ...] (N rows of ints) for the verdict's
    resampling over frames (:func:`segadapt.adapt.selection.verdict`)."""
    partner = frames.partner()
    counts = np.zeros((len(partner), 4), dtype=np.int64)  # per frame: intra hit, intra total, inter hit, inter total
    mixed = mix_frames(frames.images, frames.images[partner]).round().to(torch.uint8)
    for s, probs in _forward(model, mixed, mean, std, device, batch_size):
        hard = probs.argmax(1)
        for k in range(probs.shape[0]):
            i, j = s + k, partner[s + k]
            both = (frames.valid[i] & frames.valid[j])[None]
            (ih, it), (oh, ot) = mixval_accuracy(hard[k:k + 1], pred[i:i + 1].long(), pred[j:j + 1].long(), both)
            counts[i] = (ih, it, oh, ot)
    tot = counts.sum(0)
    return {"mixval_intra": tot[0] / tot[1] if tot[1] else float("nan"),
            "mixval_inter": tot[2] / tot[3] if tot[3] else float("nan"),
            "mixval_intra_counts": counts[:, :2].tolist()}
