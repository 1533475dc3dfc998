"""The Gradio demo: callbacks, a real server called through gradio_client, and a headless browser."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the demo needs gradio ([demo] extra)")

from segadapt.demo.app import DemoError, create_demo, segment_clip, segment_image  # noqa: E402
from segadapt.runtime.predictor import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor(tiny_onnx):
    return Predictor(tiny_onnx, providers=["cpu"])


def _frame(tiny):
    f = sorted((tiny / "target" / "images").iterdir())[0]
    return cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), f


def test_image_endpoint_hands_out_a_new_file_per_request(predictor, tiny, tmp_path):
    """The overlays leave the callback as files named once, never as arrays: Gradio rewrites an array's
    content-named cache file on every request, which cut a concurrent client's download short (CI, 8 clients)."""
    from segadapt.demo.app import _image_callback
    from segadapt.demo.uploads import UploadCaps

    img, _ = _frame(tiny)
    run = _image_callback(predictor, predictor, UploadCaps(), tmp_path)
    first, second = run(img, 0.5), run(img, 0.5)
    ov, _, _, _ = segment_image(predictor, img, 0.5)
    for out in (first, second):
        ov_png, ref_png, pair, _, _, cm_png = out
        assert all(isinstance(x, str) for x in (ov_png, ref_png, cm_png)) and pair == (ref_png, ov_png)
        assert np.array_equal(cv2.imread(ov_png)[..., ::-1], ov)  # the PNG holds the RGB overlay exactly
    assert len({*first[:2], first[5], *second[:2], second[5]}) == 6  # no file is written twice


def test_segment_image_callback(predictor, tiny):
    img, _ = _frame(tiny)
    ov, cm, shares, ms = segment_image(predictor, img, 0.7)
    assert ov.shape == img.shape and cm.shape == img.shape[:2] and ms > 0
    assert set(shares) <= set(predictor.metadata.classes) and abs(sum(shares.values()) - 1) < 1e-6
    ov0, *_ = segment_image(predictor, img, 0.0)
    assert np.array_equal(ov0, img)  # opacity 0: the frame itself
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], 2)
    assert segment_image(predictor, rgba, 0.5)[1].shape == img.shape[:2]
    with pytest.raises(DemoError, match="No image"):
        segment_image(predictor, None)
    with pytest.raises(DemoError, match="shape"):
        segment_image(predictor, np.zeros((5,), np.uint8))


def test_segment_clip_callback_caps_and_errors(predictor, short_clip, video_path, tmp_path):
    from segadapt.demo.uploads import UploadCaps

    out, status = segment_clip(predictor, str(short_clip), str(tmp_path))
    cap = cv2.VideoCapture(out)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 50 and cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 480
    cap.release()
    assert "50 frames" in status and "frames/s" in status
    # over a cap: refused, naming the cap (the 2 s clip against 1 s, 10 frames, 0.1 megapixels, 0.001 MB)
    with pytest.raises(DemoError, match="2.0 s long; this demo takes clips up to 1 s"):
        segment_clip(predictor, str(short_clip), str(tmp_path), max_seconds=1.0)
    with pytest.raises(DemoError, match="50 frames; this demo takes clips of up to 10 frames"):
        segment_clip(predictor, str(short_clip), str(tmp_path), caps=UploadCaps(video_frames=10))
    with pytest.raises(DemoError, match="480x270; this demo takes frames up to 0.1 megapixels"):
        segment_clip(predictor, str(short_clip), str(tmp_path), caps=UploadCaps(video_pixels=100_000))
    with pytest.raises(DemoError, match="clip.mp4 is 0 MB; this demo takes clips up to 0 MB"):
        segment_clip(predictor, str(short_clip), str(tmp_path), max_mb=0.0001)
    # damaged: the command line's message, with the file's name
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DemoError, match=r"^empty.mp4: empty file \(0 bytes\)$"):
        segment_clip(predictor, str(empty), str(tmp_path))
    cut = tmp_path / "cut.mp4"
    data = video_path.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 10])
    with pytest.raises(DemoError, match="cut.mp4: truncated or damaged: the container lists 221 frames, only 65"):
        segment_clip(predictor, str(cut), str(tmp_path), max_seconds=60)


def test_image_uploads_over_caps_or_damaged(predictor, tiny, tmp_path):
    from segadapt.demo.uploads import UploadCaps

    _, path = _frame(tiny)
    ov, cm, _, _ = segment_image(predictor, str(path))
    assert cm.shape == cv2.imread(str(path)).shape[:2]
    with pytest.raises(DemoError, match="160x120 pixels; this demo takes images up to 0.0 megapixels"):
        segment_image(predictor, str(path), caps=UploadCaps(image_pixels=100))
    with pytest.raises(DemoError, match="this demo takes images up to 0 MB"):
        segment_image(predictor, str(path), caps=UploadCaps(image_mb=0.0001))
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    with pytest.raises(DemoError, match=r"^zero.png: empty file \(0 bytes\)$"):
        segment_image(predictor, str(zero))
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DemoError, match="^cut.png: truncated"):
        segment_image(predictor, str(cut))


@pytest.fixture(scope="module")
def served(predictor, tiny):
    demo = create_demo(predictor, reference=predictor, examples=str(tiny / "target"))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


def test_app_through_gradio_client(served, tiny, short_clip, predictor):
    from gradio_client import Client, handle_file

    c = Client(served.local_url, verbose=False)
    img, path = _frame(tiny)
    ov, ref, slider, legend, info, cm_file = c.predict(handle_file(str(path)), 0.5, api_name="/segment_image")
    ov_img = cv2.imread(ov if isinstance(ov, str) else ov["path"])
    assert ov_img.shape == img.shape
    cm = cv2.imread(cm_file if isinstance(cm_file, str) else cm_file["path"], cv2.IMREAD_UNCHANGED)
    assert cm.shape == img.shape[:2] and cm.dtype == np.uint8
    assert set(np.unique(cm)) <= set(range(predictor.metadata.num_classes))
    present = {predictor.metadata.classes[i] for i in np.unique(cm)}
    assert all(name in legend for name in present) and "%" in legend and "ms" in info
    assert ref is not None  # the reference model's overlay
    vid, status = c.predict(handle_file(str(short_clip)), 0.5, api_name="/segment_video")
    vpath = vid["video"] if isinstance(vid, dict) else vid
    cap = cv2.VideoCapture(vpath)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 50
    cap.release()
    assert "50 frames" in status


def test_bad_upload_shows_readable_error(served, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(served.local_url, verbose=False)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(Exception) as e:
        c.predict(handle_file(str(empty)), 0.5, api_name="/segment_video")
    assert "empty.mp4: empty file (0 bytes)" in str(e.value) and "Traceback" not in str(e.value)
    # a damaged image: Gradio's own reader (Pillow) cannot open it; the callback still gives the CLI's message
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all" * 10)
    with pytest.raises(Exception) as e:
        c.predict(handle_file(str(junk)), 0.5, api_name="/segment_image")
    assert "junk.png: not a readable image" in str(e.value), str(e.value)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return ""


def test_browser_runs_a_segmentation(served, tiny, tmp_path):
    pw = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    exe = _chromium()
    if not exe:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    img, path = _frame(tiny)
    shot = Path(os.environ.get("SEGADAPT_SCREENSHOT", tmp_path / "demo.png"))
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served.local_url, wait_until="networkidle")
        page.set_input_files("input[type=file]", str(path))
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Segment", exact=True).click()
        page.wait_for_selector("text=ms on onnxruntime", timeout=60000)
        imgs = page.locator("img").evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight, e.src])")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert any(w == img.shape[1] and h == img.shape[0] for w, h, _ in imgs), imgs
    assert shot.stat().st_size > 10000


def test_demo_module_imports_no_torch_and_loads_nothing():
    code = ("import sys, segadapt.demo.app\n"
            "print('torch' in sys.modules, 'gradio' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


def test_result_image_that_cannot_be_written_is_a_readable_error(tmp_path):
    """A full disk or a vanished temp folder: the user sees which file could not be written, not a traceback."""
    from segadapt.demo.app import _result_file

    img = np.zeros((8, 8, 3), np.uint8)
    assert cv2.imread(_result_file(tmp_path, "overlay", img)).shape == (8, 8, 3)
    gone = tmp_path / "gone"
    with pytest.raises(DemoError, match="gone.*could not write"):
        _result_file(gone, "overlay", img)
