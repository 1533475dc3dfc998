"""The CrossMatch RGB-D stream that learns (issue #12): the depth-input weights' own optimiser group, the validity
channel, the depth cache computed once in the main process, and the per-step stream diagnostics. Real KITTI frames
with their measured (sparse) disparity, shrunk to a tiny size."""

import json
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segadapt.adapt.config import AdaptConfig, DepthConfig, RectifierConfig

MAIN_PID = os.getpid()


@pytest.fixture(scope="module")
def depth_folder(kitti, tmp_path_factory) -> Path:
    """The 5 KITTI frames at 94x310 with their ground-truth disparity as .npy (about 80 % of pixels missing = 0)."""
    root = tmp_path_factory.mktemp("kd")
    (root / "images").mkdir()
    (root / "disp").mkdir()
    for f in sorted((kitti / "image_2").iterdir()):
        img = cv2.resize(cv2.imread(str(f)), (310, 94), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / "images" / f.name), img)
        raw = cv2.imread(str(kitti / "disp_occ_0" / f.name), cv2.IMREAD_UNCHANGED).astype(np.float32) / 256.0
        np.save(root / "disp" / f"{f.stem}.npy", cv2.resize(raw, (310, 94), interpolation=cv2.INTER_NEAREST) / 4)
    return root


@dataclass
class CountingDepth:
    """A files provider that counts its calls and refuses to run outside the main (test) process."""

    directory: str
    calls: ClassVar[list] = [0]

    def __call__(self, image_path, image):
        from segadapt.adapt.data.depth import FileDepth

        if os.getpid() != MAIN_PID:
            raise RuntimeError("depth computed inside a DataLoader worker")
        self.calls[0] += 1
        return FileDepth(self.directory)(image_path, image)


def depth_cfg(ckpt, folder: Path, out: Path, **kw) -> AdaptConfig:
    base = dict(checkpoint=str(ckpt), target=str(folder / "images"), out=str(out), size=(64, 208), steps=5,
                select="last", batch_size=2, num_workers=0, debug_every=0, log_every=1, save_every=5,
                rectifier=RectifierConfig(enabled=False),
                depth=DepthConfig(provider="files", directory=str(folder / "disp")))
    base.update(kw)
    return AdaptConfig(**base)


def test_depth_input_weights_learn_in_their_own_group_and_steps_are_logged(tiny_checkpoint, depth_folder, tmp_path):
    from segadapt.adapt.models.checkpoint import load_checkpoint, load_training_state
    from segadapt.adapt.engine import adapt

    cfg = depth_cfg(tiny_checkpoint, depth_folder, tmp_path / "run")
    adapt(cfg, log=lambda *_: None)
    st = load_training_state(tmp_path / "run" / "last")
    rgbd = st["components"]["rgbd_stream"]["model"]
    (key,) = [k for k in rgbd if k.endswith("original1")]
    w = rgbd[key]
    assert w.shape[1] == 2  # depth + validity, zero at the start
    # AdamW moves a weight by about lr per step: at the backbone's lr it could move at most 5 lr in 5 steps
    assert w.abs().max() > 10 * cfg.learning_rate() * cfg.steps
    (g,) = [g for g in st["optimizer"]["param_groups"] if g.get("name") == "depth_input"]
    assert g["lr"] == cfg.depth.input_lr and g["weight_decay"] == 0.0 and len(g["params"]) == 1
    recs = [json.loads(line) for line in (tmp_path / "run" / "coverage.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    norms = [r["depth_w_norm"] for r in recs]
    assert norms[0] > 0 and norms[-1] > norms[0]
    assert abs(norms[-1] - float(w.norm())) < 1e-4  # the logged norm is the trained weight's
    for r in recs:
        assert 0.0 <= r["stream_agreement"] <= 1.0 and 0.0 <= r["rgbd_removed"] <= 1.0
        assert r["kept"] + r["rgbd_removed"] <= 1.0 + 1e-6
    assert recs[0]["stream_agreement"] == 1.0  # both teachers start as the source model
    # the exported model stays RGB
    model, _ = load_checkpoint(tmp_path / "run" / "adapted")
    assert model.in_channels == 3
    # a resumed run restores the split stem and the extra optimiser group
    cfg.steps, cfg.resume = 6, True
    assert adapt(cfg, log=lambda *_: None)["steps"] == 6
    st = load_training_state(tmp_path / "run" / "last")
    assert not torch.equal(st["components"]["rgbd_stream"]["model"][key], w)


def test_validity_channel_marks_missing_depth_and_reaches_the_output(tiny_checkpoint, depth_folder):
    from segadapt.adapt.augment import normalize
    from segadapt.adapt.data.datasets import ImageFolder, collate
    from segadapt.adapt.data.depth import FileDepth
    from segadapt.adapt.data.transforms import Resize
    from segadapt.adapt.methods.rgbd_stream import depth_input
    from segadapt.adapt.models.rgbd_segmenter import depth_input_weight, make_rgbd_segmenter
    from segadapt.adapt.models.checkpoint import load_segmenter

    ds = ImageFolder(depth_folder / "images", transform=Resize((64, 208)),
                     depth_provider=FileDepth(str(depth_folder / "disp")))
    batch = collate([ds[0], ds[1]])
    extra = depth_input(batch, validity_channel=True)
    assert extra.shape == (2, 2, 64, 208)
    raw = np.load(depth_folder / "disp" / f"{ds.files[0].stem}.npy")
    raw = cv2.resize(raw, (208, 64), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(extra[0, 1].numpy() == 0, raw <= 0)  # 0 exactly where KITTI has no measurement
    assert 0.05 < float(extra[:, 1].mean()) < 0.6  # sparse ground truth: both kinds of pixel present
    assert depth_input(batch, validity_channel=False).shape == (2, 1, 64, 208)

    src, meta = load_segmenter(tiny_checkpoint)
    src.eval()
    aux = make_rgbd_segmenter(src, extra_channels=2).eval()
    x = normalize(batch["image"], meta.mean, meta.std)
    flipped = extra.clone()
    flipped[:, 1] = 1 - flipped[:, 1]
    with torch.no_grad():
        ref = src(x)
        scale = float(ref.abs().max())
        assert float((aux(torch.cat([x, extra], 1)) - ref).abs().max()) <= 1e-5 * scale  # zero-initialised
        depth_input_weight(aux)[:, 1].normal_(0, 0.1)  # only the validity channel's weights
        a = aux(torch.cat([x, extra], 1))
        b = aux(torch.cat([x, flipped], 1))
    assert float((a - b).abs().max()) > 1e-3 * scale


def test_depth_cache_is_computed_once_in_the_main_process_and_reused(tiny_checkpoint, depth_folder, tmp_path,
                                                                     monkeypatch):
    from segadapt.adapt import engine
    from segadapt.adapt.data.depth import FileDepth
    from segadapt.adapt.data.depth_cache import CachedDepth, DepthCache

    files = sorted((depth_folder / "images").iterdir())
    counting = CountingDepth(str(depth_folder / "disp"))
    counting.calls[0] = 0
    monkeypatch.setattr(engine, "make_depth_provider", lambda *a, **k: counting)
    cache = tmp_path / "cache"
    # two DataLoader workers (forked): the provider would raise there; they only read the cache
    cfg = depth_cfg(tiny_checkpoint, depth_folder, tmp_path / "a", steps=2, num_workers=2,
                    depth=DepthConfig(provider="files", directory="unused", cache_dir=str(cache)))
    engine.adapt(cfg, log=lambda *_: None)
    assert counting.calls[0] == len(files)
    assert len(list(cache.glob("*.npz"))) == len(files) and not list(cache.glob(".*"))  # no temporary left
    cfg.out = str(tmp_path / "b")
    run = engine.Engine(cfg, log=lambda *_: None)  # a second run: everything comes from the cache
    assert counting.calls[0] == len(files)
    assert type(run.ds.depth_provider) is CachedDepth  # what the workers get holds no provider
    # the cache holds what the provider gives (float16 depth)
    ref = FileDepth(str(depth_folder / "disp"))
    img = cv2.cvtColor(cv2.imread(str(files[0])), cv2.COLOR_BGR2RGB)
    d, v = run.ds.depth_provider(files[0], img)
    d0, v0 = ref(files[0], img)
    assert np.array_equal(v, v0) and np.abs(d - d0).max() < 1e-3 and d.dtype == np.float32
    # other provider settings or an edited frame get their own file
    other = DepthCache(FileDepth(str(depth_folder / "disp"), png_scale=100.0), cache)
    assert other.path_for(files[0]) != DepthCache(ref, cache).path_for(files[0])
    frame = tmp_path / files[0].name
    frame.write_bytes(files[0].read_bytes())
    before = DepthCache(ref, cache).path_for(frame)
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10 ** 9))
    assert DepthCache(ref, cache).path_for(frame) != before
    with pytest.raises(FileNotFoundError, match="no cached depth"):
        run.ds.depth_provider(frame, img)


def test_stream_statistics_on_known_maps():
    from segadapt.adapt.methods.rgbd_stream import fusion_removed, stream_agreement

    p1 = torch.zeros(1, 3, 2, 2)
    p2 = torch.zeros(1, 3, 2, 2)
    p1[0, 0] = 1.0  # RGB says class 0 everywhere
    p2[0, 0, 0] = 1.0  # RGB-D agrees on the top row ...
    p2[0, 2, 1] = 1.0  # ... and says class 2 on the bottom row
    valid = torch.tensor([[[True, False], [True, True]]])
    assert stream_agreement(p1, p2, valid) == pytest.approx(1 / 3)
    assert stream_agreement(p1, p2, torch.zeros_like(valid)) == 1.0
    kept = torch.tensor([[[True, True], [True, False]]])
    agree = p1.argmax(1) == p2.argmax(1)
    assert fusion_removed(kept, agree) == pytest.approx(1 / 4)
    real = torch.tensor([[[True, True], [False, False]]])
    assert fusion_removed(kept, agree, real) == 0.0
