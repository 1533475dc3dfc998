"""The label-free adaptation monitor (issue #12): its numbers on hand-built maps, monitor.png and the jsonl keys of
a tiny adaptation run, the stopping rule, and the pipeline report's link to the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from segadapt.adapt.config import AdaptConfig, MonitorConfig, RectifierConfig
from segadapt.adapt.monitor import LabelFreeMonitor, MonitorStep, class_shares, mean_entropy, stop_reason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _onehot(labels: torch.Tensor, k: int, p: float = 1.0) -> torch.Tensor:
    """(B, H, W) labels -> (B, K, H, W) probabilities with ``p`` on the label and the rest spread evenly."""
    oh = torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float()
    return oh * p + (1 - oh) * (1 - p) / (k - 1)


def test_identical_maps_agree_fully_with_no_drift_and_known_entropy():
    k = 4
    labels = torch.tensor([[[0, 1, 2, 3], [0, 0, 1, 1]]])  # (1, 2, 4)
    probs = _onehot(labels, k, p=0.7)
    mon = LabelFreeMonitor(k, ignore_index=255)
    r = mon.update(probs, probs.clone(), labels, None, step=5)
    assert r["anchor_agreement"] == 1.0 and r["class_drift"] == 0.0 and r["drift_reference"] == "anchor"
    # entropy of (0.7, 0.1, 0.1, 0.1) / log 4, the same at every pixel
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)) / math.log(4)
    assert r["entropy"] == pytest.approx(h, abs=1e-4)
    assert r["teacher_shares"] == [0.375, 0.375, 0.125, 0.125]
    assert mon.history[-1].coverage == [0.375, 0.375, 0.125, 0.125] and mon.history[-1].step == 5
    assert mean_entropy(torch.full((1, k, 2, 2), 1 / k)) == pytest.approx(1.0)  # uniform
    assert mean_entropy(_onehot(labels, k)) == pytest.approx(0.0, abs=1e-6)  # one-hot


def test_drift_agreement_and_padding_on_hand_built_maps():
    k = 3
    teacher_lab = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2]]])
    anchor_lab = torch.tensor([[[0, 0, 1, 1], [1, 1, 2, 2]]])
    mon = LabelFreeMonitor(k, ignore_index=255)
    r = mon.update(_onehot(teacher_lab, k), _onehot(anchor_lab, k), teacher_lab)
    # teacher shares (4, 2, 2)/8, anchor (2, 4, 2)/8: TV = 0.5 * (2 + 2) / 8
    assert r["class_drift"] == pytest.approx(0.25) and r["anchor_agreement"] == pytest.approx(6 / 8)
    # padding (the two disagreeing pixels and one more) is excluded everywhere
    valid = torch.ones_like(teacher_lab, dtype=torch.bool)
    valid[0, 0, 1:] = False
    r = mon.update(_onehot(teacher_lab, k), _onehot(anchor_lab, k), teacher_lab, valid)
    assert r["anchor_agreement"] == 1.0 and r["class_drift"] == 0.0
    assert r["teacher_shares"] == pytest.approx([0.2, 0.4, 0.4])
    # rejected pseudo-labels count as uncovered; coverage is per valid pixel
    pl = teacher_lab.clone()
    pl[0, 1, 0] = 255
    mon.update(_onehot(teacher_lab, k), None, pl, valid)
    assert mon.history[-1].coverage == pytest.approx([0.2, 0.2, 0.4]) and mon.history[-1].anchor_agreement is None
    with pytest.raises(ValueError, match="valid mask"):
        class_shares(_onehot(teacher_lab, k), valid[0])


def test_without_anchor_the_first_logged_step_is_the_reference():
    k = 2
    a = torch.tensor([[[0, 0, 0, 1]]])
    b = torch.tensor([[[0, 1, 1, 1]]])
    mon = LabelFreeMonitor(k, ignore_index=255)
    r1 = mon.update(_onehot(a, k), None, a)
    r2 = mon.update(_onehot(b, k), None, b)
    assert r1["anchor_agreement"] is None and r1["class_drift"] == 0.0 and r1["drift_reference"] == "first_step"
    assert r2["class_drift"] == pytest.approx(0.5)  # shares (0.75, 0.25) -> (0.25, 0.75)
    assert [s.step for s in mon.history] == [1, 2]


def test_stopping_rule_needs_patience_consecutive_violations():
    cfg = MonitorConfig(stop=True, max_drift=0.2, min_agreement=0.5, patience=2)

    def s(step, drift, agree):
        return MonitorStep(step, [], 0.5, agree, drift, [])

    assert stop_reason([s(1, 0.3, 0.9)], cfg) is None  # one violation, patience 2
    assert stop_reason([s(1, 0.3, 0.9), s(2, 0.1, 0.9)], cfg) is None  # the last one is fine
    assert stop_reason([s(1, 0.3, 0.9), s(2, 0.1, 0.9), s(3, 0.25, 0.9)], cfg) is None  # not consecutive
    why = stop_reason([s(1, 0.1, 0.9), s(2, 0.3, 0.9), s(3, 0.05, 0.4)], cfg)
    assert why is not None and "steps 2-3" in why and "agreement 0.400 < 0.5" in why
    assert stop_reason([s(1, 0.1, None), s(2, 0.1, None)], MonitorConfig(min_agreement=1.0, patience=2)) is None


@pytest.fixture()
def tiny_adapt(tiny_checkpoint, tiny, tmp_path):
    return AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                       select="last", steps=3, batch_size=2, num_workers=0, debug_every=0, log_every=1, save_every=100,
                       rectifier=RectifierConfig(warmup_steps=1))


def test_adapt_run_writes_monitor_png_and_jsonl_keys(tiny_adapt):
    from segadapt.adapt.engine import adapt

    s = adapt(tiny_adapt, log=lambda *_: None)
    out = Path(tiny_adapt.out)
    png = out / "monitor.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert s["monitor_plot"] == str(png) and s["stopped_early"] is None and s["steps"] == 3
    recs = [json.loads(line) for line in (out / "coverage.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["drift_reference"] == "anchor" and 0 <= r["class_drift"] <= 1 and 0 < r["entropy"] < 1
        assert 0 <= r["anchor_agreement"] <= 1 and sum(r["teacher_shares"]) == pytest.approx(1, abs=1e-3)
    # step 1: the teacher is still the AdaBN model, i.e. the anchor
    assert recs[0]["anchor_agreement"] == 1.0 and recs[0]["class_drift"] == 0.0
    assert s["monitor"]["last"]["step"] == 3 and s["monitor"]["logged_steps"] == 3
    assert json.loads((out / "summary.json").read_text())["monitor_plot"] == str(png)


def test_stopping_rule_stops_a_run_and_says_why(tiny_adapt):
    from segadapt.adapt.models.checkpoint import load_training_state
    from segadapt.adapt.engine import adapt

    # thresholds that any change of the teacher violates; step 1 cannot (the teacher is still the anchor), so with
    # patience 2 the run stops at step 3 of 6, between two checkpoints
    tiny_adapt.monitor = MonitorConfig(stop=True, max_drift=0.0, min_agreement=1.0, patience=2)
    tiny_adapt.steps = 6
    tiny_adapt.lr, tiny_adapt.teacher.alpha = 5e-3, 0.0  # the teacher is the student: it leaves the anchor at once
    s = adapt(tiny_adapt, log=lambda *_: None)
    out = Path(tiny_adapt.out)
    assert s["steps"] == 3 and "label-free stopping rule" in s["stopped_early"] and "steps 2-3" in s["stopped_early"]
    assert json.loads((out / "summary.json").read_text())["stopped_early"] == s["stopped_early"]
    assert load_training_state(out / "last")["step"] == s["steps"]  # the checkpoint of the stop step
    assert (out / "monitor.png").read_bytes()[:8] == PNG_MAGIC


def test_pipeline_report_records_and_embeds_the_monitor_plot(tmp_path):
    from segadapt.pipeline import PIPELINE_PRESETS, PipelineConfig, build_report, report_markdown

    out = tmp_path / "pipe"
    plot = out / "adapt" / "monitor.png"
    summary = {"steps": 40, "size": [120, 160], "monitor_plot": str(plot), "stopped_early": "label-free stopping "
               "rule: 3 consecutive logged steps violated it (steps 20-40; last: class-share drift 0.310 > 0.2)",
               "monitor": {"logged_steps": 3, "stop_rule": None,
                           "last": {"step": 40, "entropy": 0.21, "anchor_agreement": 0.83, "class_drift": 0.31}}}
    state = {"done": {"adapt": {"checkpoint": str(out / "adapt" / "adapted"), "summary": summary, "seconds": 1.0}}}
    cfg = PipelineConfig(out=str(out), preset="quick")
    rep = build_report(cfg, PIPELINE_PRESETS["quick"], state)
    assert rep["files"]["monitor_plot"] == str(plot) and rep["adapt_monitor"]["last"]["class_drift"] == 0.31
    md = report_markdown(rep)
    assert "![adaptation monitor](adapt/monitor.png)" in md and "stopped early" in md
    assert "drift 0.310, teacher-anchor agreement 0.830" in md
    # a run from before the monitor: no section, no link
    del summary["monitor"], summary["monitor_plot"]
    rep = build_report(cfg, PIPELINE_PRESETS["quick"], state)
    assert rep["adapt_monitor"] is None and "monitor" not in report_markdown(rep)


def test_resumed_monitor_reads_its_history_and_reference_back(tmp_path):
    k = 2
    a, b = torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 1, 1, 1]]])
    mon = LabelFreeMonitor(k, ignore_index=255)
    log = tmp_path / "coverage.jsonl"
    lines = []
    for step, lab in ((10, a), (20, a)):
        rec = {"step": step, "coverage": {"x": 0.0, "y": 0.0}, **mon.update(_onehot(lab, k), None, lab, step=step)}
        lines.append(json.dumps(rec))
    log.write_text("\n".join(lines) + "\n" + '{"step": 30, "cov')  # a line cut by a kill
    again = LabelFreeMonitor(k, 255, MonitorConfig(max_drift=0.4, patience=2))
    assert again.load_log(log) == 2 and [s.step for s in again.history] == [10, 20]
    assert again.update(_onehot(b, k), None, b, step=30)["class_drift"] == pytest.approx(0.5)  # vs step 10's shares
    assert again.stop_reason() is None  # one violation after the resume, patience 2
    again.update(_onehot(b, k), None, b, step=40)
    assert "steps 30-40" in again.stop_reason()


def test_keep_saves_keeps_each_saved_model_to_pick_a_step_afterwards(tiny_adapt):
    from safetensors.torch import load_file

    from segadapt.adapt.engine import adapt

    tiny_adapt.steps, tiny_adapt.save_every, tiny_adapt.keep_saves = 4, 2, True
    tiny_adapt.lr, tiny_adapt.teacher.alpha = 5e-3, 0.0  # the kept (teacher) model changes every step
    adapt(tiny_adapt, log=lambda *_: None)
    out = Path(tiny_adapt.out)
    saves = sorted(p.name for p in (out / "saves").iterdir())
    assert saves == ["step_000002", "step_000004"]
    w2, w4, final = (load_file(d / "model.safetensors") for d in
                     (out / "saves" / saves[0], out / "saves" / saves[1], out / "adapted"))
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)  # two different models, not one copied twice
    assert all(torch.equal(w4[k], final[k]) for k in final)  # the last save is the adapted model


def test_stop_rule_benchmark_picks_the_saves_its_rules_name():
    """benchmarks/probes/stop_rule.py on hand-built saves and log records: window means per save; each rule picks the first
    save at or after the logged step where the monitor's rule fires (the entropy floor over ``patience`` steps)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "probes" / "stop_rule.py"
    spec = importlib.util.spec_from_file_location("stop_rule", path)
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)

    ent = {10: 0.30, 20: 0.30, 30: 0.20, 40: 0.20, 50: 0.10, 60: 0.10}
    drift = {10: 0.0, 20: 0.0, 30: 0.5, 40: 0.5, 50: 0.5, 60: 0.5}
    recs = [{"step": s, "entropy": ent[s], "anchor_agreement": 0.9, "class_drift": drift[s], "kept": 0.5,
             "teacher_shares": [0.5, 0.5]} for s in ent]
    steps = [20, 40, 60]
    rows = [{"step": s, "miou": m, **w} for s, m, w in zip(steps, [30.0, 32.0, 28.0], sr.window_means(recs, steps))]
    assert [r["entropy"] for r in rows] == pytest.approx([0.30, 0.20, 0.10])
    picks = sr.picks(rows, recs, [0.7, 0.5, 0.1], MonitorConfig(max_drift=0.2, min_agreement=0.5, patience=2))
    assert picks["final"]["step"] == 60 and picks["best (labels)"]["step"] == 40
    # first 2 logged steps: mean 0.30; last 2 at step 40: 0.20 <= 0.7 x 0.30; at step 60: 0.10 <= 0.5 x 0.30
    assert picks["entropy_floor 0.7"] == {"step": 40, "miou": 32.0, "fired_at": 40}
    assert picks["entropy_floor 0.5"]["fired_at"] == 60 and picks["entropy_floor 0.1"]["fired_at"] is None
    assert picks["drift_agreement"]["fired_at"] == 40 and picks["drift_agreement"]["step"] == 40


def test_entropy_floor_stops_on_the_relative_drop_only_when_switched_on():
    from segadapt.adapt.monitor import entropy_floor_reason

    hist = [MonitorStep(s, [], e, 0.9, 0.0, []) for s, e in zip(range(1, 7), [0.4, 0.4, 0.3, 0.3, 0.2, 0.2])]
    assert stop_reason(hist, MonitorConfig(patience=2)) is None  # off by default
    assert entropy_floor_reason(hist[:3], MonitorConfig(patience=2, entropy_floor=0.9)) is None  # too few steps
    assert entropy_floor_reason(hist[:4], MonitorConfig(patience=2, entropy_floor=0.7)) is None  # 0.3 > 0.28
    why = stop_reason(hist, MonitorConfig(patience=2, entropy_floor=0.5))  # 0.2 <= 0.5 x 0.4
    assert why is not None and "entropy 0.2000" in why and "steps 5-6" in why and "steps 1-2" in why
    nan = [MonitorStep(1, [], float("nan"), 0.9, 0.0, [])] + hist[1:]  # a step without valid pixels
    assert entropy_floor_reason(nan, MonitorConfig(patience=2, entropy_floor=0.5)) is None
