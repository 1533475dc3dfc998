"""The list of adaptation methods. Adding one = a module with a :class:`~segadapt.adapt.methods.base.Component`
subclass (with an ``enabled(cfg)`` static method) and one entry here. The order is the order in which the loop
calls their hooks within a step (the UDA mode draws its source batch first; SeCo fills labels before BiDA votes;
the rectifier reads the final labels)."""

from __future__ import annotations

from typing import List

from segadapt.adapt.methods.base import Component
from segadapt.adapt.methods.bida import BiDA
from segadapt.adapt.methods.rccr import RCCR
from segadapt.adapt.methods.rectifier import Rectifier
from segadapt.adapt.methods.rgbd_stream import RGBDStream
from segadapt.adapt.methods.seco import SeCo
from segadapt.adapt.methods.uda import UDAMode

__all__ = ["COMPONENTS", "build_components"]

COMPONENTS = (UDAMode, RGBDStream, SeCo, BiDA, Rectifier, RCCR)


def build_components(cfg) -> List[Component]:
    """The components an :class:`~segadapt.adapt.config.AdaptConfig` enables, in :data:`COMPONENTS` order (not yet
    set up: :meth:`~segadapt.adapt.methods.base.Component.setup` builds their modules)."""
    return [c(cfg) for c in COMPONENTS if c.enabled(cfg)]
