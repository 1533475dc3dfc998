"""Photometric augmentation on batched images (image only; labels and depth are untouched).

Used for source training (a source model must not hinge on one exposure) and for the student's strong view during
adaptation (the DAFormer/DACS recipe's probabilities: colour jitter with p 0.8, Gaussian blur with p 0.5,
sigma ~ U(0.15, 1.15)). All functions take and return (B, 3, H, W) float tensors with values in [0, 1] and draw one
set of random parameters per sample.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from segadapt.adapt.config import PhotometricConfig

_LUMA = (0.299, 0.587, 0.114)


def _factor(b: int, s: float, dev) -> torch.Tensor:
    return (1.0 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * s).clamp_min(0.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` (B,) fractions of a full turn, in YIQ space (luma preserved)."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           device=x.device, dtype=x.dtype)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    th = turns * 2 * math.pi
    c, s = torch.cos(th), torch.sin(th)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = yiq2rgb @ rot @ rgb2yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma (pixels) per sample; kernel size 2*ceil(3*sigma_max)+1, reflect padding."""
    b, c, h, w = x.shape
    r = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, K)
    xp = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    kk = k.repeat_interleave(c, 0)
    xp = F.conv2d(xp, kk[:, None, None, :], groups=b * c)
    xp = F.conv2d(xp, kk[:, None, :, None], groups=b * c)
    return xp.reshape(b, c, h, w)


def photometric(x: torch.Tensor, cfg: PhotometricConfig) -> torch.Tensor:
    """Random colour jitter (brightness, contrast, saturation, hue), gamma and blur, per sample.

    Args:
        x: (B, 3, H, W) float RGB in [0, 1].
        cfg: strengths and probabilities.

    Returns:
        (B, 3, H, W) float in [0, 1], same dtype and device.
    """
    b, dev = x.shape[0], x.device
    on = (torch.rand(b, 1, 1, 1, device=dev) < cfg.jitter_p).to(x.dtype)
    y = x
    if cfg.brightness > 0:
        y = y * _factor(b, cfg.brightness, dev)
    if cfg.contrast > 0:
        mean = _gray(y).mean((2, 3), keepdim=True)
        y = (y - mean) * _factor(b, cfg.contrast, dev) + mean
    if cfg.saturation > 0:
        g = _gray(y)
        y = (y - g) * _factor(b, cfg.saturation, dev) + g
    if cfg.hue > 0:
        y = rotate_hue(y, (torch.rand(b, device=dev) * 2 - 1) * cfg.hue)
    y = y.clamp(0, 1)
    if cfg.gamma > 0:
        y = y.clamp_min(1e-6) ** _factor(b, cfg.gamma, dev).clamp_min(0.1)
    y = on * y + (1 - on) * x
    if cfg.blur_p > 0:
        blur = torch.rand(b, device=dev) < cfg.blur_p
        if blur.any():
            sig = torch.empty(int(blur.sum()), device=dev).uniform_(cfg.blur_sigma_min, cfg.blur_sigma_max)
            y = y.clone()
            y[blur] = gaussian_blur(y[blur], sig)
    return y.clamp(0, 1)


def normalize_float(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) float RGB in [0, 1] -> ``(x - mean) / std`` with per-channel mean/std in [0, 1] units."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> float normalised ``(x / 255 - mean) / std``."""
    return normalize_float(x_uint8.float() / 255.0, mean, std)


def class_mix_masks(labels: torch.Tensor, ignore_index: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix masks between target images (ClassMix, Olsson et al. WACV 2021; DACS mixes source onto target, here
    target with target: see docs/method-notes.md, DACS).

    For each image i, half of the classes present in its (pseudo-)label are chosen at random (ceil(n/2)); the mask
    is 1 on its pixels of those classes. :func:`mix` pastes them onto image ``(i + 1) % B``.

    Args:
        labels: (B, H, W) int64 pseudo-labels (``ignore_index`` for rejected pixels, never selected).

    Returns:
        (B, 1, H, W) float masks in {0, 1}.
    """
    b = labels.shape[0]
    masks = torch.zeros(b, 1, *labels.shape[1:], device=labels.device)
    for i in range(b):
        classes = torch.unique(labels[i])
        classes = classes[classes != ignore_index]
        if classes.numel() == 0:
            continue
        n = (classes.numel() + 1) // 2
        pick = classes[torch.randperm(classes.numel(), generator=generator, device="cpu")[:n].to(classes.device)]
        masks[i, 0] = torch.isin(labels[i], pick).float()
    return masks


def mix(a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """ClassMix: ``out[i] = m[i] * a[i] + (1 - m[i]) * a[(i + 1) % B]`` (image i's selected classes pasted onto the
    next image in the batch).

    Args:
        a: (B, C, H, W) or (B, H, W) tensor (images, depth, labels or weights), same pairing for all of them.
        masks: (B, 1, H, W) masks from :func:`class_mix_masks`.

    Returns:
        the mixed tensor, same shape and dtype.
    """
    background = torch.roll(a, shifts=-1, dims=0)  # background[i] = a[(i + 1) % B]
    m = masks[:, 0] if a.ndim == 3 else masks
    out = m * a.float() + (1 - m) * background.float()
    return out.to(a.dtype)
