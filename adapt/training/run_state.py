"""Exact resume of an adaptation run: everything the next step depends on, written with each checkpoint and read
back on ``--resume`` (the student's weights are the checkpoint itself). ``engine`` below is the
:class:`~segadapt.adapt.engine.Engine`; each component saves and restores its own state."""

from __future__ import annotations

from segadapt.adapt.models.checkpoint import save_checkpoint
from segadapt.adapt.data.sampling import data_state
from segadapt.adapt.training import distributed
from segadapt.adapt.training.train_utils import rng_state, set_rng_state

__all__ = ["STATE_FORMAT", "restore_state", "save_state"]

#: version of ``training_state.pt``'s layout (components' states under ``components``)
STATE_FORMAT = 2


def save_state(engine, step: int, elapsed: float) -> None:
    """``<out>/last`` with everything the next step depends on (exact resume) and ``<out>/adapted``;
    data-parallel: every rank's RNG state, written by rank 0 only."""
    rng_ranks = distributed.gather_object(rng_state())  # None without torchrun
    if not distributed.is_main():
        return
    student = distributed.unwrap(engine.student)
    ts = {"format": STATE_FORMAT, "teacher": engine.teacher.model.state_dict(), "optimizer": engine.opt.state_dict(),
          "step": step, "elapsed": elapsed, "rng": rng_state(), "data": data_state(engine.loader, step),
          "tracker": engine.tracker.state_dict(), "components": {c.name: c.state_dict() for c in engine.components}}
    if rng_ranks is not None:
        ts["rng_ranks"], ts["world_size"] = rng_ranks, len(rng_ranks)
    if engine.anchor is not None:
        ts["anchor"] = engine.anchor.state_dict()
    if engine.class_weights is not None:
        ts["class_weights"] = engine.class_weights.state_dict()
    engine.out_meta.info.update(step=step)
    keep = engine.teacher.model if engine.cfg.keep == "teacher" else student
    if engine.cfg.keep_saves or engine.cfg.select == "auto":  # before last/: a kill after it cannot lose this copy
        save_checkpoint(engine.out / "saves" / f"step_{step:06d}", keep, engine.out_meta)
    save_checkpoint(engine.out / "last", student, engine.out_meta, ts)
    save_checkpoint(engine.out / "adapted", keep, engine.out_meta)

def restore_state(engine, state: dict) -> None:
    """Everything :meth:`save` wrote into the training state, the RNG states last."""
    if engine.anchor is not None:
        engine.anchor.load_state_dict(state["anchor"])
    engine.teacher.model.load_state_dict(state["teacher"])
    engine.opt.load_state_dict(state["optimizer"])
    engine.tracker.load_state_dict(state["tracker"])
    if engine.class_weights is not None and "class_weights" in state:
        engine.class_weights.load_state_dict(state["class_weights"])
    saved = state.get("components", {})
    for c in engine.components:
        if c.name not in saved:
            raise ValueError(f"{engine.resume_dir}: the run being resumed did not use {c.name}; resume with its own "
                             "settings (its config is in last/config.json) or start fresh")
        c.load_state_dict(saved[c.name])
    engine.start, engine.elapsed_before = int(state["step"]), float(state["elapsed"])
    set_rng_state(state["rng"])
