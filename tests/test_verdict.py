"""The adaptation's verdict after label-free selection: in the exported metadata, in ``predict --watch``'s swap line,
in the demo's Adapt tab (shown, and a second click to serve a model not expected to help), and serving that keeps
the replaced model for a one-click revert."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from segadapt.runtime.hot_swap import file_sha256, keep_copy
from segadapt.runtime.metadata import ModelMetadata, metadata_path, selection_record, verdict_line

NO_BETTER = {"rule": "consensus", "picked": "source", "verdict": "no better", "margin": -0.8,
             "reason": "The validators disagree on every candidate", "candidates": [{"name": "source"}]}
BETTER = {"rule": "consensus", "picked": "adabn_0.75", "verdict": "better", "margin": 1.2,
          "reason": "All validators prefer adabn_0.75.", "candidates": []}


def _variant(src: Path, dst: Path, **changes) -> Path:
    """A complete copy of the ONNX model ``src`` at ``dst`` whose metadata (embedded and beside it) has ``changes``
    (so its bytes, and its SHA-256, differ from ``src``)."""
    import onnx

    m = onnx.load(str(src))
    meta = {**json.loads(metadata_path(src).read_text()), **changes}
    for e in m.metadata_props:
        if e.key == "segadapt":
            e.value = json.dumps(meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    metadata_path(dst).write_text(json.dumps(meta))
    return dst


# -- metadata and export ----------------------------------------------------------------------------------------

def test_metadata_keeps_the_verdict_and_reads_older_files(tiny_classes, tmp_path):
    meta = ModelMetadata(classes=list(tiny_classes.names), palette=[list(c) for c in tiny_classes.palette])
    assert meta.adaptation == {}
    old = meta.to_dict()
    del old["adaptation"]  # metadata written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ModelMetadata.load(tmp_path / "old.json").adaptation == {}
    rec = selection_record(NO_BETTER)
    assert rec == {k: NO_BETTER[k] for k in ("verdict", "margin", "picked", "rule", "reason")}  # no candidates
    meta.adaptation = rec
    meta.save(tmp_path / "new.json")
    assert ModelMetadata.load(tmp_path / "new.json").adaptation == rec
    assert verdict_line(rec) == "adaptation verdict: no better (margin -0.8)"
    assert verdict_line(BETTER) == "adaptation verdict: better (margin +1.2)"
    assert verdict_line({}) == verdict_line(None) == verdict_line({"rule": "last"}) == ""


def test_export_copies_the_checkpoints_selection(tiny_checkpoint, tiny_onnx, tiny, tmp_path):
    from segadapt.adapt.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from segadapt.export.config import ExportConfig
    from segadapt.export.onnx_export import export_onnx
    from segadapt.runtime.predictor import load_metadata

    model, meta = load_checkpoint(tiny_checkpoint)
    sel = {k: NO_BETTER[k] for k in ("rule", "picked", "verdict", "margin", "reason")}
    ck = save_checkpoint(tmp_path / "adapted", model, CheckpointMeta(meta.classes, meta.mean, meta.std,
                                                                     meta.input_size, {**meta.info, "selection": sel}))
    res = export_onnx(ExportConfig(checkpoint=str(ck), out=str(tmp_path / "out"), parity_data=str(tiny / "target"),
                                   parity_frames=1), log=lambda *_: None)
    onnx_path = res.files["fp32"]
    assert json.loads(metadata_path(onnx_path).read_text())["adaptation"] == sel
    metadata_path(onnx_path).unlink()
    assert load_metadata(onnx_path).adaptation == sel  # the copy embedded in the graph carries it too
    assert json.loads(metadata_path(tiny_onnx).read_text())["adaptation"] == {}  # a checkpoint without selection


# -- predict --watch ----------------------------------------------------------------------------------------------

def test_watch_names_the_new_models_verdict(tiny_onnx, tmp_path, caplog):
    from segadapt.runtime.predictor import Predictor

    served = tmp_path / "served" / "model.onnx"
    _variant(Path(tiny_onnx), served)
    pred = Predictor(served, providers=["cpu"], watch=0.0)
    staged = _variant(Path(tiny_onnx), tmp_path / "staged" / "model.onnx", adaptation=selection_record(NO_BETTER))
    with caplog.at_level(logging.INFO, logger="segadapt.runtime.hot_swap"):
        ev = pred.watcher.install(staged)
    assert ev.swapped and ev.message.endswith("; adaptation verdict: no better (margin -0.8)"), ev.message
    assert "adaptation verdict: no better (margin -0.8)" in caplog.text
    assert pred.metadata.adaptation["verdict"] == "no better"
    ev = pred.watcher.install(_variant(Path(tiny_onnx), tmp_path / "plain" / "model.onnx", created="later"))
    assert ev.swapped and "verdict" not in ev.message  # a model without a verdict: nothing said about it


def test_keep_copy_is_complete_and_never_overwrites(tiny_onnx, tmp_path):
    served = _variant(Path(tiny_onnx), tmp_path / "m.onnx")
    a, b = keep_copy(served), keep_copy(served)
    assert a != b and a.name.startswith("m.previous-") and a.suffix == ".onnx"
    for k in (a, b):
        assert file_sha256(k) == file_sha256(served)
        assert metadata_path(k).read_text() == metadata_path(served).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        keep_copy(tmp_path / "gone.onnx")


# -- the demo's Adapt tab -----------------------------------------------------------------------------------------

@pytest.fixture
def tab_with_job(tiny_onnx, tiny, tmp_path):
    """An AdaptTab over a watched copy of the tiny model and a finished job whose adapted model is a variant of it
    (same weights, other metadata): ``(tab, job, served path, original sha256)``; the job writes no summary."""
    from segadapt.demo.adapt_job import AdaptJob, Budget, FootageCaps, prepare_footage
    from segadapt.demo.adapt_tab import AdaptSettings, AdaptTab
    from segadapt.runtime.predictor import Predictor

    served = _variant(Path(tiny_onnx), tmp_path / "models" / "served.onnx")
    pred = Predictor(served, providers=["cpu"], watch=3600.0)
    ck = tmp_path / "ck"
    ck.mkdir()
    tab = AdaptTab(pred, None, AdaptSettings(checkpoint=str(ck), work_dir=str(tmp_path / "w"), compare_frames=2))
    frames = sorted((tiny / "target" / "images").iterdir())[:2]
    footage = prepare_footage([str(f) for f in frames], tmp_path / "job", FootageCaps())
    job = AdaptJob(ck, footage, tmp_path / "job", pred.metadata, served.parent, "served.adapted-x", Budget())
    job.status.stage, job.status.onnx = "done", _variant(Path(tiny_onnx), served.parent / "served.adapted-x.onnx",
                                                         created="adapted")
    job.run_dir.mkdir(parents=True)
    tab.jobs["s"] = job
    return tab, job, served, file_sha256(served)


def _summary(job, selection) -> None:
    (job.run_dir / "summary.json").write_text(json.dumps({"steps": 10, **({"selection": selection}
                                                                          if selection else {})}))


def test_result_shows_the_verdict(tab_with_job):
    tab, job, _, _ = tab_with_job
    label = next(iter(tab.models))
    _summary(job, BETTER)
    text = tab.result(label, job)[0]
    assert "**Verdict: better than the model it started from** (validator margin +1.2): All validators prefer" in text
    _summary(job, NO_BETTER)
    text = tab.result(label, job)[0]
    assert "**Verdict: no better than the model it started from** (validator margin -0.8)" in text
    assert "not expected to help" in text and "(`source`)" in text
    _summary(job, None)  # an older run, or --select last: nothing about a verdict
    assert "Verdict" not in tab.result(label, job)[0]


def test_serve_asks_twice_keeps_the_previous_model_and_reverts(tab_with_job):
    tab, job, served, orig = tab_with_job
    adapted_sha, orig_meta = file_sha256(job.status.onnx), metadata_path(served).read_text()
    _summary(job, NO_BETTER)
    first = tab.serve("s")
    assert first.startswith("**Not served yet.**") and "no better" in first and "again" in first, first
    assert file_sha256(served) == orig and not list(served.parent.glob("served.previous-*"))
    assert tab.serve("other session") == "Nothing to serve: run an adaptation first."
    second = tab.serve("s")
    assert second.startswith("**Serving**") and "Revert to the previous model" in second, second
    assert file_sha256(served) == adapted_sha == tab.served.watcher.sha256
    kept = next(served.parent.glob("served.previous-*.onnx"))
    assert file_sha256(kept) == orig and metadata_path(kept).read_text() == orig_meta
    assert ModelMetadata.load(metadata_path(served)).created == "adapted"
    label = next(iter(tab.models))
    assert tab.models[label][1] == job.run_dir / "adapted"
    text = tab.revert("s")
    assert text.startswith("**Reverted**") and kept.name in text, text
    assert file_sha256(served) == orig == tab.served.watcher.sha256
    assert metadata_path(served).read_text() == orig_meta
    assert tab.models[label][1] == Path(tab.settings.checkpoint) and "s" not in tab.previous
    assert len(list(served.parent.glob("served.previous-*.onnx"))) == 1  # the adapted model has its own file
    assert tab.revert("s").startswith("Nothing to revert")


def test_serve_once_when_better_or_no_verdict(tab_with_job):
    tab, job, served, orig = tab_with_job
    _summary(job, BETTER)
    assert tab.serve("s").startswith("**Serving**") and file_sha256(served) == file_sha256(job.status.onnx)
    assert tab.serve("s").startswith("Already serving")  # a second click keeps the original as the one to revert to
    assert len(list(served.parent.glob("served.previous-*.onnx"))) == 1
    assert tab.revert("s").startswith("**Reverted**") and file_sha256(served) == orig
    _summary(job, None)
    assert tab.serve("s").startswith("**Serving**") and file_sha256(served) == file_sha256(job.status.onnx)


def test_serve_refuses_when_the_copy_cannot_be_kept(tab_with_job, monkeypatch):
    from segadapt.demo import adapt_tab

    tab, job, served, orig = tab_with_job

    def fail(path):
        raise OSError(f"{path}: read-only folder")

    monkeypatch.setattr(adapt_tab, "keep_copy", fail)
    text = tab.serve("s")
    assert text.startswith("**Not served**") and "read-only" in text and file_sha256(served) == orig
    assert tab.served.watcher.swaps == 0


def test_verdict_markdown_wording():
    from segadapt.demo.adapt_tab import verdict_markdown

    assert verdict_markdown({}) == ""
    text = verdict_markdown({**NO_BETTER, "verdict": "uncertain", "picked": "step_000150", "margin": 0.05})
    assert text.startswith("**Verdict: uncertain** (validator margin +0.05): The validators disagree")
    assert "cannot tell whether adaptation helped" in text and "`step_000150`" in text
    text = verdict_markdown({**NO_BETTER, "picked": "step_000150"})
    assert text.startswith("**Verdict: no better than the model it started from**") and "not expected to help" in text
