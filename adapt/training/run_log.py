"""What an adaptation run writes while it trains: the per-step log (``coverage.jsonl``), the label-free monitor's
plot, the debug grids, and the gradient-share diagnostic of the loss terms."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from segadapt.adapt.losses import weighted_ce
from segadapt.adapt.models.segmenter import upsample_logits
from segadapt.adapt.monitor import write_monitor_plot
from segadapt.adapt.pseudo_label import coverage_per_class, kept_share
from segadapt.adapt.training import distributed
from segadapt.adapt.training.debug import save_debug_grid
from segadapt.runtime.files import write_atomic

__all__ = ["StepLogger", "gradient_shares", "truncate_log"]


class StepLogger:
    """``<out>/coverage.jsonl`` (one JSON line per logged step: losses, pseudo-label coverage per class, thresholds,
    the label-free monitor's signals and the components' logs), the progress bar's postfix, ``<out>/debug/*.png``
    and ``<out>/monitor.png`` of an :class:`~segadapt.adapt.engine.Engine`. Data-parallel: rank 0 writes; logged
    values are means over the ranks. A resumed run first drops the lines after its checkpoint's step."""

    def __init__(self, engine, resumed: bool):
        self.e = engine
        path = engine.out / "coverage.jsonl"
        if resumed:
            if distributed.is_main():
                truncate_log(path, engine.start)
            distributed.barrier()
            engine.monitor.load_log(path)
        self.file = open(path if distributed.is_main() else os.devnull, "a")

    def log(self, step: int, s) -> Optional[str]:
        """Record step ``step`` (1-based count of steps done) from its :class:`~segadapt.adapt.methods.base.Step`;
        returns the monitor's stop reason when ``monitor.stop`` is on and its rule fired, else None."""
        e, cfg, pl = self.e, self.e.cfg, s.labels
        kept = kept_share(pl.mask, pl.valid)
        e.bar.set_postfix(loss=f"{s.logs.get('loss_pl', 0.0):.3f}", kept=f"{kept:.2f}", refresh=False)
        stop = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            cov = distributed.all_reduce_mean(coverage_per_class(pl.labels, e.K, e.ignore, pl.valid))
            th = pl.threshold
            th = th if torch.is_tensor(th) else torch.full((e.K,), float(th))
            shares = s.logs.pop("grad_share", None)
            rec = {"step": step, **distributed.mean_over_ranks({"kept": kept, **s.logs}),
                   "coverage": {n: round(float(c), 4) for n, c in zip(e.meta.classes.names, cov)},
                   "thresholds": [round(float(v), 3) for v in th]}
            if shares is not None:
                rec["grad_share"] = shares
            v = s.view
            rec.update(e.monitor.update(v.probs, v.anchor_probs, pl.labels, v.valid, step))
            stop = e.monitor.stop_reason() if cfg.monitor.stop else None
            stop = distributed.broadcast_object(stop)  # data-parallel: rank 0 decides, every rank stops
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        elif "grad_share" in s.logs:  # measured on a step that is not logged: keep it anyway
            self.file.write(json.dumps({"step": step, "grad_share": s.logs.pop("grad_share")}) + "\n")
        if cfg.debug_every and (step % cfg.debug_every == 0 or step == 1) and distributed.is_main():
            depth = s.batch.get("depth")
            r = s.reliability if s.reliability is not None else s.view.extra.get("reliability")
            save_debug_grid(e.out / "debug" / f"step_{step:06d}.png", s.image, pl.labels, e.meta.classes.palette,
                            e.ignore, r, depth.to(s.image.device) if depth is not None else None)
        s.view = None  # free the teacher's maps before the next step
        return stop

    def plot(self) -> None:
        """``<out>/monitor.png`` from the monitor's history (rank 0)."""
        if distributed.is_main():
            write_monitor_plot(self.e.monitor.history, self.e.out / "monitor.png", self.e.meta.classes.names,
                               self.e.log, self.e.meta.classes.palette)

    def close(self) -> None:
        self.file.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` from a JSON-lines log (written by a run that was killed after its
    last checkpoint; the resumed run writes them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
    write_atomic(path, "".join(k + "\n" for k in keep).encode())


def _grad_norm(loss: torch.Tensor, params: list) -> float:
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


def gradient_shares(terms: Dict[str, torch.Tensor], student, s, ignore_index: int) -> Dict[str, float]:
    """Each loss term's gradient norm on the student's backbone (the encoder) relative to the pseudo-label loss's
    (``terms["pl"]``), before the optimiser step; the graph is kept for the step's own backward.

    With a reliability r (the rectification-aware mixture loss), ``reliability`` is how much r changes the
    pseudo-label loss's gradient: ``|grad(mixture) - grad(weighted CE on the same labels)| / |grad(weighted CE)|``.

    Returns:
        {term name: float >= 0} (``pl`` itself is 1.0); {} under torchrun (one rank's graph would not say it).
    """
    if distributed.is_distributed():
        return {}
    params = distributed.unwrap(student).backbone_parameters()
    ref = _grad_norm(terms["pl"], params) or 1e-12
    out = {k: round(_grad_norm(v, params) / ref, 6) for k, v in terms.items()}
    v = s.strong
    if v.reliability is not None:
        logits = upsample_logits(s.student_logits.float(), tuple(v.x.shape[-2:]))
        ce = weighted_ce(logits, v.labels, v.weights, ignore_index)
        g_mix = torch.autograd.grad(terms["pl"], params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        diff = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(g_mix, g_ce) if a is not None)
        out["reliability"] = round(math.sqrt(diff) / (_grad_norm(ce, params) or 1e-12), 6)
    return out
