"""The RGB-D segmenter of CrossMatch's auxiliary stream (Yin et al., ICCV 2023; early fusion with a zero-initialised
depth input, ours: the paper's code was not available).

The same architecture as the source model with a (3 + E)-channel stem: RGB, normalised inverse depth and, in
adaptation runs by default (``depth.validity_channel``), a depth-validity channel (E = 2). Every weight is copied from
the source model; the stem's weights for the extra channels are zero, so at the start the RGB-D segmenter computes
exactly the source model's function. It is trained only during adaptation and never exported.

The stem's weight is split (``torch.nn.utils.parametrize``) into two parameters, the RGB part and the extra-input
part (:func:`depth_input_weight`), so that the depth-input weights can have their own optimiser group and learning
rate (ours: at the backbone's rate the zero-initialised weights barely move in a short run).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from segadapt.adapt.models.segmenter import Segmenter, _hf_class


class _SplitInputChannels(nn.Module):
    """Parametrisation of a conv weight (C_out, 3 + E, k, k) as ``cat([rgb (C_out, 3, k, k), extra (C_out, E, k,
    k)], 1)``; the two parts become the parameters ``original0`` and ``original1``."""

    def __init__(self, rgb_channels: int = 3):
        super().__init__()
        self.rgb_channels = rgb_channels

    def forward(self, rgb: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return torch.cat([rgb, extra], 1)

    def right_inverse(self, weight: torch.Tensor):
        n = self.rgb_channels
        return weight[:, :n].clone(), weight[:, n:].clone()


def make_rgbd_segmenter(source: Segmenter, extra_channels: int = 1) -> Segmenter:
    """A (3 + ``extra_channels``)-input-channel copy of ``source`` whose extra input channels start with zero weights.

    Args:
        source: an RGB segmenter (3 input channels).
        extra_channels: 1 (depth) or 2 (depth + validity), >= 1.

    Returns:
        a new :class:`Segmenter` with ``in_channels == 3 + extra_channels``, on ``source``'s device;
        ``rgbd(cat([x, extra], 1)) == source(x)`` for any extra input. Its stem weight is split into an RGB and an
        extra-input parameter (:func:`depth_input_weight`).

    Raises:
        ValueError: ``source`` does not have 3 input channels, ``extra_channels`` < 1, or a weight cannot be mapped.
    """
    if source.in_channels != 3:
        raise ValueError(f"the auxiliary stream is built from an RGB model, got {source.in_channels} channels")
    if extra_channels < 1:
        raise ValueError(f"extra_channels must be >= 1, got {extra_channels}")
    n_in = 3 + extra_channels
    cfg = source.hf.config.__class__.from_dict(source.hf.config.to_dict())
    cfg.num_channels = n_in
    rgbd = Segmenter(_hf_class(cfg.model_type)(cfg))
    src_state = source.state_dict()
    new_state, stem = {}, None
    for k, v in rgbd.state_dict().items():
        s = src_state[k]
        if s.shape == v.shape:
            new_state[k] = s.clone()
        elif s.ndim == 4 and v.ndim == 4 and s.shape[1] == 3 and v.shape[1] == n_in and s.shape[0] == v.shape[0]:
            w = torch.zeros_like(v)
            w[:, :3] = s
            new_state[k], stem = w, k  # the extra channels' weights are zero
        else:
            raise ValueError(f"cannot map source weight {k} {tuple(s.shape)} to {tuple(v.shape)}")
    if stem is None:
        raise ValueError("found no input convolution to extend in the source model")
    rgbd.load_state_dict(new_state)
    conv = rgbd.get_submodule(stem.rsplit(".", 1)[0])
    parametrize.register_parametrization(conv, "weight", _SplitInputChannels(3))
    return rgbd.to(next(source.parameters()).device)


def depth_input_weight(rgbd: nn.Module) -> nn.Parameter:
    """The stem's extra-input (depth, validity) weights of a stream from :func:`make_rgbd_segmenter`.

    Returns:
        the parameter (C_out, E, k, k) float32, a leaf trained by the optimiser.

    Raises:
        ValueError: ``rgbd`` has no split stem (not made by :func:`make_rgbd_segmenter`).
    """
    for m in rgbd.modules():
        if parametrize.is_parametrized(m, "weight"):
            plist = m.parametrizations.weight
            if isinstance(plist[0], _SplitInputChannels):
                return plist.original1
    raise ValueError("the model has no split RGB-D stem (build it with make_rgbd_segmenter)")
