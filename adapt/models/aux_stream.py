"""The RGB-D auxiliary stream of CrossMatch (Yin et al., ICCV 2023; methods.md 1.3 option A, [RECON]).

The same architecture as the source model with a 4-channel stem (RGB + normalised inverse depth). Every weight is
copied from the source model; the stem's weights for the depth channel are zero, so at the start the auxiliary
stream computes exactly the source model's function. It is trained only during adaptation and never exported.
"""

from __future__ import annotations

import torch

from segadapt.adapt.models.segmenter import Segmenter, _hf_class


def make_auxiliary_stream(source: Segmenter) -> Segmenter:
    """A 4-input-channel copy of ``source`` whose extra (depth) input channel starts with zero weights.

    Args:
        source: an RGB segmenter (3 input channels).

    Returns:
        a new :class:`Segmenter` with ``in_channels == 4``; ``aux(cat([x, d], 1)) == source(x)`` for any depth d.

    Raises:
        ValueError: ``source`` does not have 3 input channels.
    """
    if source.in_channels != 3:
        raise ValueError(f"the auxiliary stream is built from an RGB model, got {source.in_channels} channels")
    cfg = source.hf.config.__class__.from_dict(source.hf.config.to_dict())
    cfg.num_channels = 4
    aux = Segmenter(_hf_class(cfg.model_type)(cfg))
    src_state = source.state_dict()
    new_state = {}
    for k, v in aux.state_dict().items():
        s = src_state[k]
        if s.shape == v.shape:
            new_state[k] = s.clone()
        elif s.ndim == 4 and v.ndim == 4 and s.shape[1] == 3 and v.shape[1] == 4 and s.shape[0] == v.shape[0]:
            w = torch.zeros_like(v)
            w[:, :3] = s
            new_state[k] = w  # the depth channel's weights are zero
        else:
            raise ValueError(f"cannot map source weight {k} {tuple(s.shape)} to {tuple(v.shape)}")
    aux.load_state_dict(new_state)
    return aux.to(next(source.parameters()).device)
