"""The Gradio demo: segment images and video in the browser, source vs adapted side by side.

``create_demo(predictor, reference=None)`` builds the app from runtime Predictors (ONNX Runtime, OpenVINO or
TensorRT); nothing is loaded at import time. The callbacks are plain functions (``segment_image``,
``segment_clip``) so they can be tested without a server. Bad input (not an image, an empty or huge video) raises
``gr.Error`` with a readable message, never a traceback.
"""

from __future__ import annotations

import html
import os
import tempfile
import uuid
import time
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

from segadapt.runtime.files import IMAGE_SUFFIXES
from segadapt.runtime.predictor import Predictor


from segadapt.demo.uploads import DemoError, UploadCaps, check_video_upload, read_image_upload

__all__ = ["DemoError", "UploadCaps", "create_demo", "launch", "legend_html", "segment_clip", "segment_image"]


def legend_html(predictor: Predictor, shares: Optional[dict] = None) -> str:
    """HTML legend: a colour swatch per class, with its share of the frame (percent) when given."""
    rows = []
    for name, col in zip(predictor.metadata.classes, predictor.metadata.palette):
        share = "" if shares is None else f"{shares.get(name, 0.0) * 100:5.1f} %"
        rows.append(f'<div style="display:flex;align-items:center;gap:6px;font-family:monospace">'
                    f'<span style="width:14px;height:14px;background:rgb({col[0]},{col[1]},{col[2]});'
                    f'display:inline-block;border:1px solid #444"></span>{html.escape(name)} {share}</div>')
    return '<div class="segadapt-legend">' + "".join(rows) + "</div>"


def segment_image(predictor: Predictor, image, alpha: float = 0.5, caps: UploadCaps = UploadCaps()
                  ) -> Tuple[np.ndarray, np.ndarray, dict, float]:
    """Segment one image.

    Args:
        image: (H, W, 3) uint8 RGB (grey or RGBA images are converted), or an uploaded image file (checked against
            ``caps`` and for damage: :func:`~segadapt.demo.uploads.read_image_upload`).
        alpha: overlay opacity in [0, 1].

    Returns:
        overlay (H, W, 3) uint8, class map (H, W) uint8, class shares {name: fraction}, milliseconds (model call and
        pre/post-processing).

    Raises:
        DemoError: no image, an upload over a cap or damaged, or not an image array.
    """
    if image is None:
        raise DemoError("No image: upload one or pick an example.")
    if isinstance(image, (str, Path)):
        image = read_image_upload(image, caps)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if image.dtype.kind == "f" and image.size and image.max() <= 1.0:
            image = (image * 255).round()
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 8:
        raise DemoError(f"Not an image this demo can read (array of shape {image.shape}).")
    image = np.ascontiguousarray(image[..., :3])
    t = time.perf_counter()
    r = predictor.predict(image)
    ms = (time.perf_counter() - t) * 1e3
    return predictor.overlay(image, r.class_map, alpha), r.class_map, predictor.class_shares(r.class_map), ms


def segment_clip(predictor: Predictor, video_path: Optional[str], out_dir: str, alpha: float = 0.5,
                 max_seconds: float = 20.0, max_mb: float = 200.0, progress=None,
                 caps: Optional[UploadCaps] = None) -> Tuple[str, str]:
    """Segment an uploaded clip; returns (overlay video path (H.264 .mp4), status text).

    Args:
        max_seconds, max_mb: the duration and size caps (used when ``caps`` is None).
        caps: every upload cap (duration, size, frames, resolution); a clip over one is refused, naming it.

    Raises:
        DemoError: no file, a file over a cap, an empty, damaged or truncated file (the command line's message).
    """
    from segadapt.runtime.video import segment_video

    if not video_path:
        raise DemoError("No video: upload a clip first.")
    caps = caps or UploadCaps(video_seconds=max_seconds, video_mb=max_mb)
    p = Path(video_path)
    v = check_video_upload(p, caps)
    n = v.listed or v.present
    out = Path(out_dir) / f"{p.stem}_segmented_{uuid.uuid4().hex[:12]}.mp4"

    def cb(done, total):
        if progress is not None:
            progress(done / max(1, total or n), desc=f"frame {done}")

    try:
        rep = segment_video(predictor, p, out, alpha=alpha, max_frames=n, progress=cb)
    except ValueError as e:
        raise DemoError(f"Could not segment this video: {e}") from None
    status = (f"{rep.frames} frames in {rep.seconds:.1f} s: {rep.fps:.1f} frames/s end to end "
              f"(model {rep.stage_ms.get('infer', 0):.1f} ms/frame, {predictor.backend.describe()}), "
              f"codec {rep.codec}.")
    return str(out), status


def _examples(folder: Optional[str], limit: int = 12) -> List[str]:
    if not folder:
        return []
    d = Path(folder)
    if (d / "images").is_dir():
        d = d / "images"
    if not d.is_dir():
        return []
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    step = max(1, len(files) // limit)
    return [str(f) for f in files[::step][:limit]]


def create_demo(predictor: Predictor, reference: Optional[Predictor] = None, examples: Optional[str] = None,
                max_video_seconds: float = 20.0, max_video_mb: float = 200.0, title: str = "segadapt",
                caps: Optional[UploadCaps] = None, adapt=None):
    """Build the Gradio Blocks app.

    Args:
        predictor: the (adapted) model.
        reference: optional second model (e.g. source-only) shown side by side / with a before-after slider.
        examples: folder of example frames (a split directory or a plain folder).
        max_video_seconds, max_video_mb: caps on uploaded clips (used when ``caps`` is None).
        caps: every upload cap (:class:`~segadapt.demo.uploads.UploadCaps`); an upload over one is refused, naming it.
        adapt: the Adapt tab's settings (:class:`~segadapt.demo.adapt_tab.AdaptSettings`; None = defaults).

    Returns:
        a ``gr.Blocks``; call ``.queue(...).launch()``. Endpoints: ``/segment_image`` and ``/segment_video``.
    """
    import gradio as gr

    tmp = Path(tempfile.mkdtemp(prefix="segadapt-demo-"))
    caps = caps or UploadCaps(video_seconds=max_video_seconds, video_mb=max_video_mb)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nSemantic segmentation with an exported model "
                    f"({Path(str(predictor.model_path)).name}, {predictor.metadata.precision}). "
                    + ("Left: reference model, right: this model." if reference else ""))
        with gr.Tab("Image"):
            _image_tab(predictor, reference, examples, caps, tmp)
        with gr.Tab("Video"):
            _video_tab(predictor, caps, tmp)
        with gr.Tab("Adapt"):
            from segadapt.demo.adapt_tab import AdaptSettings, build_adapt_tab

            build_adapt_tab(predictor, reference, adapt or AdaptSettings())
    return demo


def _result_file(tmp: Path, stem: str, image: np.ndarray) -> str:
    """Write one result image (BGR or single-channel uint8) as a PNG under a name used once, and return its path.

    The image outputs are handed to Gradio as files, never as arrays: Gradio 6 stores an array under a name taken
    from its content and rewrites that file on every request, so while one client downloads an overlay another request
    with the same frame truncates it and the download ends early ("peer closed connection without sending complete
    message body", seen with 8 clients in ``tests/test_demo_load.py``). A file is copied into Gradio's cache once,
    atomically, and left alone afterwards.

    Raises:
        DemoError: the PNG could not be written (disk full, folder gone).
    """
    path = tmp / f"{stem}_{uuid.uuid4().hex}.png"
    if not cv2.imwrite(str(path), np.ascontiguousarray(image)):
        raise DemoError(f"{path}: could not write the result image")
    return str(path)


def _image_callback(predictor: Predictor, reference: Optional[Predictor], caps: UploadCaps, tmp: Path):
    """The ``/segment_image`` callback: (overlay, reference overlay, slider pair, legend, info, class-map PNG)."""
    import gradio as gr

    def run_image(image, alpha):
        try:
            if isinstance(image, str):  # decoded once, for both models
                image = read_image_upload(image, caps)
            ov, cm, shares, ms = segment_image(predictor, image, alpha, caps)
        except DemoError as e:
            raise gr.Error(str(e))
        png = _result_file(tmp, "class_map", cm)
        ov_png = _result_file(tmp, "overlay", ov[..., ::-1])
        info = f"**{ms:.1f} ms** on {predictor.backend.describe()}, input {predictor.size[0]}x{predictor.size[1]}"
        ref_png = None
        if reference is not None:
            ref_ov, _, ref_shares, ref_ms = segment_image(reference, image, alpha)
            ref_png = _result_file(tmp, "reference_overlay", ref_ov[..., ::-1])
            info += f" · reference {ref_ms:.1f} ms"
        return (ov_png, ref_png, (ref_png, ov_png) if ref_png is not None else None, legend_html(predictor, shares),
                info, png)

    return run_image


def _image_tab(predictor: Predictor, reference: Optional[Predictor], examples: Optional[str], caps: UploadCaps,
               tmp: Path) -> None:
    """The Image tab's contents (inside its ``gr.Tab``): frame, opacity, examples; overlays, legend, class map."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            inp = gr.Image(type="filepath", label="Frame", sources=["upload", "clipboard"], height=300)
            _pass_damaged_files(inp)
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            btn = gr.Button("Segment", variant="primary")
            ex = _examples(examples)
            if ex:
                gr.Examples(ex, inputs=inp, label="Example frames")
        with gr.Column(scale=2):
            with gr.Row():
                ref_img = gr.Image(label="Reference model", visible=reference is not None, height=300,
                                   format="png", interactive=False)
                out_img = gr.Image(label="Segmentation", height=300, format="png", interactive=False)
            slider = gr.ImageSlider(label="Before / after (reference | adapted)", visible=reference is not None,
                                    height=300)
            info = gr.Markdown()
            legend = gr.HTML(legend_html(predictor))
            dl = gr.File(label="Class map (PNG, value = class id)")
    btn.click(_image_callback(predictor, reference, caps, tmp), [inp, alpha],
              [out_img, ref_img, slider, legend, info, dl], api_name="segment_image")


def _video_tab(predictor: Predictor, caps: UploadCaps, tmp: Path) -> None:
    """The Video tab's contents (inside its ``gr.Tab``): clip upload and opacity; overlay video and status."""
    import gradio as gr

    def run_video(video, alpha, progress=gr.Progress()):
        try:
            return segment_clip(predictor, video, str(tmp), alpha, progress=progress, caps=caps)
        except DemoError as e:
            raise gr.Error(str(e))

    with gr.Row():
        with gr.Column():
            vin = gr.Video(label=f"Clip (up to {caps.video_seconds:.0f} s, {caps.video_mb:.0f} MB)",
                           sources=["upload"])
            valpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            vbtn = gr.Button("Segment video", variant="primary")
        with gr.Column():
            vout = gr.Video(label="Overlay video", format="mp4")
            vinfo = gr.Markdown()
    vbtn.click(run_video, [vin, valpha], [vout, vinfo], api_name="segment_video")


def _pass_damaged_files(image_input) -> None:
    """Let an upload that Gradio's own image reader (Pillow) cannot open reach the callback as its file path, so the
    user gets the command line's message (``frame.png: empty file (0 bytes)``) instead of Gradio's bare "Error"."""
    own = image_input.preprocess

    def preprocess(payload):
        try:
            return own(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if path is None:
                raise
            return str(path)
    image_input.preprocess = preprocess


def launch(model: str, reference: Optional[str] = None, examples: Optional[str] = None, host: str = "127.0.0.1",
           port: Optional[int] = None, providers=None, backend: str = "auto", precision: str = "auto",
           concurrency: int = 1, queue_size: int = 32, caps: Optional[UploadCaps] = None, checkpoint: str = "",
           watch: Optional[float] = 1.0) -> None:
    """Load the predictors and serve the demo (blocks until interrupted). ``backend``/``precision``: see
    :class:`~segadapt.runtime.predictor.Predictor` (auto: OpenVINO on a CPU where it is installed).

    ``concurrency``: requests of one kind (image or video) computed at once, the rest wait in Gradio's queue;
    ``queue_size``: requests waiting at most (beyond that a request is refused with "queue full" instead of
    holding memory); ``caps``: upload limits (:class:`~segadapt.demo.uploads.UploadCaps`); ``checkpoint``: the served
    model's source checkpoint for the Adapt tab ("" = the one its metadata names); ``watch``: the served model is
    swapped when its file is replaced (:mod:`segadapt.runtime.hot_swap`), looked at at most every ``watch`` seconds
    (None = never)."""
    from segadapt.demo.adapt_tab import AdaptSettings

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    p = Predictor(model, providers=providers, backend=backend, precision=precision, watch=watch)
    r = Predictor(reference, providers=providers, backend=backend, precision=precision) if reference else None
    caps = caps or UploadCaps()
    demo = create_demo(p, r, examples, caps=caps, adapt=AdaptSettings(checkpoint=checkpoint))
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size).launch(
        server_name=host, server_port=port, max_file_size=f"{caps.upload_mb:.0f}mb")
