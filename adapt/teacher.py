"""EMA teacher for source-free self-training (mean teacher, Tarvainen and Valpola, NeurIPS 2017; a module of its own
as in DAFormer, Hoyer et al. CVPR 2022).

Source-free specifics (our design, not the papers': see docs/method-notes.md, Mean teacher): the teacher starts as
the (AdaBN-adapted) source model and follows the student with a *fixed* momentum (``--teacher.alpha``, default 0.999;
the quick recipe's 150 steps use 0.99), with no warm-up ramp: DAFormer's ramp ``min(1 - 1/(t+1), 0.999)`` let the
teacher collapse from 33 to 13 mIoU within 100 steps on CamVid dusk (first release, 2026-11-21) when there is no
source loss to anchor it. Dropout and DropPath are off in the teacher. BatchNorm running statistics are copied, not
averaged, from the student (whose statistics are frozen after AdaBN), so teacher and student normalise identically.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every Dropout/DropPath module's probability to 0 (the teacher must be deterministic)."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d)):
            m.p = 0.0
        elif m.__class__.__name__.lower().endswith("droppath") and hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


class EMATeacher(nn.Module):
    """Exponential moving average of a student model.

    Args:
        student: the model being trained; the teacher is a deep copy of it at construction.
        alpha: EMA momentum in [0, 1): ``teacher = alpha * teacher + (1 - alpha) * student`` after every step.

    ``forward`` runs the teacher in eval mode without gradients.
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.model = disable_dropout(copy.deepcopy(student)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step over parameters; buffers (BatchNorm statistics) are copied from the student."""
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(self.alpha).add_(s.detach(), alpha=1.0 - self.alpha)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        self.model.eval()
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor):
        self.model.eval()
        return self.model.forward_features(x)

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        super().train(False)
        self.model.eval()
        return self
