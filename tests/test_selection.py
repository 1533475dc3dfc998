"""``segadapt adapt --select auto``: candidates scored on the target frames, the rule's pick in adapted/, the verdict
in selection.json, summary.json and the adapted checkpoint's metadata."""

import json
from pathlib import Path

import pytest
import torch

from segadapt.adapt.config import AdaptConfig, RectifierConfig, SelectionConfig


@pytest.fixture()
def select_cfg(tiny_checkpoint, tiny, tmp_path):
    return AdaptConfig(checkpoint=str(tiny_checkpoint), target=str(tiny / "target"), out=str(tmp_path / "ad"),
                       steps=4, save_every=2, batch_size=2, num_workers=0, debug_every=0, log_every=2, lr=5e-3,
                       rectifier=RectifierConfig(warmup_steps=1), selection=SelectionConfig(frames=6))


def weights(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule, expect", [("last", "step_000004"), ("source", "source")])
def test_adapted_holds_the_rules_pick_and_the_run_records_it(select_cfg, tiny_checkpoint, rule, expect):
    from segadapt.adapt.engine import adapt

    select_cfg.selection.rule = rule
    s = adapt(select_cfg, log=lambda *_: None)
    out = Path(select_cfg.out)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["picked"] == expect and sel["rule"] == rule and s["selection"]["picked"] == expect
    assert set(sel["candidates"]) == {"adabn_0.75", "source", "adabn_0.5", "adabn_1", "step_000002", "step_000004"}
    for vals in sel["candidates"].values():
        assert {"entropy", "im", "snd", "mixval_intra", "mixval_inter", "agreement", "drift"} <= set(vals)
    assert sel["candidates"]["adabn_0.75"]["agreement"] == 1.0 > sel["candidates"]["source"]["agreement"]
    assert sel["frames"] == 6
    src = tiny_checkpoint if expect == "source" else out / "saves" / expect
    assert same(weights(out / "adapted"), weights(src))  # adapted/ holds exactly the pick
    info = json.loads((out / "adapted" / "config.json").read_text())["info"]
    assert info["selection"]["picked"] == expect and info["selection"]["verdict"] == sel["verdict"]
    assert info["step"] == (4 if expect == "step_000004" else 0)  # the pick's own step
    assert json.loads((out / "summary.json").read_text())["selection"]["verdict"] == sel["verdict"]
    if expect == "source":
        assert sel["verdict"] == "no better"
    else:  # the verdict's interval over resampled frames brackets its margin
        lo, hi = sel["interval"]
        assert lo <= sel["margin"] <= hi and sel["verdict"] in ("better", "no better", "uncertain")


def test_default_rule_keeps_the_last_save_unless_mixval_intra_finds_it_below_adabn(select_cfg):
    from segadapt.adapt.engine import adapt
    from segadapt.adapt.selection import last_save

    assert SelectionConfig().rule == "guard:mixval_intra"
    s = adapt(select_cfg, log=lambda *_: None)["selection"]
    c = s["candidates"]
    last_ok = c[last_save(c)]["mixval_intra"] >= c["adabn_0.75"]["mixval_intra"]
    untrained = max((n for n in c if not n.startswith("step_")), key=lambda n: c[n]["mixval_intra"])
    assert s["picked"] == (last_save(c) if last_ok else untrained)


def test_saves_of_an_earlier_run_in_the_folder_are_not_candidates(select_cfg):
    from segadapt.adapt.engine import adapt

    stale = Path(select_cfg.out) / "saves" / "step_000999"
    stale.mkdir(parents=True)  # an earlier, longer run's save
    select_cfg.selection.rule = "last"
    s = adapt(select_cfg, log=lambda *_: None)
    assert not stale.exists() and s["selection"]["picked"] == "step_000004"
    assert "step_000999" not in s["selection"]["candidates"]


def test_select_last_keeps_todays_behaviour(select_cfg):
    from segadapt.adapt.engine import adapt

    select_cfg.select = "last"
    s = adapt(select_cfg, log=lambda *_: None)
    out = Path(select_cfg.out)
    assert "selection" not in s and not (out / "selection.json").exists() and not (out / "saves").exists()


def test_scores_are_deterministic_and_padding_is_respected(tiny_checkpoint, tiny):
    from segadapt.adapt.data.datasets import ImageFolder
    from segadapt.adapt.data.transforms import Resize
    from segadapt.adapt.models.checkpoint import load_segmenter
    from segadapt.adapt.selection_scores import score_model, validation_frames

    model, meta = load_segmenter(tiny_checkpoint)
    model.eval()
    frames = validation_frames(ImageFolder(tiny / "target", transform=Resize((48, 64))), 5)
    assert len(frames.indices) == 5 and frames.indices[0] == 0 and frames.indices[-1] == 19  # spread over 20
    a, pred = score_model(model, frames, meta.mean, meta.std, "cpu")
    b, _ = score_model(model, frames, meta.mean, meta.std, "cpu", reference=pred)
    for k in ("entropy", "im", "snd", "mixval_intra", "mixval_inter"):
        assert a[k] == pytest.approx(b[k])
    assert b["agreement"] == 1.0 and b["drift"] == 0.0
    counts = a["mixval_intra_counts"]  # per frame [correct, total]: they add up to ICE_intra, none above its total
    assert len(counts) == 5 and all(0 <= h <= t for h, t in counts) and counts == b["mixval_intra_counts"]
    assert sum(h for h, _ in counts) / sum(t for _, t in counts) == pytest.approx(a["mixval_intra"])
    # padding: a per-pixel model (1x1 convolution: no receptive field reaching into the padding) scores the same
    # whatever the padding holds once it is marked invalid, and differently when it is not marked
    torch.manual_seed(0)
    pixelwise = torch.nn.Conv2d(3, 11, 1).eval()
    frames.images[:, :, :, 40:] = 0
    frames.valid[:, :, 40:] = False
    c, _ = score_model(pixelwise, frames, meta.mean, meta.std, "cpu")
    frames.images[:, :, :, 40:] = 255
    d, _ = score_model(pixelwise, frames, meta.mean, meta.std, "cpu")
    frames.valid[:] = True
    e, _ = score_model(pixelwise, frames, meta.mean, meta.std, "cpu")
    for k in ("entropy", "im", "snd", "mixval_intra", "mixval_inter"):
        assert c[k] == pytest.approx(d[k]), k
    assert e["entropy"] != pytest.approx(d["entropy"]) and e["im"] != pytest.approx(d["im"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        validation_frames(ImageFolder(tiny / "target", transform=Resize((48, 64))), 1)
