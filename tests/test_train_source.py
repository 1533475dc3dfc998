import json

import torch

from segadapt.adapt.config import ModelConfig, PhotometricConfig, SourceTrainConfig
from segadapt.adapt.models.checkpoint import load_checkpoint, load_training_state
from segadapt.adapt.train_source import train_source


def _cfg(tiny, out, steps):
    return SourceTrainConfig(
        data=str(tiny), train_split="source", val_split="target", out=str(out), size=(60, 80), crop=(48, 64),
        scale=(0.75, 1.25), batch_size=4, steps=steps, lr=1e-3, warmup_steps=2, val_every=3, save_every=2,
        num_workers=0, photometric=PhotometricConfig(), model=ModelConfig(arch="deeplabv3-mobilenetv2",
                                                                          variant="0.35", output_stride=16))


def test_training_reduces_loss_and_writes_checkpoints(tiny, tmp_path):
    s = train_source(_cfg(tiny, tmp_path / "run", 6), log=lambda *_: None)
    assert s["steps"] == 6 and 0 <= s["best_val_miou"] <= 100
    hist = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert any("val_miou" in h for h in hist)
    m, meta = load_checkpoint(tmp_path / "run" / "best")
    assert meta.info["command"] == "train-source" and meta.input_size == (60, 80)
    st = load_training_state(tmp_path / "run" / "last")
    assert st["step"] == 6


def test_resume_continues_from_last(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "run", 4)
    train_source(cfg, log=lambda *_: None)
    w4, _ = load_checkpoint(tmp_path / "run" / "last")
    cfg.steps, cfg.resume = 6, True
    msgs = []
    s = train_source(cfg, log=msgs.append)
    assert any("resuming" in m and "step 4" in m for m in msgs)
    assert s["steps"] == 6
    st = load_training_state(tmp_path / "run" / "last")
    assert st["step"] == 6
    # AdamW's per-parameter step counter continued from 4 (restored optimizer), not restarted at 0
    steps = {int(v["step"]) for v in st["optimizer"]["state"].values()}
    assert steps == {6}
    w6, _ = load_checkpoint(tmp_path / "run" / "last")
    diff = max((a - b).abs().max().item() for a, b in zip(w4.state_dict().values(), w6.state_dict().values())
               if a.dtype.is_floating_point)
    assert diff > 0
    assert torch.isfinite(torch.tensor(s["seconds"]))
