"""The demo's "Adapt" tab: upload footage, adapt the served model to it in a child process, compare before / after.

One adaptation runs at a time (Gradio's queue, ``concurrency_limit=1``: other users wait with their queue position
shown); the job itself is :class:`~segadapt.demo.adapt_job.AdaptJob` (``segadapt adapt`` then ``segadapt export`` as
child processes), so the demo process never imports torch and survives a crash of the job. The source checkpoint
of a model is :attr:`AdaptSettings.checkpoint` (``segadapt demo --checkpoint``) for the served model, else the
``source_checkpoint`` recorded in the model's metadata by ``segadapt export`` when that path exists here.

The adapted model is exported with the served model's input and output into the served model's folder as
``<stem>.adapted-<time>.onnx`` (+ ``.json``), so it can replace the served file under a running runtime
(``segadapt predict --watch``; the demo's own predictor watches its file too).
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
                                     JobStatus, missing_adapt_modules, prepare_footage)
from segadapt.runtime.backends import BackendError
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
        st.message = (f"New model: `{st.onnx}` ({job.footage.note}). On these frames it changes {pct:.1f} % of the "
                      f"pixels' classes. **Serve the adapted model** swaps it into this demo; a runtime started with "
                      f"`segadapt predict --watch` takes it when it replaces its model file.")
        files = [str(st.onnx), str(metadata_path(st.onnx))]
        return status_markdown(st), progress_html(st), pair, items, files

    def serve(self, key: str) -> str:
        """Serve the session's adapted model: :meth:`ModelWatcher.install` over the served model's file."""
        job = self.jobs.get(key)
        if job is None or job.status.stage != "done":
            return "Nothing to serve: run an adaptation first."
        watcher = self.served.watcher
        if watcher is None:
            return (f"This demo does not watch its model (started with --no-watch): copy `{job.status.onnx}` over "
                    f"`{self.served.model_path}` and restart it.")
        ev = watcher.install(job.status.onnx)
        if not ev.swapped:
            return f"**Refused**: {ev.message}"
        label = next(k for k, v in self.models.items() if v[0] is self.served)
        self.models[label] = (self.served, job.run_dir / "adapted", "")  # the next adaptation continues from it
        return (f"**Serving** the adapted model (sha256 {ev.new_sha256[:12]}, was {ev.old_sha256[:12]}): "
                f"`{self.served.model_path}` now holds it; the Image and Video tabs use it.")


def build_adapt_tab(predictor: Predictor, reference: Optional[Predictor], settings: AdaptSettings) -> AdaptTab:
    """Add the Adapt tab's components and events to the current ``gr.Blocks`` (call inside ``gr.Tab``).

    Endpoints: ``/adapt_start`` (a generator: progress updates), ``/adapt_cancel`` and ``/adapt_serve``.
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
            serve = gr.Button("Serve the adapted model", visible=False)

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

    def serve_it(request: gr.Request):
        return tab.serve(getattr(request, "session_hash", None) or "default")

    serve.click(serve_it, None, status, api_name="adapt_serve")
    # no ``cancels=[event]``: Gradio would stop the generator between two of its updates, and a stale "Adapting"
    # update could land after the cancel's; the job ends its own process and reports it
    cancel.click(stop, None, status, api_name="adapt_cancel", concurrency_limit=None)
    return tab
