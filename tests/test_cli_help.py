"""What a person sees: `--help` leads with the essential flags, groups the rest by config section, and the long
commands end with a few lines (the whole JSON result with --json)."""

import json
import os

import pytest

from segadapt.cli import build_parser, main

MAX_HELP_CHARS = 400  # one flag's help text, default included


def _help(command: str, capsys) -> list:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out.splitlines()


def _groups(lines: list) -> dict:
    """Group title -> its lines, from a help text (a title is an unindented line ending in ':')."""
    groups, title = {}, None
    for line in lines[1:]:
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
            groups[title] = []
        elif title is not None:
            groups[title].append(line)
    return groups


def _flag_line(lines: list, flag: str) -> int:
    return next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))


def test_adapt_help_leads_with_the_essential_flags(capsys):
    lines = _help("adapt", capsys)
    assert lines[0] == "usage: segadapt adapt --checkpoint DIR --target PATH [--out DIR] [options]"
    target = _flag_line(lines, "--target")
    assert target < 40, "\n".join(lines[:45])
    assert target < _flag_line(lines, "--rccr.enabled") and target < _flag_line(lines, "--source-data")
    essential = " ".join(_groups(lines)["essential"])
    for flag in ("--config", "--checkpoint", "--target", "--out", "--steps", "--device", "--size", "--keep-aspect"):
        assert f"{flag} " in essential, flag
    assert list(_groups(lines))[0] == "essential"


def test_adapt_flags_are_grouped_by_config_section(capsys):
    groups = _groups(_help("adapt", capsys))
    for section in ("strong", "teacher", "pseudo", "depth", "rectifier", "rccr", "bida", "monitor", "seco"):
        flags = [line.split()[0] for line in groups[section] if line.strip().startswith("--")]
        assert flags and all(f.startswith(f"--{section}.") for f in flags if f != "--depth"), (section, flags)
    assert any(line.strip().startswith("--rccr.weight ") for line in groups["rccr"])
    assert any(line.strip().startswith("--depth ") for line in groups["depth"])  # the --depth.provider alias
    assert any(line.strip().startswith("--json") for line in groups["options"])


@pytest.mark.parametrize("command, first", [("train-source", "--data"), ("pipeline", "--data"),
                                            ("export", "--checkpoint"), ("predict", "--model")])
def test_every_command_with_many_flags_starts_with_an_essential_group(command, first, capsys):
    lines = _help(command, capsys)
    assert lines[0].startswith(f"usage: segadapt {command} ") and lines[0].endswith("[options]")
    groups = _groups(lines)
    assert list(groups)[0] == "essential"
    assert any(line.strip().startswith(first + " ") for line in groups["essential"])


@pytest.mark.parametrize("command", ["adapt", "train-source", "pipeline", "export", "predict"])
def test_each_flag_help_is_short(command):
    p = build_parser(command)
    sp = next(a for a in p._actions if a.dest == "command").choices[command]
    long = sorted(((len(a.help or ""), a.option_strings[-1]) for a in sp._actions
                   if a.option_strings and len(a.help or "") > MAX_HELP_CHARS), reverse=True)
    assert long == [], f"{command}: help texts over {MAX_HELP_CHARS} characters: {long}"


def test_grouped_parser_keeps_flags_and_defaults(capsys):
    """Grouping is presentation only: flags parse as before and only the flags given reach the config."""
    rc = main(["adapt", "--print-config", "--steps", "7", "--rccr.weight", "0.2", "--depth", "stereo",
               "--depth.right-dir", "R", "--keep-aspect", "96"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["steps"] == 7 and cfg["rccr"]["weight"] == 0.2 and cfg["keep_aspect"] == 96
    assert cfg["depth"]["provider"] == "stereo" and cfg["batch_size"] == 4 and cfg["size"] == [0, 0]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_adapt_ends_with_lines_not_json_and_prints_json_on_request(tiny_checkpoint, tiny, tmp_path, capsys):
    base = ["adapt", "--checkpoint", str(tiny_checkpoint), "--target", str(tiny / "target"), "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--debug-every", "0", "--log-every", "1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert not _is_json(out) and "{" not in out, out
    assert f"adapted checkpoint: {tmp_path / 'a' / 'adapted'}" in out and "after 1 steps at 96x128" in out
    assert "monitor at step 1" in out and f"summary: {tmp_path / 'a'}/summary.json" in out
    assert main(base + ["--out", str(tmp_path / "b"), "--self-training", "false", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "b" / "summary.json").read_text()) and printed["steps"] == 0


@pytest.fixture()
def tiny_data(tmp_path, tiny, camvid):
    d = tmp_path / "data"
    d.mkdir()
    for split, src in (("source_train", "source"), ("source_val", "source"), ("target_adapt", "target")):
        os.symlink(tiny / src, d / split)
    os.symlink(camvid / "classes.json", d / "classes.json")
    return d


def test_pipeline_ends_with_the_headline_and_prints_the_report_with_json(tiny_checkpoint, tiny_data, tmp_path,
                                                                          capsys):
    argv = ["pipeline", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--source-checkpoint",
            str(tiny_checkpoint), "--size", "96", "128", "--adapt-steps", "1", "--until", "evaluate",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not _is_json(out) and "{" not in out, out
    assert f"report: {tmp_path / 'run'}/report.md" in out
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    row = next(line for line in out.splitlines() if line.startswith("target_adapt "))
    src, ada = rep["metrics"]["source_only/target_adapt"]["miou"], rep["metrics"]["adapted/target_adapt"]["miou"]
    assert row.split()[1:] == [f"{src:.2f}", f"{ada:.2f}", f"{ada - src:+.2f}"]
    assert main(argv + ["--json"]) == 0  # resumed: every step done, the report written again
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == rep["metrics"]
    assert printed == json.loads((tmp_path / "run" / "report.json").read_text())


def test_closing_lines_of_a_full_report_and_an_adabn_only_run():
    from segadapt.console import adapt_lines, pipeline_lines, train_source_lines

    rep = {"metrics": {"source_only/source_val": {"miou": 41.59}, "adapted/source_val": {"miou": 40.0},
                       "source_only/target_adapt": {"miou": 36.96}, "adapted/target_adapt": {"miou": 42.8}},
           "export_parity": {"adapted.fp32": {"class_agreement": 1.0}, "adapted.fp16": {"class_agreement": 0.9998}},
           "video": {"output": "r/video/clip_adapted.mp4", "frames": 221, "fps": 30.14},
           "steps": {"source": {"planned": 800, "done": 312, "cut_short": True, "minutes_cap": 2.0}}}
    text = "\n".join(pipeline_lines(rep, "r"))
    assert "source_val" in text and "-1.59" in text and "+5.84" in text
    assert "adapted.fp32 100.00 %" in text and "adapted.fp16 99.98 %" in text
    assert "r/video/clip_adapted.mp4 (221 frames, 30.1 frames/s" in text and "312 of 800" in text
    assert adapt_lines({"steps": 0, "adapted": "o/adapted", "size": [96, 128]}, "o")[0] == \
        "adapted checkpoint: o/adapted (AdaBN only, at 96x128)"
    lines = train_source_lines({"best_val_miou": 41.594, "best_step": 3200, "steps": 4000, "seconds": 10.0,
                                "out": "s", "stopped_early": False})
    assert lines[0].startswith("best checkpoint: s/best (val mIoU 41.59 at step 3200")
