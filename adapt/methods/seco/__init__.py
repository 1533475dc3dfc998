"""SeCo (Zhao et al., "Connectivity-Driven Pseudo-Labeling Makes Stronger Cross-Domain Segmenters", NeurIPS 2024)
as a component: an offline pseudo-label pass before the first step (:mod:`.labels`: pixel labels of the source model
after AdaBN, Pixel Semantic Aggregation over SAM masks or superpixels, :mod:`.regions`, and Semantic Connectivity
Correction, :mod:`.scc`), whose labels travel with the frames and join the online pseudo-labels each step
(``seco.merge``)."""

from __future__ import annotations

import torch

from segadapt.adapt.methods.base import Component, PseudoLabels, RunContext, Step
from segadapt.adapt.methods.seco.labels import LABEL_DIR, FixedLabels, merge_fixed, run_seco
from segadapt.adapt.models.checkpoint import checkpoint_hash, is_checkpoint
from segadapt.adapt.training import distributed
from segadapt.adapt.training.train_utils import rng_state, set_rng_state

__all__ = ["SeCo"]


class SeCo(Component):
    """The component (module docstring); ``seco.enabled``."""

    name = "seco"

    @staticmethod
    def enabled(cfg) -> bool:
        return cfg.seco.enabled

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, run: RunContext) -> None:
        """The pass (or the reuse of ``<out>/seco_labels/`` made from the same inputs), on the main process; the
        global RNG state is kept as it was, so a run that reuses the labels trains exactly like the run that made
        them. The training frames then carry ``fixed_pseudo_label``.

        Raises:
            ValueError: the class file has no ``stuff`` flags and a class name without a built-in one.
        """
        cfg = self.cfg
        self.ignore = run.ignore_index
        stuff = run.classes.stuff_flags()
        frames = run.frames()
        fp = {"source": checkpoint_hash(cfg.checkpoint) if is_checkpoint(cfg.checkpoint) else str(cfg.checkpoint),
              "size": list(run.size), "adabn": cfg.adabn, "frames": len(frames),
              "names": [f.name for f in getattr(frames, "files", [])]}
        if cfg.adabn and cfg.adabn_layers < 1:  # only then: labels of earlier runs stay reusable
            fp["adabn_layers"] = cfg.adabn_layers
        if cfg.adabn and cfg.adabn_alpha < 1:
            fp["adabn_alpha"] = cfg.adabn_alpha
        rng = rng_state()
        if distributed.is_main():  # data-parallel: one rank writes the labels, every rank reads them
            run_seco(run.source_model, frames, run.out, cfg.seco, stuff, self.ignore, run.mean, run.std, run.device,
                     fp, cfg.seed, run.log)
        distributed.barrier()
        set_rng_state(rng)
        run.dataset.transform = FixedLabels(run.out / LABEL_DIR, run.dataset.transform)

    def refine(self, s: Step, pl: PseudoLabels) -> PseudoLabels:
        """Join the batch's SeCo labels (``batch["fixed_pseudo_label"]``) to the online ones by ``seco.merge``
        (weight ``seco.fill_weight`` where SeCo alone labels; the loop's class-frequency weights come after);
        logs ``seco_changed``, the share of real pixels whose label the merge changed."""
        if "fixed_pseudo_label" not in s.batch:
            return pl
        fixed = s.batch["fixed_pseudo_label"].to(pl.labels.device)
        labels, mask, weights = merge_fixed(pl.labels, pl.mask, pl.weights, fixed, self.cfg.seco.merge,
                                            self.cfg.seco.fill_weight, self.ignore)
        changed = labels != pl.labels
        real = pl.valid if pl.valid is not None else torch.ones_like(changed)
        s.logs["seco_changed"] = float((changed & real).sum()) / max(1, int(real.sum()))
        return PseudoLabels(labels, mask, weights, pl.threshold, pl.valid)
