"""``segadapt adapt --select auto``: after training, score every candidate and let one rule pick what ``adapted/``
holds, with a verdict against the source model.

Candidates, in the order they are scored: AdaBN at the run's blend (the reference for agreement and drift: the
model self-training started from), the source model as it is, AdaBN at the other blends (``selection.blends``) and
every save of the run (``saves/step_<N>``, written at each ``--save-every`` and at the last step; a save is loaded,
never rebuilt). Each is scored on the same frames (:func:`~segadapt.adapt.selection_scores.validation_frames`) by
every validator; the rule (``selection.rule``) picks one and :func:`~segadapt.adapt.selection.verdict` compares it
with the source model. ``<out>/selection.json`` records each candidate's values, the pick, the rule and the verdict;
``adapted/`` is rewritten with the pick (its ``config.json`` carries the verdict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

from segadapt.adapt.adabn import adabn_source_model
from segadapt.adapt.models.checkpoint import load_segmenter, save_checkpoint
from segadapt.adapt.selection import pick, verdict
from segadapt.adapt.selection_scores import score_model, validation_frames
from segadapt.runtime.files import write_json

__all__ = ["BLENDS", "candidates", "select_adapted"]

#: AdaBN blends scored besides the run's own (with ``selection.blends``)
BLENDS = (0.5, 0.75, 1.0)


def candidates(engine, frames) -> List[Tuple[str, Callable]]:
    """``[(name, build)]`` where ``build()`` returns the candidate model (eval mode, on the run's device).

    Args:
        engine: the finished :class:`~segadapt.adapt.engine.Engine` (reads ``cfg``, ``device``, ``anchor``, ``out``).
        frames: the target frames at the run's size without augmentation (for the AdaBN blends).
    """
    cfg, dev, ref = engine.cfg, engine.device, engine.anchor
    ref_name = f"adabn_{cfg.adabn_alpha:g}" if cfg.adabn else "source"
    out = [(ref_name, (lambda: ref) if ref is not None else
            (lambda: adabn_source_model(cfg.checkpoint, frames, dev, cfg.adabn_alpha, cfg.adabn_layers,
                                        cfg.adabn)[0]))]
    if cfg.adabn:
        out.append(("source", lambda: load_segmenter(cfg.checkpoint, map_location=dev)[0].eval()))
        for b in BLENDS if cfg.selection.blends else ():
            if b != cfg.adabn_alpha:
                out.append((f"adabn_{b:g}", lambda b=b: adabn_source_model(cfg.checkpoint, frames, dev, b,
                                                                             cfg.adabn_layers)[0]))
    for save in sorted((engine.out / "saves").glob("step_*")):
        out.append((save.name, lambda p=save: load_segmenter(p, map_location=dev)[0].eval()))
    return out


def select_adapted(engine, log: Callable[[str], None] = print) -> dict:
    """Score the candidates, pick one by ``selection.rule``, rewrite ``<out>/adapted`` with it and write
    ``<out>/selection.json``. Returns the selection record (``rule``, ``picked``, ``verdict``, ``margin``, ``reason``,
    ``seconds``, ``candidates``: {name: {validator: value}}).

    Raises:
        ValueError: no saves in ``<out>/saves`` (the run saved nothing) or an unknown rule.
    """
    import copy
    import time

    cfg, t0 = engine.cfg, time.time()
    plain = engine.plain_frames(depth=False)  # built once: for a video, each build is a pass over its index
    frames = validation_frames(plain, cfg.selection.frames)
    meta = copy.deepcopy(engine.out_meta)
    scores: Dict[str, dict] = {}
    reference, kept = None, {}
    for name, build in candidates(engine, plain):
        model = build()
        vals, pred = score_model(model, frames, meta.mean, meta.std, engine.device, reference, seed=cfg.seed)
        if reference is None:  # the first candidate is the reference itself
            reference, vals["agreement"], vals["drift"] = pred, 1.0, 0.0
        scores[name] = vals
        kept[name] = model if not name.startswith("step_") else None  # saves are read back from disk
    p = pick(scores, cfg.selection.rule)
    v = verdict(scores, p, cfg.selection.confidence, seed=cfg.seed)
    record = {"rule": p.rule, "picked": p.name, "verdict": v.verdict, "margin": v.margin, "reason": v.reason,
              "interval": v.interval, "validator": p.validator, "frames": len(frames.indices),
              "seconds": time.time() - t0, "candidates": scores}
    model = kept.get(p.name)
    if model is None:
        model = load_segmenter(engine.out / "saves" / p.name, map_location=engine.device)[0]
    meta.info["step"] = int(p.name[len("step_"):]) if p.name.startswith("step_") else 0  # the pick's own step
    meta.info["selection"] = {k: record[k] for k in ("rule", "picked", "verdict", "margin", "reason")}
    save_checkpoint(engine.out / "adapted", model, meta)
    write_json(Path(engine.out) / "selection.json", record)
    log(f"selection ({p.rule}, {len(scores)} candidates, {record['seconds']:.1f} s): adapted/ holds {p.name}; "
        f"verdict: {v.verdict} ({v.reason})")
    return record
