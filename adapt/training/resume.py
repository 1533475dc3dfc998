"""``--resume`` for the training commands: which checkpoint a run continues from.

``--resume`` (true) continues from ``<out>/last`` and is an error when there is nothing to continue from;
``--resume auto`` continues when it can and otherwise says "starting fresh"; ``--resume false`` (the default)
starts fresh. When a run was killed inside the checkpoint swap, ``<out>/last`` may be missing or incomplete while
``<out>/last.prev`` is complete: the run continues from that one (and says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Optional, Union

from segadapt.adapt.models.checkpoint import resumable_checkpoint
from segadapt.runtime.files import manifest_problem


def why(d: Path) -> str:
    """Why checkpoint folder ``d`` cannot be resumed from, in one phrase naming the file."""
    if not (d / "training_state.pt").is_file():
        return f"{d / 'training_state.pt'} is missing"
    return manifest_problem(d, verify_hashes=True, legacy_ok=True) or f"{d / 'config.json'} is not a checkpoint's"

#: the values of the ``resume`` config field
ResumeMode = Literal[False, True, "auto"]


def resume_from(out: Union[str, Path], mode: Union[bool, str], log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint folder a run in ``out`` continues from, or None to start fresh.

    Args:
        out: the run's output folder (``<out>/last`` is its resumable checkpoint).
        mode: False (start fresh), True (must resume) or ``"auto"`` (resume when possible).
        log: where the choice is reported.

    Raises:
        ValueError: ``mode`` is True and ``<out>`` holds no complete checkpoint with a training state (one line
            naming the folder).
    """
    if mode is False or mode in ("false", "no"):
        return None
    last = Path(out) / "last"
    found = resumable_checkpoint(last)
    if found is None:
        if mode == "auto":
            log(f"--resume auto: no complete checkpoint in {last}; starting fresh")
            return None
        state = f"is incomplete: {why(last)}" if last.exists() else "does not exist"
        raise ValueError(f"--resume: nothing to resume in {out}: {last} {state}; and there is no complete "
                         f"{last.name}.prev (use --resume auto to start fresh when there is nothing)")
    if found != last:
        what = f"is incomplete ({why(last)})" if last.exists() else "is missing"
        log(f"{last} {what}: the run was stopped while saving; resuming from the previous complete checkpoint "
            f"{found}")
    return found


__all__ = ["ResumeMode", "resume_from"]


def clear_stale_saves(out: str | Path, resumed: bool, log: Callable[[str], None]) -> int:
    """A fresh run (not ``resumed``) in a folder that holds ``saves/`` of an earlier run removes them, so that only
    this run's saves become label-free selection candidates (its ``adapted/`` and ``last/`` are replaced anyway).
    Returns how many saves were removed."""
    import shutil

    saves = Path(out) / "saves"
    if resumed or not saves.is_dir():
        return 0
    n = len(list(saves.glob("step_*")))
    shutil.rmtree(saves)
    log(f"{saves}: removed {n} saves of an earlier run in this folder (a fresh run replaces its models)")
    return n
