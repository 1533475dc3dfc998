"""Footage at scale (issue #15): adapt/data/footage.py on small synthetic videos written here with OpenCV (MPEG-4
part 2, ``mp4v``; a keyframe every 12 frames), so that seeking is exercised."""

import json

import av
import cv2
import numpy as np
import pytest
import torch

from segadapt.adapt.data import footage
from segadapt.adapt.data.footage import VideoFootage, probe_video, shard, spread

H, W = 48, 64


def _frame(k: int, moving: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 BGR frame ``k``: a gradient with a bright bar that moves 5 px per frame, and per-frame
    noise (static frames, ``moving=False``, are all the same image)."""
    x = np.linspace(0, 160, W, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(x, (H, W, 3)).copy()
    if moving:
        c = (5 * k) % W
        img[:, c:c + 6] = 250
        img += np.random.default_rng(k).normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(path, n: int, fps: float = 10.0, static: int = 0):
    """Write ``n`` frames (the first ``static`` of them identical) as an mp4v video; returns ``path``."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert w.isOpened()
    for k in range(n):
        w.write(_frame(k, moving=k >= static))
    w.release()
    return path


def _sequential(path) -> list:
    """Every frame of a video as (H, W, 3) uint8 RGB, decoded in order by PyAV (the reference)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("footage")
    vids = d / "videos"
    vids.mkdir()
    for i, n in enumerate((40, 25, 33)):
        _write(vids / f"v{i}.mp4", n)
    return {"long": _write(d / "long.mp4", 90), "folder": vids, "static": _write(d / "static.mp4", 60, static=30)}


def test_index_from_metadata_with_stride_and_budget(clips):
    m = probe_video(clips["long"])
    assert m.frames == 90 and m.rate == 10 and m.pts is None  # from the container, no packet scan
    ds = VideoFootage(clips["long"], stride=4)
    assert [k for _, k in ds.frame_ids()] == list(range(0, 90, 4))
    ds = VideoFootage(clips["long"], stride=4, budget=5)  # 23 candidates spread evenly: 0, 4, 9, 13, 18
    assert [k for _, k in ds.frame_ids()] == [0, 16, 36, 52, 72]
    assert spread(23, 5).tolist() == [0, 4, 9, 13, 18] and spread(3, 5).tolist() == [0, 1, 2]
    ds = VideoFootage(clips["folder"], stride=3, budget=10)  # 40 -> 14 -> 10, 25 -> 9, 33 -> 11 -> 10
    ids = ds.frame_ids()
    assert len(ds) == 29 and [p.rsplit("/", 1)[1] for p, _ in ids[::10]] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert ds.load(12).name == "v1#000006"


def test_random_access_is_pixel_equal_to_sequential_decode(clips):
    """Seeking to the keyframe before a timestamp and decoding forward returns exactly (pixel-equal) the frame a
    sequential decode gives, in any order; at most ``max_open`` containers stay open."""
    ref = _sequential(clips["long"])
    ds = VideoFootage([clips["long"], clips["folder"] / "v0.mp4"], stride=1, max_open=1)
    ref += _sequential(clips["folder"] / "v0.mp4")
    order = np.random.default_rng(0).permutation(len(ds))
    for i in order[:60]:
        assert np.array_equal(ds.load(int(i)).image, ref[i]), i
        assert len(ds._open) <= 1
    assert ds.stats["seeks"] > 10 and ds.stats["decoded"] >= 60
    ds.stats.clear()
    for i in range(0, 90, 3):  # in order: decodes forward, no seek after the first
        assert np.array_equal(ds.load(i).image, ref[i])
    assert ds.stats["seeks"] <= 1 and ds.stats["decoded"] <= 90
    small = VideoFootage(clips["long"], size=(24, 40))
    assert small.load(5).image.shape == (24, 40, 3) and small[5]["image"].dtype == torch.uint8


def _write_mkv(path, n: int):
    """``n`` frames at 10 fps in Matroska (PyAV, MPEG-4 part 2): the container gives no frame count, only a
    duration."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"g": "8"}
        for k in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(_frame(k)[:, :, ::-1].copy(), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_index_from_duration_and_from_a_packet_scan(tmp_path):
    mkv = _write_mkv(tmp_path / "clip.mkv", 30)
    by_duration, by_scan = probe_video(mkv), probe_video(mkv, scan=True)
    assert by_duration.frames == by_scan.frames == 30 and by_duration.pts is None
    ks = np.arange(30)
    assert np.array_equal(by_duration.frame_pts(ks), by_scan.frame_pts(ks))
    ref = _sequential(mkv)
    ds = VideoFootage(mkv)
    for i in np.random.default_rng(1).permutation(30)[:12]:
        assert np.array_equal(ds.load(int(i)).image, ref[i])


def test_opencv_decode_agrees_within_codec_tolerance(clips):
    """The runtime reads videos with OpenCV; PyAV's frames agree with OpenCV's to within colour-conversion rounding
    (mean absolute difference under 1 grey level)."""
    cap = cv2.VideoCapture(str(clips["long"]))
    ds = VideoFootage(clips["long"])
    for k in range(20):
        ok, bgr = cap.read()
        assert ok
        diff = np.abs(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(int) - ds.load(k).image.astype(int))
        assert diff.mean() < 1.0, (k, diff.mean())
    cap.release()


def test_rank_shards_are_disjoint_and_cover_the_frames(clips):
    full = VideoFootage(clips["folder"], stride=2).frame_ids()
    parts = [VideoFootage(clips["folder"], stride=2, rank=r, world_size=3).frame_ids() for r in range(3)]
    assert sum(parts, []) == full  # contiguous, in order, nothing twice, nothing left out
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(10, 3, 4) == (7, 10)
    with pytest.raises(ValueError, match="rank"):
        VideoFootage(clips["folder"], rank=3, world_size=3)
    with pytest.raises(ValueError, match="fewer than"):
        VideoFootage(clips["folder"], budget=1, world_size=4)


def test_duplicates_skipped_on_a_static_clip(clips):
    """30 identical frames then 30 moving ones: the static run keeps one frame, the moving run nearly all."""
    ds = VideoFootage(clips["static"], skip_duplicates=0.01)
    kept = [k for _, k in ds.frame_ids()]
    assert kept[0] == 0 and not [k for k in kept if 0 < k < 30]
    assert len([k for k in kept if k >= 30]) >= 27
    assert len(VideoFootage(clips["static"])) == 60  # off by default
    ref = _sequential(clips["static"])
    assert np.array_equal(ds.load(len(ds) - 1).image, ref[kept[-1]])
    with_budget = VideoFootage(clips["static"], skip_duplicates=0.01, budget=4, stride=2)
    assert len(with_budget) == 4 and with_budget.frame_ids()[0][1] == 0


def test_cache_is_written_once_and_reused(clips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = VideoFootage(clips["long"], stride=9, size=(24, 32), cache_dir=cache)
    imgs = [a.load(i).image for i in range(len(a))]
    assert a.stats["cache_writes"] == len(a) == 10 and a.stats["cache_hits"] == 0
    b = VideoFootage(clips["long"], stride=9, size=(24, 32), cache_dir=cache)
    assert all(np.array_equal(b.load(i).image, imgs[i]) for i in range(len(b)))
    assert b.stats["cache_hits"] == 10 and b.stats["decoded"] == 0
    pngs = list(cache.rglob("*.png"))
    assert len(pngs) == 10 and all(p.parent.name == "24x32" for p in pngs)
    pngs[0].write_bytes(b"damaged")  # a damaged entry is decoded again and rewritten
    c = VideoFootage(clips["long"], stride=9, size=(24, 32), cache_dir=cache)
    assert all(np.array_equal(c.load(i).image, imgs[i]) for i in range(len(c)))
    assert c.stats["decoded"] >= 1 and c.stats["cache_writes"] == 1
    # the duplicate index is stored too: a build in another process (no in-process memo) does not decode again
    monkeypatch.setattr(footage, "_DISTINCT", {})
    d = VideoFootage(clips["static"], skip_duplicates=0.01, cache_dir=cache)
    assert len(list(cache.rglob("distinct-*.json"))) == 1
    monkeypatch.setattr(footage, "_DISTINCT", {})
    monkeypatch.setattr(footage, "distinct_frames", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    assert VideoFootage(clips["static"], skip_duplicates=0.01, cache_dir=cache).frame_ids() == d.frame_ids()


def test_workers_and_resumable_loader(clips):
    """Shuffled batches through DataLoader workers (each opens its own containers) equal those of the main
    process, with the training transform applied."""
    from segadapt.adapt.data.datasets import collate
    from segadapt.adapt.data.sampling import resumable_loader
    from segadapt.adapt.data.transforms import train_transform

    ds = VideoFootage(clips["folder"], stride=2, size=(32, 48), transform=train_transform((24, 32), None, (0.75, 1.25),
                                                                                          11))
    ds.load(0)  # an open container in the parent must not leak into the workers
    batches = []
    for workers in (0, 2):
        it = iter(resumable_loader(ds, 4, seed=3, num_workers=workers, collate_fn=collate))
        batches.append([next(it) for _ in range(3)])
    for x, y in zip(*batches, strict=True):
        assert x["image"].shape == (4, 3, 24, 32) and x["image"].dtype == torch.uint8
        assert x["name"] == y["name"] and torch.equal(x["image"], y["image"])


def test_bad_videos_fail_with_one_line_naming_the_file(clips, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    for bad in (text, empty, tmp_path / "gone.mp4"):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            VideoFootage([clips["folder"] / "v0.mp4", bad])
        assert bad.name in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "frames").mkdir()
    with pytest.raises(ValueError, match="frames: no video files"):
        VideoFootage(tmp_path / "frames")
    with pytest.raises(ValueError, match="stride"):
        VideoFootage(clips["long"], stride=0)
    ds = VideoFootage(clips["long"])  # 90 frames at 10 fps; a timestamp at 12 s, as a truncated file would ask
    with pytest.raises(ValueError, match="long.mp4: no frame at 12.000 s.*ends earlier"):
        ds._decode(0, int(12 / ds.metas[0].time_base))


def test_target_dataset_and_preflight_on_a_folder_of_videos(clips, tmp_path):
    from segadapt import preflight
    from segadapt.adapt.config import AdaptConfig
    from segadapt.adapt.data.transforms import Resize
    from segadapt.adapt.engine import target_dataset
    from segadapt.runtime.inputs import InputError

    cfg = AdaptConfig(target=str(clips["folder"]), video_stride=2, video_max_frames=8)
    ds = target_dataset(cfg, (24, 32), Resize((24, 32)), None)
    assert isinstance(ds, VideoFootage) and len(ds) == 24 and ds[0]["image"].shape == (3, 24, 32)
    halves = [target_dataset(cfg, (24, 32), None, None, rank=r, world_size=2) for r in range(2)]
    assert len(halves[0]) + len(halves[1]) == 24
    assert preflight._target_frames(cfg) == ([], True)
    with pytest.raises(ValueError, match="depth"):
        target_dataset(cfg, (24, 32), None, depth_provider=lambda p, i: None)
    bad = tmp_path / "vids"
    bad.mkdir()
    _write(bad / "a.mp4", 10)
    (bad / "b.mp4").write_bytes(_write(tmp_path / "b.mp4", 30).read_bytes()[:3000])  # cut short
    with pytest.raises(InputError, match="b.mp4.*--target"):
        preflight._target_frames(AdaptConfig(target=str(bad)))
    assert json.loads(json.dumps(ds.frame_ids()))[0][1] == 0
