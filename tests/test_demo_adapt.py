"""The demo's Adapt tab: footage caps, the child-process commands, and a real adaptation driven from a browser."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import pytest
from segadapt.demo.adapt_job import AdaptJob, Budget, FootageCaps, FootageError, prepare_footage
from segadapt.runtime.hot_swap import file_sha256
from segadapt.runtime.metadata import ModelMetadata, metadata_path
from segadapt.runtime.video import VideoWriter
from test_demo import _chromium  # the browser lookup the demo's own browser test uses


@pytest.fixture(scope="module")
def small_clip(video_path, tmp_path_factory):
    """A real 1.2-second clip: 30 frames of the dash-cam video at 136x240, H.264."""
    out = tmp_path_factory.mktemp("adapt-clip") / "camera.mp4"
    cap = cv2.VideoCapture(str(video_path))
    with VideoWriter(out, 25.0) as w:
        for _ in range(30):
            ok, bgr = cap.read()
            assert ok
            w.write(cv2.resize(bgr, (240, 136))[:, :, ::-1])
    cap.release()
    return out


def test_footage_caps_are_named_when_refused(small_clip, tiny, tmp_path):
    fo = prepare_footage([str(small_clip)], tmp_path / "a", FootageCaps(keep_frames=7))
    files = fo.files()
    assert fo.frames == 7 == len(files) and "30 frames" in fo.note
    assert cv2.imread(str(files[0])).shape == (136, 240, 3)
    for caps, name in ((FootageCaps(max_seconds=1.0), "max_seconds"), (FootageCaps(max_frames=20), "max_frames"),
                       (FootageCaps(max_mb=0.001), "max_mb")):
        with pytest.raises(FootageError, match=name):
            prepare_footage([str(small_clip)], tmp_path / name, caps)
    frames = sorted((tiny / "target" / "images").iterdir())
    fo = prepare_footage([str(f) for f in frames], tmp_path / "b", FootageCaps(keep_frames=3, max_width=100))
    assert fo.frames == 3 and cv2.imread(str(fo.files()[0])).shape[1] == 100
    with pytest.raises(FootageError, match="max_frames"):
        prepare_footage([str(f) for f in frames], tmp_path / "c", FootageCaps(max_frames=len(frames) - 1))
    with pytest.raises(FootageError, match="not both"):
        prepare_footage([str(small_clip), str(frames[0])], tmp_path / "d")
    with pytest.raises(FootageError, match="No footage"):
        prepare_footage([], tmp_path / "e")
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(FootageError, match="notes.txt"):
        prepare_footage([str(bad)], tmp_path / "f")


def test_job_commands_export_like_the_served_model(tiny_classes, small_clip, tmp_path):
    like = ModelMetadata(classes=list(tiny_classes.names), palette=[list(c) for c in tiny_classes.palette],
                         input_size=(96, 128), output_dtype="uint8")
    fo = prepare_footage([str(small_clip)], tmp_path, FootageCaps(keep_frames=4))
    job = AdaptJob("ck", fo, tmp_path, like, tmp_path / "out", "m.adapted", Budget(steps=7, minutes=1.5))
    a, e = job.adapt_command(), job.export_command()
    assert a[1:4] == ["-m", "segadapt", "adapt"] and a[a.index("--steps") + 1] == "7"
    assert a[a.index("--size") + 1:a.index("--size") + 3] == [str(v) for v in like.input_size]
    assert a[a.index("--target") + 1] == str(fo.folder) and a[a.index("--log-every") + 1] == "1"
    assert e[1:4] == ["-m", "segadapt", "export"] and e[e.index("--checkpoint") + 1] == str(tmp_path / "adapt" /
                                                                                            "adapted")
    assert e[e.index("--imgsz") + 1:e.index("--imgsz") + 3] == [str(v) for v in like.input_size]
    assert e[e.index("--input-layout") + 1] == like.input_layout and "--dynamic" not in e
    dyn = ModelMetadata.from_dict({**like.to_dict(), "dynamic": True, "min_size": [64, 64], "max_size": [256, 320]})
    e = AdaptJob("ck", fo, tmp_path, dyn, tmp_path, "m", Budget()).export_command()
    assert "--dynamic" in e and e[e.index("--max-size") + 1:e.index("--max-size") + 3] == ["256", "320"]


def _children_with(text: str) -> list:
    """PIDs of processes whose command line contains ``text`` (the job folders are under the test's tmp_path)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.adapt_browser  # run on its own (.ci/run): in the full suite the upload never showed (cause not found)
def test_browser_adapts_and_cancels(tiny_onnx, small_clip, tmp_path):
    """Upload a real clip, adapt 10 steps, see progress and the before/after result; cancel a second run."""
    pytest.importorskip("gradio", reason="the demo needs gradio ([demo] extra)")
    pw = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    exe = _chromium()
    if not exe:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from segadapt.demo.adapt_tab import AdaptSettings
    from segadapt.demo.app import create_demo
    from segadapt.runtime.predictor import Predictor

    served = tmp_path / "models" / "served.onnx"
    served.parent.mkdir()
    shutil.copyfile(tiny_onnx, served)
    shutil.copyfile(metadata_path(tiny_onnx), metadata_path(served))
    pred = Predictor(served, providers=["cpu"], watch=1.0)
    work = tmp_path / "jobs"
    settings = AdaptSettings(work_dir=str(work), caps=FootageCaps(keep_frames=8), compare_frames=2,
                             presets={"Test (10 steps)": Budget(10, 10.0, 2, "cpu"),
                                      "Long (500 steps)": Budget(500, 10.0, 2, "cpu")})
    demo = create_demo(pred, adapt=settings)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    shot = Path(os.environ.get("SEGADAPT_ADAPT_SCREENSHOT", tmp_path / "demo-adapt.png"))
    status = "document.querySelector('#adapt-status').innerText"
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(demo.local_url, wait_until="networkidle")
            page.get_by_role("tab", name="Adapt").click()
            page.set_input_files("#adapt-files input[type=file]", str(small_clip))
            page.wait_for_selector("#adapt-files >> text=camera.mp4", timeout=30000)
            page.get_by_role("button", name="Start adaptation").click()
            # progress: a step count that moves, with the pseudo-label share, before the end
            page.wait_for_function(f"/step [1-9][0-9]* \\/ 10 · pseudo-labels/.test({status})", timeout=600000,
                                   polling=200)
            page.wait_for_function(f"{status}.startsWith('Done')", timeout=600000, polling=500)
            text = page.inner_text("#adapt-status")
            assert "step 10 / 10" in text and "changes" in text, text
            page.wait_for_function("document.querySelectorAll('#adapt-slider img').length >= 2", timeout=30000)
            sizes = page.locator("#adapt-slider img").evaluate_all("els => els.map(e => [e.naturalWidth, "
                                                                  "e.naturalHeight])")
            assert all(w == 240 and h == 136 for w, h in sizes[:2]), sizes
            assert page.locator("#adapt-download >> text=.onnx").count() >= 1
            assert page.locator("#adapt-download >> text=.json").count() >= 1
            page.screenshot(path=str(shot), full_page=True)
            # serve it: the demo's predictor swaps to it (same classes and input), the served file now holds it;
            # a model the adaptation does not expect to help takes a second click
            original = file_sha256(served)
            page.get_by_role("button", name="Serve the adapted model").click()
            page.wait_for_function(f"/^(Serving|Not served yet)/.test({status})", timeout=60000, polling=200)
            if page.inner_text("#adapt-status").startswith("Not served yet"):
                assert "Verdict:" in page.inner_text("#adapt-status") and pred.watcher.swaps == 0
                page.get_by_role("button", name="Serve the adapted model").click()
            page.wait_for_function(f"{status}.startsWith('Serving')", timeout=60000, polling=200)
            adapted = next(served.parent.glob("served.adapted-*.onnx"))
            assert pred.watcher.swaps == 1 and file_sha256(served) == file_sha256(adapted) == pred.watcher.sha256
            # one click serves the replaced model again, from the copy kept beside it
            page.get_by_role("button", name="Revert to the previous model").click()
            page.wait_for_function(f"{status}.startsWith('Reverted')", timeout=60000, polling=200)
            assert pred.watcher.swaps == 2 and file_sha256(served) == original == pred.watcher.sha256
            # a second, longer run: cancel it once it has started stepping
            page.get_by_label("Long (500 steps)").check()
            page.get_by_role("button", name="Start adaptation").click()
            page.wait_for_function(f"/Adapting.*step [1-9][0-9]* \\/ 500/.test({status})", timeout=600000,
                                   polling=200)
            page.get_by_role("button", name="Cancel").click()
            page.wait_for_function(f"{status}.startsWith('Cancelled')", timeout=60000, polling=200)
            browser.close()
        new = sorted(served.parent.glob("served.adapted-*.onnx"))
        assert len(new) == 1 and metadata_path(new[0]).is_file()
        assert ModelMetadata.load(metadata_path(new[0])).classes == pred.metadata.classes
        assert Predictor(new[0], providers=["cpu"]).metadata.input_size == pred.metadata.input_size
        deadline = time.time() + 10
        while _children_with(str(work)) and time.time() < deadline:
            time.sleep(0.2)
        assert not _children_with(str(work)), "the cancelled adaptation is still running"
        logs = sorted(work.glob("job-*/adapt/coverage.jsonl"))
        assert len(logs) == 2 and len(logs[1].read_text().splitlines()) < 500
    finally:
        demo.close()
    assert shot.stat().st_size > 10000


def test_tab_explains_what_is_missing(tiny_classes, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from segadapt.demo import adapt_job
    from segadapt.demo.adapt_tab import AdaptSettings, AdaptTab

    meta = ModelMetadata(classes=list(tiny_classes.names), palette=[list(c) for c in tiny_classes.palette],
                         source_checkpoint=str(tmp_path / "gone"))
    served = SimpleNamespace(metadata=meta, model_path=tmp_path / "m.onnx", watcher=None)  # what the tab reads
    monkeypatch.setattr(adapt_job, "ADAPT_MODULES", ("numpy", "segadapt_no_such_module"))
    tab = AdaptTab(served, None, AdaptSettings(work_dir=str(tmp_path / "w")))
    text = tab.availability()
    assert "segadapt_no_such_module" in text and "pip install 'segadapt[export]'" in text, text
    assert f"{tmp_path / 'gone'}, which is not on this machine" in text and "--checkpoint DIR" in text
    with pytest.raises(FootageError, match="segadapt_no_such_module"):
        tab.new_job([], "served: m.onnx", Budget())
    monkeypatch.setattr(adapt_job, "ADAPT_MODULES", ("numpy",))
    ck = tmp_path / "ck"
    ck.mkdir()
    tab = AdaptTab(served, None, AdaptSettings(checkpoint=str(ck), work_dir=str(tmp_path / "w")))
    assert tab.models["served: m.onnx"][1] == ck and "unknown" not in tab.availability()
    with pytest.raises(FootageError, match="max_steps"):
        tab.new_job([], "served: m.onnx", Budget(steps=10 ** 6))
