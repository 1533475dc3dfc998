"""The main job end to end on the tiny real data with a tiny configuration."""

import json
import os

import cv2
import pytest

from segadapt.pipeline import PipelineConfig, StepFailed, run_pipeline


@pytest.fixture()
def tiny_data(tmp_path, tiny, camvid):
    d = tmp_path / "data"
    d.mkdir()
    os.symlink(tiny / "source", d / "source_train")
    os.symlink(tiny / "source", d / "source_val")
    os.symlink(tiny / "target", d / "target_adapt")
    os.symlink(camvid / "classes.json", d / "classes.json")
    return d


def test_pipeline_end_to_end_and_resume(tiny_data, tmp_path, video_path):
    cfg = PipelineConfig(data=str(tiny_data), out=str(tmp_path / "run"), size=(60, 80), source_steps=8,
                         adapt_steps=3, video=str(video_path), video_max_frames=12, device="cpu")
    logs = []
    rep = run_pipeline(cfg, log=logs.append)
    out = tmp_path / "run"
    # checkpoints
    for ck in ("source/best", "source/last", "adapt/adapted", "adapt/last"):
        assert (out / ck / "model.safetensors").is_file() and (out / ck / "config.json").is_file()
    # metrics: both models on both splits, same class names everywhere
    classes = json.loads((tiny_data / "classes.json").read_text())["classes"]
    assert set(rep["metrics"]) == {"source_only/source_val", "source_only/target_adapt", "adapted/source_val",
                                   "adapted/target_adapt"}
    for m in rep["metrics"].values():
        assert m["classes"] == classes and len(m["iou"]) == len(classes) and 0 <= m["miou"] <= 100
    assert rep["target_gain_miou"] == pytest.approx(rep["metrics"]["adapted/target_adapt"]["miou"] -
                                                    rep["metrics"]["source_only/target_adapt"]["miou"])
    # ONNX files with metadata beside them, same classes, parity recorded
    for key in ("onnx.adapted.fp32", "onnx.adapted.fp16", "onnx.source.fp32"):
        f = rep["files"][key]
        meta = json.loads(open(f[:-5] + ".json").read())
        assert meta["classes"] == classes and meta["input_size"] == [60, 80]
    assert rep["export_parity"]["adapted.fp32"]["class_agreement"] >= 0.999
    # overlay video: the requested frame count, H.264
    cap = cv2.VideoCapture(rep["files"]["overlay_video"])
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    cap.release()
    assert rep["video"]["frames"] == 12 and rep["video"]["codec"] == "h264"
    assert cv2.imread(rep["files"]["overlay_frame"]).shape == (540, 960, 3)
    md = (out / "report.md").read_text()
    assert "Adaptation gain" in md and "adapted.fp16" in md
    # the label-free selection: its verdict and candidates table, the pick is what was evaluated and exported
    sel = rep["selection"]
    assert sel["verdict"] in ("better", "no better", "uncertain") and sel["picked"] in sel["candidates"]
    assert f"the adapted model is **{sel['picked']}**" in md and "| source |" in md.replace("**", "")
    assert json.loads(open(rep["files"]["onnx.adapted.fp32"][:-5] + ".json").read())["adaptation"]["picked"] == \
        sel["picked"]
    # re-running skips every finished step
    logs.clear()
    run_pipeline(cfg, log=logs.append)
    skipped = [m for m in logs if "done earlier, skipping" in m]
    assert len(skipped) == 5


def test_failing_step_is_named_and_keeps_earlier_outputs(tiny_data, tmp_path, monkeypatch):
    import segadapt.runtime.video as video_mod

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video_mod, "segment_video", disk_full)
    monkeypatch.setenv("SEGADAPT_DATA", str(tmp_path / "no-data-root"))  # no dash-cam clip there
    cfg = PipelineConfig(data=str(tiny_data), out=str(tmp_path / "run"), size=(60, 80), source_steps=4,
                         adapt_steps=2, device="cpu")
    logs = []
    with pytest.raises(StepFailed, match="'video'") as e:
        run_pipeline(cfg, log=logs.append)
    assert "No space left" in str(e.value)
    assert any("no clip at" in m and "target_adapt frames" in m for m in logs)  # said before step 1
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["failed"]["step"] == "video"
    assert set(state["done"]) == {"train_source", "adapt", "evaluate", "export"}
    assert (tmp_path / "run" / "export" / "adapted.onnx").is_file()
    # resumed without the fault: only the video and report steps run, on the target frames made into a clip
    monkeypatch.undo()
    monkeypatch.setenv("SEGADAPT_DATA", str(tmp_path / "no-data-root"))
    rep = run_pipeline(cfg, log=lambda *_: None)
    assert rep["video"]["frames"] == 20  # the 20 tiny target frames
    assert rep["files"]["video_source"].endswith("target_adapt_frames.mp4")
    assert "target_adapt_frames.mp4" in (tmp_path / "run" / "report.md").read_text()


def test_missing_inputs_fail_before_step_one(tmp_path, tiny):
    from segadapt.cli import main

    empty = tmp_path / "data"
    (empty / "target_adapt").mkdir(parents=True)
    cfg = PipelineConfig(data=str(empty), out=str(tmp_path / "run"), video=str(tmp_path / "missing.mp4"))
    with pytest.raises(FileNotFoundError) as e:
        run_pipeline(cfg, log=lambda *_: None)
    msg = str(e.value)
    assert "nothing was run" in msg and "\n" not in msg
    for what in ("source_train", "source_val", "classes.json", "target_adapt", "missing.mp4"):
        assert what in msg
    assert not (tmp_path / "run").exists()
    # through the CLI: one line, exit 2, no traceback
    rc = main(["pipeline", "--data", str(empty), "--out", str(tmp_path / "run2"), "--preset", "quick"])
    assert rc == 2 and not (tmp_path / "run2").exists()


def test_pipeline_preset_choices_checked_before_work(tmp_path, capsys):
    from segadapt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--preset", "quik", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "quick" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_resumed_pipeline_without_clip_needs_the_target_frames(tmp_path, monkeypatch):
    """adapt and export done, no clip: the video step will read the target frames, so they are checked up front."""
    from segadapt.pipeline import check_inputs

    monkeypatch.setenv("SEGADAPT_DATA", str(tmp_path / "no-data-root"))
    cfg = PipelineConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    done = {"done": {k: {} for k in ("train_source", "adapt", "evaluate", "export")}}
    with pytest.raises(FileNotFoundError, match="target_adapt"):
        check_inputs(cfg, done)
    (tmp_path / "data" / "target_adapt" / "images").mkdir(parents=True)
    (tmp_path / "data" / "target_adapt" / "images" / "f.png").write_bytes(b"")
    notes = check_inputs(cfg, done)
    assert len(notes) == 1 and "no clip" in notes[0]
    done["done"]["video"] = {}
    assert check_inputs(PipelineConfig(data=str(tmp_path / "empty"), out=str(tmp_path / "run")), done) == []


def _tensors(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_seeded_pipelines_are_bit_identical(tiny_data, tmp_path, video_path):
    """Issue #20: two runs with the same seed give the same checkpoints bit for bit and the same report numbers;
    the report records the steps made, the seed, the size, the commit and the machine."""
    reps = []
    for run in ("a", "b"):
        cfg = PipelineConfig(data=str(tiny_data), out=str(tmp_path / run), size=(60, 80), source_steps=6,
                             adapt_steps=4, video=str(video_path), device="cpu", seed=3, until="evaluate")
        reps.append(run_pipeline(cfg, log=lambda m: None))
    for ck in ("source/best", "source/last", "adapt/adapted"):
        a, b = _tensors(tmp_path / "a" / ck), _tensors(tmp_path / "b" / ck)
        assert a.keys() == b.keys()
        differ = [k for k in a if not (a[k] == b[k]).all()]
        assert not differ, f"{ck}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    ra, rb = reps
    assert ra["metrics"] == rb["metrics"]
    assert ra["steps"] == rb["steps"] == {"source": {"planned": 6, "done": 6, "cut_short": False, "minutes_cap": 0.0},
                                          "adapt": {"planned": 4, "done": 4, "cut_short": False, "minutes_cap": 0.0}}
    assert ra["seed"] == 3 and ra["size"] == [60, 80]
    pv = ra["provenance"]
    assert pv["machine"]["cores"] >= 1 and pv["machine"]["cpu"] and pv["python"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["miou"] == {k: round(v["miou"], 4) for k, v in ra["metrics"].items()}
    assert summary["steps"] == ra["steps"] and set(summary["timings_s"]) == {"train_source", "adapt", "evaluate"}
    md = (tmp_path / "a" / "report.md").read_text()
    assert "source: 6 of 6 steps (--rare-class-sampling true --loss balanced --class-weight-power 0.5)" in md
    # the recipe comes from the run's own state (a run made under an older preset is not relabelled)
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    state["done"]["train_source"].pop("recipe")
    from segadapt.pipeline import _resolved, build_report, report_markdown
    old = report_markdown(build_report(cfg, _resolved(cfg), state))
    assert "source: 6 of 6 steps\n" in old and "--rare-class-sampling" not in old
    assert not (tmp_path / "a" / "export").exists()  # --until evaluate: no export, no video


def test_minutes_cap_is_reported_as_cut_short():
    from segadapt.pipeline import steps_done

    preset = {"source_steps": 800, "source_minutes": 2.0, "adapt_steps": 150, "adapt_minutes": 0.0}
    done = {"train_source": {"summary": {"steps": 312}}, "adapt": {"summary": {"steps": 150}}}
    st = steps_done(preset, done)
    assert st["source"] == {"planned": 800, "done": 312, "cut_short": True, "minutes_cap": 2.0}
    assert st["adapt"]["cut_short"] is False
    assert steps_done(preset, {"train_source": {"reused": True}}) == {"source": {"reused": True}}


@pytest.mark.parametrize("uda", [False, True])
def test_pipeline_passes_source_data_to_adapt_only_in_uda_mode(tmp_path, monkeypatch, uda):
    """`segadapt pipeline --uda` hands the data root's labelled source_train to the adaptation step (issue #13's
    UDA mode) and adapts at the UDA learning rate; without it the adaptation config has no source data
    (source-free) and the adaptation's default learning rate."""
    import segadapt.adapt.engine as st
    from segadapt.adapt.config import SOURCE_FREE_LR, UDA_LR
    from segadapt.pipeline import _PipelineRun

    seen = {}
    monkeypatch.setattr(st, "adapt", lambda cfg, log=None: seen.setdefault("cfg", cfg) and {"steps": 0})
    cfg = PipelineConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), uda=uda, device="cpu")
    run = _PipelineRun(cfg, log=lambda *_: None)
    run.state["done"]["train_source"] = {"checkpoint": str(tmp_path / "ck")}
    run.step_adapt()
    assert seen["cfg"].source_data == (str(tmp_path / "data" / "source_train") if uda else "")
    assert seen["cfg"].learning_rate() == (UDA_LR if uda else SOURCE_FREE_LR) and UDA_LR != SOURCE_FREE_LR


@pytest.mark.parametrize("preset, override, expected", [("quick", 0.0, 0.99), ("full", 0.0, 0.999),
                                                         ("quick", 0.995, 0.995)])
def test_pipeline_teacher_momentum_follows_the_preset_length(tmp_path, monkeypatch, preset, override, expected):
    """The adaptation's EMA momentum is the preset's (0.99 for the quick preset's 150 steps, 0.999 for long runs;
    issue #12) unless --adapt-teacher-alpha sets it; the CLI's own default (1000 steps) is 0.999."""
    import segadapt.adapt.engine as st
    from segadapt.adapt.config import AdaptConfig
    from segadapt.pipeline import _PipelineRun

    seen = {}
    monkeypatch.setattr(st, "adapt", lambda cfg, log=None: seen.setdefault("cfg", cfg) and {"steps": 0})
    cfg = PipelineConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), preset=preset,
                         adapt_teacher_alpha=override, device="cpu")
    run = _PipelineRun(cfg, log=lambda *_: None)
    run.state["done"]["train_source"] = {"checkpoint": str(tmp_path / "ck")}
    run.step_adapt()
    assert seen["cfg"].teacher.alpha == expected
    assert AdaptConfig().teacher.alpha == 0.999 and AdaptConfig().steps == 1000


def test_rare_class_table_lists_the_rarest_source_classes(tiny_data):
    """The report's rare-class table: the 4 smallest pixel shares of the source labels (on CamVid's tiny split
    Pedestrian, Bicyclist, Pole and Fence), with their IoU for every model and split evaluated."""
    from segadapt.pipeline import rare_class_lines, report_markdown, source_rare_classes

    rare = source_rare_classes(tiny_data / "source_train")
    assert [r["name"] for r in rare] == ["Pedestrian", "Bicyclist", "Pole", "Fence"]
    assert all(0 < a["share"] <= b["share"] < 0.02 for a, b in zip(rare, rare[1:]))
    names = json.loads((tiny_data / "classes.json").read_text())["classes"]
    iou = [float(i) for i in range(len(names))]
    rep = {"rare_classes": rare, "metrics": {
        "source_only/target_adapt": {"classes": names, "iou": iou, "miou": 1.0, "pixel_acc": 1.0},
        "adapted/target_adapt": {"classes": names, "iou": [None] * len(names), "miou": 1.0, "pixel_acc": 1.0}}}
    lines = rare_class_lines(rep)
    assert "| source_only/target_adapt | adapted/target_adapt |" in lines[3]
    assert lines[5].startswith("| Pedestrian | 0.") and lines[5].endswith(f"| {names.index('Pedestrian')}.0 | n/a |")
    assert len(lines) == 5 + 4 and rare_class_lines({**rep, "rare_classes": []}) == []
    md = report_markdown({**rep, "config": {"preset": "quick", "data": "d", "target_split": "target_adapt",
                                            "out": "o"}, "timings_s": {}, "files": {}})
    assert "Rare classes" in md
    assert source_rare_classes(tiny_data / "missing", log=lambda *_: None) == []


@pytest.mark.parametrize("uda", [False, True])
def test_a_preset_can_turn_on_rare_class_sampling(tmp_path, monkeypatch, uda):
    """A preset's "source_train" entries reach the source training config and its "uda" entries the adaptation
    config in the UDA mode only. The quick preset's source recipe: 144x192, rare-class sampling and the balanced loss
    with square-rooted weights; no shipped preset holds "uda"."""
    import segadapt.adapt.engine as eng
    import segadapt.adapt.train_source as ts
    from segadapt.pipeline import PIPELINE_PRESETS, _PipelineRun

    assert all("uda" not in p for p in PIPELINE_PRESETS.values()) and "source_train" not in PIPELINE_PRESETS["full"]
    assert PIPELINE_PRESETS["quick"]["size"] == (144, 192)
    assert PIPELINE_PRESETS["quick"]["source_train"] == {"rare_class_sampling": True, "loss": "balanced",
                                                         "class_weight_power": 0.5}
    seen = {}
    monkeypatch.setattr(ts, "train_source", lambda cfg, log=None: seen.setdefault("src", cfg) and {"steps": 0})
    monkeypatch.setattr(eng, "adapt", lambda cfg, log=None: seen.setdefault("cfg", cfg) and {"steps": 0})
    run = _PipelineRun(PipelineConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), uda=uda,
                                      device="cpu"), log=lambda *_: None)
    run.p = {**run.p, "source_train": {"rare_class_sampling": True, "loss": "ohem"},
             "uda": {"rare_class_sampling": True}}
    run.step_train_source()
    run.state["done"]["train_source"] = {"checkpoint": str(tmp_path / "ck")}
    run.step_adapt()
    assert seen["src"].rare_class_sampling and seen["src"].loss == "ohem"
    assert seen["cfg"].rare_class_sampling == uda
