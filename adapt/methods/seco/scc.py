"""SeCo stage B, Semantic Connectivity Correction (SCC): drop or relabel noisy connected components.

Zhao et al., arXiv 2312.06331, as its code does it (SCC/). Every 8-connected component of each class in the PSA
maps (OpenCV, no minimum area) is one sample: a crop of the frame around it, with its mask. A connectivity
classifier learns the components' PSA classes (label smoothing 0.1, SGD Nesterov, lr (1 + 10 p) ** -0.75) for a few
iterations only, so that it fits the clean majority before the noise (early-loss statistics); then every component
is scored without augmentation and the loss-distribution rule drops the noisy ones (to ignore) and relabels the
others with the predicted class.

Our design, not the paper's (configurable; see docs/method-notes.md, SeCo): the classifier is a small CNN trained
from scratch (SeCo: an ImageNet ResNet-101 whose stem output is multiplied by the mask; here the first block's output
is), the crop is (64, 128) by default (SeCo: 256 x 512) and the iterations are counted for our small sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Components", "ConnectivityClassifier", "apply_decisions", "component_crops", "crop_window",
           "extract_components", "scc_decisions", "train_and_score"]


@dataclass
class Components:
    """The connected components of a set of label maps.

    Attributes:
        maps: per frame, (H, W) int32 component id (index into the arrays below), -1 where no component.
        frame: (N,) int64 frame index of each component.
        cls: (N,) int64 class of each component (its PSA label).
        bbox: (N, 4) int64 x, y, width, height in pixels.
        area: (N,) int64 pixels.
    """

    maps: List[np.ndarray]
    frame: np.ndarray
    cls: np.ndarray
    bbox: np.ndarray
    area: np.ndarray

    def __len__(self) -> int:
        return len(self.cls)


def extract_components(label_maps: Sequence[np.ndarray], num_classes: int, ignore: int) -> Components:
    """8-connected components of each class (0..K-1) in each (H, W) int label map (``ignore`` pixels belong to none)."""
    maps, frame, cls, bbox, area = [], [], [], [], []
    n_total = 0
    for f, lab in enumerate(label_maps):
        cmap = np.full(lab.shape, -1, np.int32)
        for c in np.unique(lab):
            if c == ignore or not 0 <= c < num_classes:
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats((lab == c).astype(np.uint8), connectivity=8)
            if n <= 1:
                continue
            sel = comp > 0
            cmap[sel] = comp[sel] - 1 + n_total
            frame += [f] * (n - 1)
            cls += [int(c)] * (n - 1)
            bbox.append(stats[1:, :4])
            area.append(stats[1:, cv2.CC_STAT_AREA])
            n_total += n - 1
        maps.append(cmap)
    bbox_a = np.concatenate(bbox).astype(np.int64) if bbox else np.zeros((0, 4), np.int64)
    area_a = np.concatenate(area).astype(np.int64) if area else np.zeros(0, np.int64)
    return Components(maps, np.asarray(frame, np.int64), np.asarray(cls, np.int64), bbox_a, area_a)


def crop_window(bbox: Sequence[int], image_hw: Tuple[int, int], crop_hw: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """SeCo's sample window for a component: ``crop_hw`` (h, w), scaled up (aspect kept) when the bbox (x, y, w, h) is
    larger, centred on the bbox centre and shifted to lie inside the frame (clipped to it when larger).

    Returns:
        (y0, x0, y1, x1) in pixels, within the frame.
    """
    x, y, bw, bh = (int(v) for v in bbox)
    H, W = image_hw
    s = max(1.0, bh / crop_hw[0], bw / crop_hw[1])
    wh, ww = min(H, int(round(crop_hw[0] * s))), min(W, int(round(crop_hw[1] * s)))
    cy, cx = y + bh / 2.0, x + bw / 2.0
    y0 = int(np.clip(round(cy - wh / 2.0), 0, H - wh))
    x0 = int(np.clip(round(cx - ww / 2.0), 0, W - ww))
    return y0, x0, y0 + wh, x0 + ww


def component_crops(images: Sequence[np.ndarray], comps: Components, idx: np.ndarray, crop_hw: Tuple[int, int],
                    mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crops of the components ``idx``: (n, 3, h, w) float32 normalised images (bilinear) and (n, 1, h, w) float32
    binary component masks (nearest)."""
    h, w = crop_hw
    xs, ms = [], []
    for i in idx:
        f = int(comps.frame[i])
        y0, x0, y1, x1 = crop_window(comps.bbox[i], images[f].shape[:2], crop_hw)
        img = cv2.resize(images[f][y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_LINEAR)
        m = (comps.maps[f][y0:y1, x0:x1] == i).astype(np.uint8)
        xs.append(img)
        ms.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.from_numpy(np.stack(ms))[:, None].float()


class ConnectivityClassifier(nn.Module):
    """A small CNN classifying a component crop (our design in place of SeCo's ResNet-101; see
    docs/method-notes.md, SeCo): the first block's output is multiplied by the component mask (zeroing the context
    outside it, as SeCo does after the stem), then three strided blocks, global average pooling and a
    xavier-initialised linear layer.

    Input: (B, 3, h, w) float32 normalised crops and (B, 1, h, w) float32 {0, 1} masks. Output: (B, K) logits.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.stem = block(3, width)
        self.body = nn.Sequential(block(width, 2 * width), block(2 * width, 4 * width), block(4 * width, 4 * width))
        self.fc = nn.Linear(4 * width, num_classes)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        f = f * F.interpolate(mask, size=f.shape[-2:], mode="nearest")
        return self.fc(self.body(f).mean((2, 3)))


def _smoothed_ce(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample soft-target CE toward (1 - eps) one-hot + eps / K: (B,) float32."""
    k = logits.shape[1]
    soft = torch.full_like(logits, eps / k).scatter_(1, target[:, None], 1 - eps + eps / k)
    return -(soft * F.log_softmax(logits, 1)).sum(1)


def train_and_score(images: Sequence[np.ndarray], comps: Components, num_classes: int, mean, std,
                    crop_hw: Tuple[int, int] = (64, 128), iterations: int = 300, batch: int = 32, lr: float = 0.01,
                    smoothing: float = 0.1, device: str = "cpu", seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Train a :class:`ConnectivityClassifier` briefly on the components' PSA classes (random h-flip; SGD Nesterov,
    momentum 0.9, weight decay 1e-3, lr ``lr`` * (1 + 10 p) ** -0.75), then score every component without flip.

    Args:
        images: the frames, (H, W, 3) uint8 RGB, indexed by ``comps.frame``.

    Returns:
        ((N,) float64 smoothed-CE loss of each component toward its PSA class, (N,) int64 predicted class).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ConnectivityClassifier(num_classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    n = len(comps)
    net.train()
    for it in range(iterations):
        for grp in opt.param_groups:
            grp["lr"] = lr * (1 + 10 * it / iterations) ** -0.75
        idx = torch.randint(0, n, (min(batch, n),), generator=g).numpy()
        x, m = component_crops(images, comps, idx, crop_hw, mean, std)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip], m[flip] = x[flip].flip(-1), m[flip].flip(-1)
        y = torch.from_numpy(comps.cls[idx]).to(device)
        loss = _smoothed_ce(net(x.to(device), m.to(device)), y, smoothing).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    losses, preds = [], []
    with torch.no_grad():
        for s in range(0, n, 256):
            idx = np.arange(s, min(n, s + 256))
            x, m = component_crops(images, comps, idx, crop_hw, mean, std)
            logits = net(x.to(device), m.to(device)).float()
            y = torch.from_numpy(comps.cls[idx]).to(device)
            losses.append(_smoothed_ce(logits, y, smoothing).cpu().double().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(losses), np.concatenate(preds).astype(np.int64)


def scc_decisions(losses: np.ndarray, labels: np.ndarray, preds: np.ndarray, rule: str = "both_loss",
                  relabel: bool = True) -> np.ndarray:
    """SeCo's loss-distribution noise rule (as its code applies it; ratio 0.5 = medians).

    Args:
        losses: (N,) per-component loss toward the PSA class; labels: (N,) PSA classes; preds: (N,) predictions.
        rule: ``both_loss`` (SeCo's code): t_c = median loss of the components *predicted* c, g = mean of
            t_pred over all components; drop when loss > t_pred and loss > g. ``class_median``: drop when the loss
            is above the median loss of the components with the same PSA class.
        relabel: kept components take their predicted class (SeCo), else they keep their PSA class.

    Returns:
        (N,) int64 new class per component, -1 = dropped.

    Raises:
        ValueError: unknown rule.
    """
    losses, labels, preds = np.asarray(losses, float), np.asarray(labels), np.asarray(preds)
    if rule == "both_loss":
        t = {c: np.median(losses[preds == c]) for c in np.unique(preds)}
        t_i = np.array([t[c] for c in preds]) if len(preds) else np.zeros(0)
        drop = (losses > t_i) & (losses > (t_i.mean() if len(t_i) else 0.0))
    elif rule == "class_median":
        t = {c: np.median(losses[labels == c]) for c in np.unique(labels)}
        drop = losses > np.array([t[c] for c in labels]) if len(labels) else np.zeros(0, bool)
    else:
        raise ValueError(f"unknown SCC rule {rule!r}; use both_loss or class_median")
    return np.where(drop, -1, preds if relabel else labels).astype(np.int64)


def apply_decisions(comps: Components, new_cls: np.ndarray, ignore: int) -> List[np.ndarray]:
    """Paint each component with its new class (``ignore`` where dropped): (H, W) int64 label map per frame."""
    lut = np.append(np.where(new_cls >= 0, new_cls, ignore), ignore).astype(np.int64)  # id -1 -> last entry
    return [lut[np.where(m >= 0, m, len(new_cls))] for m in comps.maps]
