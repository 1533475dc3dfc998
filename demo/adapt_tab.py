"""The demo's "Adapt" tab: upload footage, adapt the served model to it in a child process, compare before / after.

One adaptation runs at a time (Gradio's queue, ``concurrency_limit=1``: other users wait with their queue position
shown); the job itself is :class:`~segadapt.demo.adapt_job.AdaptJob` (``segadapt adapt`` then ``segadapt export`` as
child processes), so the demo process never imports torch and survives a crash of the job. The source checkpoint
of a model is :attr:`AdaptSettings.checkpoint` (``segadapt demo --checkpoint``) for the served model, else the
``source_checkpoint`` recorded in the model's metadata by ``segadapt export`` when that path exists here.

The adapted model is exported with the served model's input and output into the served model's folder as
``<stem>.adapted-<time>.onnx`` (+ ``.json``), so it can replace the served file under a running runtime
(``segadapt predict --watch``; the demo's own predictor watches its file too).

The adaptation states a verdict (is the model it picked expected to beat the reference model?); the result shows it,
and serving a model whose verdict is not ``better`` takes a second click. Serving first keeps the replaced model and
its metadata beside it (``<stem>.previous-<time>.onnx``, see :func:`~segadapt.runtime.hot_swap.keep_copy`);
**Revert to the previous model** serves that copy again.
"""


import html
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from segadapt.demo.adapt_job import (INSTALL_HINT, PRESETS, AdaptJob, Budget, Footage, FootageCaps, FootageError,
                                     JobStatus, missing_adapt_modules, prepare_footage, read_selection)
from segadapt.runtime.backends import BackendError
from segadapt.runtime.hot_swap import file_sha256, keep_copy
from segadapt.runtime.metadata import margin_text
from segadapt.runtime.predictor import Predictor

CUSTOM = "Custom"


@dataclass
class AdaptSettings:
    """What the Adapt tab needs besides the predictors.

    Attributes:
        checkpoint: the served model's source checkpoint ("" = the path in its metadata, when it exists here).
        caps: limits on uploads.
        work_dir: job folders go here ("" = a temporary folder).
        out_dir: adapted models go here ("" = beside the served model, or the job folder if that is not writable).
        max_steps: the largest step budget the tab accepts.
        compare_frames: frames of the footage shown before / after.
        presets: the budget presets offered (label -> :class:`Budget`; the first is preselected).
    """

    checkpoint: str = ""
    caps: FootageCaps = field(default_factory=FootageCaps)
    work_dir: str = ""
    out_dir: str = ""
    max_steps: int = 5000
    compare_frames: int = 4
    presets: Dict[str, Budget] = field(default_factory=lambda: dict(PRESETS))


def source_checkpoint(pred: Predictor, override: str = "") -> Tuple[Optional[Path], str]:
    """The checkpoint a served model was exported from: ``(path, "")``, or ``(None, why not)``."""
    if override:
        p = Path(override)
        return (p, "") if p.exists() else (None, f"--checkpoint {override} does not exist")
    rec = pred.metadata.source_checkpoint
    if rec and Path(rec).exists():
        return Path(rec), ""
    where = f"its metadata names {rec}, which is not on this machine" if rec else "its metadata names none"
    return None, (f"the source checkpoint of {Path(str(pred.model_path)).name} is unknown ({where}); start the demo "
                  f"with --checkpoint DIR (the segadapt checkpoint it was exported from)")


def status_markdown(st: JobStatus) -> str:
    """One line for the page: stage, step, pseudo-label share, loss, time (and the message of a finished job)."""
    head = {"starting": "Starting", "adapting": "Adapting", "exporting": "Exporting to ONNX", "done": "Done",
            "failed": "Failed", "cancelled": "Cancelled"}[st.stage]
    if st.stage == "adapting" and st.kept is None:
        head = "Adapting (loading the model, BatchNorm statistics of your frames)"
    parts = [f"**{head}**", f"step {st.step} / {st.steps}"]
    if st.kept is not None:
        parts.append(f"pseudo-labels on {st.kept * 100:.1f} % of pixels")
    if "loss_pl" in st.losses:
        parts.append(f"loss {st.losses['loss_pl']:.3f}")
    parts.append(f"{st.seconds:.0f} s")
    line = " · ".join(parts)
    return f"{line}\n\n{st.message}" if st.message else line


def verdict_markdown(selection: dict) -> str:
    """Markdown for the adaptation's verdict (from :func:`~segadapt.demo.adapt_job.read_selection`): the verdict,
    the validator margin and the reason; for ``no better`` also that adaptation is not expected to help, for
    ``uncertain`` that the frames cannot tell; and which candidate the run picked. "" when ``selection`` has no
    verdict."""
    verdict = str(selection.get("verdict") or "")
    if not verdict:
        return ""
    margin = margin_text(selection, "validator margin")
    reason = str(selection.get("reason") or "").strip()
    reason = f": {reason}" + ("" if reason.endswith((".", "!", "?")) else ".") if reason else "."
    picked = str(selection.get("picked") or "")
    if verdict == "better":
        return f"**Verdict: better than the model it started from**{margin}{reason}" + (
            f" The run picked `{picked}`." if picked else "")
    what = ("the reference model's own weights (`source`)" if picked == "source" else f"`{picked}`" if picked
            else "a candidate")
    if verdict == "no better":
        return (f"**Verdict: no better than the model it started from**{margin}{reason} Adaptation is not expected "
                f"to help on this footage; the run picked {what}.")
    return (f"**Verdict: {verdict}**{margin}{reason} The unlabelled frames cannot tell whether adaptation helped; "
            f"score a few labelled frames before serving it. The run picked {what}.")


def progress_html(st: JobStatus, top: int = 6) -> str:
    """A progress bar and the pseudo-label coverage of the classes with the most pixels (last step)."""
    rows = "".join(
        f'<div style="font-family:monospace">{html.escape(n)[:14]:<14} '
        f'<span style="display:inline-block;height:10px;width:{max(1, round(v * 200))}px;background:#4a7"></span> '
        f'{v * 100:.1f} %</div>'
        for n, v in sorted(st.coverage.items(), key=lambda kv: -kv[1])[:top])
    return (f'<div class="segadapt-adapt-progress"><progress max="{max(1, st.steps)}" value="{st.step}" '
            f'style="width:100%"></progress>'
            + (f"<div>pseudo-label coverage per class (step {st.step})</div>{rows}" if rows else "") + "</div>")


def compare(reference: Predictor, adapted: Predictor, footage: Footage, n: int = 4
            ) -> Tuple[Tuple[np.ndarray, np.ndarray], List[Tuple[np.ndarray, str]], float]:
    """Before / after on ``n`` evenly spaced frames of the footage.

    Returns:
        (reference overlay, adapted overlay) of the middle frame, each (H, W, 3) uint8; gallery items (the two
        overlays one above the other, (2H, W, 3), and a caption); share of pixels whose class changed over the
        ``n`` frames, in percent.
    """
    import cv2

    files = footage.files()
    pick = [files[round(i * (len(files) - 1) / max(1, n - 1))] for i in range(min(n, len(files)))]
    items, changed, total, pairs = [], 0, 0, []
    for f in pick:
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        a, b = reference.predict(rgb).class_map, adapted.predict(rgb).class_map
        pairs.append((reference.overlay(rgb, a), adapted.overlay(rgb, b)))
        diff = int((a != b).sum())
        changed, total = changed + diff, total + a.size
        items.append((np.concatenate(pairs[-1], axis=0), f"{f.name}: before (top), after (bottom): "
                      f"{diff / a.size * 100:.1f} % of pixels changed"))
    return pairs[len(pairs) // 2], items, changed / max(1, total) * 100


@dataclass
class Kept:
    """What one serve replaced: the kept copy of the model file (``path``), the tab's model label and its entry
    (predictor, checkpoint, why-not) before the serve, and the adapted model file that was served."""

    path: Path
    label: str
    entry: Tuple[Predictor, Optional[Path], str]
    adapted: Path


def _remove_copy(path: Path) -> None:
    """Delete a kept copy and its metadata file (best effort)."""
    from segadapt.runtime.metadata import metadata_path

    for p in (path, metadata_path(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


class AdaptTab:
    """The tab's state and callbacks (one running job per browser session, at most one at a time overall)."""

    def __init__(self, predictor: Predictor, reference: Optional[Predictor], settings: AdaptSettings):
        self.settings, self.served = settings, predictor
        self.models: Dict[str, Tuple[Predictor, Optional[Path], str]] = {}
        for role, pred, override in (("served", predictor, settings.checkpoint), ("reference", reference, "")):
            if pred is not None:
                ck, why = source_checkpoint(pred, override)
                self.models[f"{role}: {Path(str(pred.model_path)).name}"] = (pred, ck, why)
        self.work = Path(settings.work_dir or tempfile.mkdtemp(prefix="segadapt-adapt-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.missing = missing_adapt_modules()
        self.jobs: Dict[str, AdaptJob] = {}
        self.armed: Dict[str, AdaptJob] = {}  # session -> job whose serving was asked once despite its verdict
        self.previous: Dict[str, Kept] = {}  # session -> what its last serve replaced

    def availability(self) -> str:
        """Markdown: what the tab does, or why adaptation cannot run here and how to enable it."""
        c = self.settings.caps
        text = (f"Upload a clip (≤ {c.max_mb:.0f} MB, ≤ {c.max_seconds:.0f} s, ≤ {c.max_frames} frames) or frames of "
                f"your camera, pick the model to start from and a budget, and press **Start adaptation**. It runs "
                f"source-free self-training on up to {c.keep_frames} of your frames, then exports an ONNX model like "
                f"the served one. One adaptation runs at a time; others wait in a queue.")
        if self.missing:
            text += (f"\n\n**Adaptation is not available in this installation**: it needs "
                     f"{', '.join(self.missing)}. Install the extra and restart the demo: `{INSTALL_HINT}`.")
        bad = [f"{label}: {why}" for label, (_, ck, why) in self.models.items() if ck is None]
        if bad:
            text += "\n\n" + "\n\n".join(f"**{b}**" for b in bad)
        return text

    def budget(self, preset: str, steps: float, minutes: float) -> Budget:
        presets = self.settings.presets
        base = presets.get(preset, next(iter(presets.values())))
        return Budget(steps=int(steps), minutes=float(minutes or 0), batch_size=base.batch_size, device=base.device)

    def new_job(self, files, model_label: str, budget: Budget) -> AdaptJob:
        """Check everything and prepare the footage; the job is not started.

        Raises:
            FootageError: missing modules, unknown checkpoint, bad budget or footage (messages for the user).
        """
        if self.missing:
            raise FootageError(f"Adaptation needs {', '.join(self.missing)}: {INSTALL_HINT}")
        if model_label not in self.models:
            raise FootageError("Choose the model to adapt.")
        pred, ck, why = self.models[model_label]
        if ck is None:
            raise FootageError(why)
        if not 1 <= budget.steps <= self.settings.max_steps:
            raise FootageError(f"Steps must be between 1 and {self.settings.max_steps} (max_steps).")
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        job_dir = Path(tempfile.mkdtemp(prefix=time.strftime("job-%Y%m%d-%H%M%S-"), dir=self.work))
        footage = prepare_footage(paths, job_dir, self.settings.caps)
        model = Path(str(pred.model_path))
        out = Path(self.settings.out_dir) if self.settings.out_dir else model.parent
        if not os.access(out, os.W_OK):
            out = job_dir
        name = f"{model.stem}.adapted-{time.strftime('%Y%m%d-%H%M%S')}"
        return AdaptJob(ck, footage, job_dir, pred.metadata, out, name, budget)

    def result(self, model_label: str, job: AdaptJob):
        """Final outputs of a finished job: status, progress, before / after slider, gallery, download files."""
        from segadapt.runtime.metadata import metadata_path

        st = job.status
        ref = self.models[model_label][0]
        new = Predictor(st.onnx, providers=["cpu"])
        pair, items, pct = compare(ref, new, job.footage, self.settings.compare_frames)
        verdict = verdict_markdown(read_selection(job.run_dir) or new.metadata.adaptation)
        st.message = ((f"{verdict}\n\n" if verdict else "")
                      + f"New model: `{st.onnx}` ({job.footage.note}). On these frames it changes {pct:.1f} % of the "
                      f"pixels' classes. **Serve the adapted model** swaps it into this demo; a runtime started with "
                      f"`segadapt predict --watch` takes it when it replaces its model file.")
        files = [str(st.onnx), str(metadata_path(st.onnx))]
        return status_markdown(st), progress_html(st), pair, items, files

    def serve(self, key: str) -> str:
        """Serve the session's adapted model over the served model's file (:meth:`ModelWatcher.install`), after
        keeping a copy of the file it replaces (:func:`keep_copy`) for :meth:`revert`.

        When the run's verdict is ``no better`` or ``uncertain``, the first call only warns (markdown) and arms; the
        next call of the same session for the same job serves. Never raises: every failure is the returned message.
        """
        job = self.jobs.get(key)
        if job is None or job.status.stage != "done":
            return "Nothing to serve: run an adaptation first."
        watcher = self.served.watcher
        if watcher is None:
            return (f"This demo does not watch its model (started with --no-watch): copy `{job.status.onnx}` over "
                    f"`{self.served.model_path}` and restart it.")
        sel = read_selection(job.run_dir)
        if sel and sel.get("verdict") != "better" and self.armed.get(key) is not job:
            self.armed[key] = job
            return (f"**Not served yet.** {verdict_markdown(sel)}\n\nPress **Serve the adapted model** again to "
                    f"serve it anyway; the current model is kept and **Revert to the previous model** brings it back.")
        self.armed.pop(key, None)
        served = Path(str(self.served.model_path))
        try:
            if file_sha256(served) == file_sha256(job.status.onnx):
                return f"Already serving this adapted model: `{served.name}` holds it."
            kept = keep_copy(served)
        except OSError as e:
            return f"**Not served**: the current model could not be kept first, so it keeps serving ({e})."
        try:
            ev = watcher.install(job.status.onnx)
        except OSError as e:
            _remove_copy(kept)
            return f"**Not served**: {e}; the current model keeps serving."
        if not ev.swapped:
            _remove_copy(kept)
            return f"**Refused**: {ev.message}"
        label = next(k for k, v in self.models.items() if v[0] is self.served)
        self.previous[key] = Kept(kept, label, self.models[label], Path(job.status.onnx))
        self.models[label] = (self.served, job.run_dir / "adapted", "")  # the next adaptation continues from it
        return (f"**Serving** the adapted model (sha256 {ev.new_sha256[:12]}, was {ev.old_sha256[:12]}): "
                f"`{served.name}` now holds it; the Image and Video tabs use it. The model it replaced is kept as "
                f"`{kept.name}`: **Revert to the previous model** serves it again.")

    def revert(self, key: str) -> str:
        """Serve again the model the session's last :meth:`serve` replaced (its kept copy, through the same watcher).

        The served file is copied first unless it is the adapted model, whose own file still exists. Never raises:
        every failure is the returned message (the current model then keeps serving).
        """
        prev, watcher = self.previous.get(key), self.served.watcher
        if prev is None or watcher is None:
            return "Nothing to revert: serve an adapted model first."
        if not prev.path.is_file():
            return f"The kept copy `{prev.path.name}` is gone; nothing was changed."
        served = Path(str(self.served.model_path))
        note = f" The adapted model stays in `{prev.adapted.name}`."
        try:
            if not (prev.adapted.is_file() and file_sha256(prev.adapted) == file_sha256(served)):
                note = f" The model it replaced is kept as `{keep_copy(served).name}`."
        except OSError as e:
            return f"**Not reverted**: the current model could not be kept first, so it keeps serving ({e})."
        try:
            ev = watcher.install(prev.path)
        except OSError as e:
            return f"**Not reverted**: {e}; the current model keeps serving."
        if not ev.swapped:
            return f"**Refused**: {ev.message}"
        self.models[prev.label] = prev.entry  # adaptations start from the reverted model's checkpoint again
        del self.previous[key]
        return (f"**Reverted**: serving the previous model again (sha256 {ev.new_sha256[:12]}, from "
                f"`{prev.path.name}`); `{served.name}` holds it.{note}")


def build_adapt_tab(predictor: Predictor, reference: Optional[Predictor], settings: AdaptSettings) -> AdaptTab:
    """Add the Adapt tab's components and events to the current ``gr.Blocks`` (call inside ``gr.Tab``).

    Endpoints: ``/adapt_start`` (a generator: progress updates), ``/adapt_cancel``, ``/adapt_serve`` and
    ``/adapt_revert``.
    """
    import gradio as gr

    tab = AdaptTab(predictor, reference, settings)
    caps = settings.caps
    gr.Markdown(tab.availability())
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label=f"Clip or frames (≤ {caps.max_mb:.0f} MB, ≤ {caps.max_seconds:.0f} s, "
                            f"≤ {caps.max_frames} frames)", file_count="multiple", type="filepath",
                            elem_id="adapt-files")
            labels = list(tab.models)
            model = gr.Dropdown(labels, value=labels[0], label="Start from (reference model)")
            presets = settings.presets
            first = next(iter(presets.values()))
            preset = gr.Radio([*presets, CUSTOM], value=next(iter(presets)), label="Budget")
            steps = gr.Slider(1, settings.max_steps, value=first.steps, step=1, label="Steps")
            minutes = gr.Number(value=first.minutes, label="Time cap (minutes, 0 = none)", minimum=0)
            with gr.Row():
                start = gr.Button("Start adaptation", variant="primary", interactive=not tab.missing)
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=2):
            status = gr.Markdown("Idle.", elem_id="adapt-status")
            progress = gr.HTML()
            slider = gr.ImageSlider(label="Before / after (reference | adapted)", height=300, elem_id="adapt-slider")
            gallery = gr.Gallery(label="Frames of your footage: reference (top) and adapted (bottom)", columns=2,
                                 height=320, object_fit="contain", elem_id="adapt-gallery")
            download = gr.File(label="Adapted model and its metadata", file_count="multiple", elem_id="adapt-download")
            with gr.Row():
                serve = gr.Button("Serve the adapted model", visible=False)
                revert = gr.Button("Revert to the previous model", visible=False)

    def on_preset(name):
        b = presets.get(name)
        return (gr.update(), gr.update()) if b is None else (b.steps, b.minutes)

    def run(files, model_label, preset_name, n_steps, n_minutes, request: gr.Request):
        try:
            job = tab.new_job(files, model_label, tab.budget(preset_name, n_steps, n_minutes))
        except (FootageError, OSError) as e:
            raise gr.Error(str(e))
        tab.jobs[getattr(request, "session_hash", None) or "default"] = job  # this session's latest job
        for st in job.run():
            if st.stage == "done":
                break
            yield status_markdown(st), progress_html(st), gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False)
        if job.status.stage == "done":
            try:
                yield *tab.result(model_label, job), gr.update(visible=True)
            except (BackendError, OSError, ValueError) as e:  # the exported file does not load here
                raise gr.Error(f"The adapted model was written to {job.status.onnx} but cannot be compared: {e}")

    def stop(request: gr.Request):
        job = tab.jobs.get(getattr(request, "session_hash", None) or "default")
        if job is None or job.status.finished:
            return "Nothing to cancel."
        job.cancel()  # the running job's own generator then writes "Cancelled ...": one writer of the status line
        return gr.skip()

    preset.change(on_preset, preset, [steps, minutes], queue=False)
    start.click(run, [files, model, preset, steps, minutes], [status, progress, slider, gallery, download, serve],
                api_name="adapt_start", concurrency_limit=1, concurrency_id="adapt")

    _serving_events(tab, serve, revert, status)
    # no ``cancels=[event]``: Gradio would stop the generator between two of its updates, and a stale "Adapting"
    # update could land after the cancel's; the job ends its own process and reports it
    cancel.click(stop, None, status, api_name="adapt_cancel", concurrency_limit=None)
    return tab


def _serving_events(tab: AdaptTab, serve, revert, status) -> None:
    """Wire the serve and revert buttons (endpoints ``/adapt_serve``, ``/adapt_revert``): each answers in ``status``
    and shows the revert button while the session has a served model to revert."""
    import gradio as gr

    def serve_it(request: gr.Request):
        key = getattr(request, "session_hash", None) or "default"
        return tab.serve(key), gr.update(visible=key in tab.previous)

    def revert_it(request: gr.Request):
        key = getattr(request, "session_hash", None) or "default"
        return tab.revert(key), gr.update(visible=key in tab.previous)

    serve.click(serve_it, None, [status, revert], api_name="adapt_serve")
    revert.click(revert_it, None, [status, revert], api_name="adapt_revert")
