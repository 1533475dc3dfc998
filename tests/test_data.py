import numpy as np
import pytest
import torch

from segadapt.adapt.data.datasets import ImageFolder, LabeledImageFolder, Sample, collate, read_label
from segadapt.adapt.data.footage import VideoFootage
from segadapt.adapt.data.transforms import Compose, RandomCrop, RandomHFlip, RandomScale, Resize, train_transform


def test_labeled_folder_on_real_frames(tiny, tiny_classes):
    ds = LabeledImageFolder(tiny / "source")
    assert len(ds) == 40
    item = ds[0]
    assert item["image"].shape == (3, 120, 160) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (120, 160) and item["label"].dtype == torch.int64
    vals = set(torch.unique(item["label"]).tolist())
    assert vals <= set(range(11)) | {tiny_classes.ignore_index}
    assert ds.classes == tiny_classes


def test_unlabeled_folder_has_no_label_field(tiny):
    ds = ImageFolder(tiny / "target")
    item = ds[3]
    assert set(item) == {"image", "name", "valid"} and bool(item["valid"].all())  # no padding without a crop
    b = collate([ds[0], ds[1]])
    assert b["image"].shape == (2, 3, 120, 160) and len(b["name"]) == 2


def _make_split(tmp_path, tiny, n=2):
    import shutil

    for kind in ("images", "labels"):
        (tmp_path / kind).mkdir(parents=True)
        for p in sorted((tiny / "source" / kind).iterdir())[:n]:
            shutil.copy(p, tmp_path / kind / p.name)
    shutil.copy(tiny.parent / "classes.json", tmp_path / "classes.json")
    return tmp_path


def test_label_out_of_range_names_the_file(tmp_path, tiny):
    import cv2

    split = _make_split(tmp_path, tiny)
    bad = sorted((split / "labels").iterdir())[1]
    lab = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    lab[5, 5] = 40  # neither a class (0-10) nor the ignore index (11)
    cv2.imwrite(str(bad), lab)
    ds = LabeledImageFolder(split)
    ds[0]
    with pytest.raises(ValueError, match=bad.name) as e:
        ds[1]
    assert "40" in str(e.value)
    # the ignore index itself is accepted
    lab[5, 5] = 11
    cv2.imwrite(str(bad), lab)
    assert (read_label(bad, 11, 11) == 11).any()


def test_missing_label_and_corrupt_image(tmp_path, tiny):
    split = _make_split(tmp_path, tiny)
    victim = sorted((split / "labels").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        LabeledImageFolder(split)
    img = sorted((split / "images").iterdir())[0]
    img.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=img.name):
        ImageFolder(split)[0]


def _coded_sample(h=40, w=60):
    # label, depth and image all encode the pixel's column: any misalignment shows up
    cols = np.tile(np.arange(w), (h, 1))
    img = np.stack([cols % 256, cols % 256, np.zeros_like(cols)], -1).astype(np.uint8)
    lab = (cols % 10).astype(np.int64)
    depth = (cols / (w - 1)).astype(np.float32)
    valid = cols % 2 == 0
    return Sample(image=img, label=lab, depth=depth, depth_valid=valid)


def test_flip_moves_image_label_and_depth_together():
    s = _coded_sample()
    f = RandomHFlip(p=1.0)(s)
    assert np.array_equal(f.image[:, 0, 0], s.image[:, -1, 0])
    assert np.array_equal(f.label, s.label[:, ::-1])
    assert np.array_equal(f.depth, s.depth[:, ::-1])
    assert np.array_equal(f.depth_valid, s.depth_valid[:, ::-1])
    assert np.array_equal(f.label, f.image[..., 0].astype(np.int64) % 10)


def test_crop_scale_keep_alignment_and_pad_with_ignore():
    import random

    random.seed(3)
    s = _coded_sample()
    t = Compose([RandomScale(1.0, 1.0), RandomCrop((30, 50), ignore_index=255), RandomHFlip(1.0)])
    o = t(s)
    assert o.image.shape == (30, 50, 3) and o.label.shape == (30, 50) and o.depth.shape == (30, 50)
    assert np.array_equal(o.label, o.image[..., 0].astype(np.int64) % 10)
    assert np.allclose(o.depth * 59, o.image[..., 0].astype(np.float32))
    # crop larger than the frame pads: label with the ignore index, depth invalid
    big = RandomCrop((50, 70), ignore_index=255)(s)
    assert big.image.shape == (50, 70, 3)
    pad = big.image[..., 2] == 0  # channel 2 is 0 everywhere anyway; use the label instead
    assert (big.label == 255).sum() == 50 * 70 - 40 * 60
    assert not big.depth_valid[big.label == 255].any()
    del pad


def test_resize_uses_nearest_for_labels_and_depth():
    s = _coded_sample()
    r = Resize((80, 120))(s)
    assert r.image.shape == (80, 120, 3)
    assert set(np.unique(r.label)) <= set(np.unique(s.label))
    assert set(np.unique(r.depth)) <= set(np.unique(s.depth))


def test_train_transform_on_real_labels(tiny, tiny_classes):
    ds = LabeledImageFolder(tiny / "source", transform=train_transform((64, 96), None, (0.5, 2.0), 11))
    for i in range(5):
        it = ds[i]
        assert it["image"].shape == (3, 64, 96) and it["label"].shape == (64, 96)
        assert set(torch.unique(it["label"]).tolist()) <= set(range(12))


def test_video_frames_stride_and_budget(video_path):
    v = VideoFootage(video_path, stride=10, budget=4)  # 23 candidates, 4 spread evenly over the clip
    assert len(v) == 4
    assert v[0]["image"].shape == (3, 540, 960)
    assert [v.load(i).name.split("#")[1] for i in range(4)] == ["000000", "000050", "000110", "000170"]
    small = VideoFootage(video_path, stride=50, size=(90, 160))
    assert len(small) == 5  # 221 frames: 0, 50, 100, 150, 200
    assert small[0]["image"].shape == (3, 90, 160)


def test_video_errors(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="clip.mp4"):
        VideoFootage(bad)
    with pytest.raises(ValueError, match="stride"):
        VideoFootage(bad, stride=0)


def test_photometric_changes_image_only_within_range():
    from segadapt.adapt.augment import gaussian_blur, photometric
    from segadapt.adapt.config import PhotometricConfig

    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 48)
    y = photometric(x, PhotometricConfig(jitter_p=1.0, blur_p=1.0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01
    off = PhotometricConfig(jitter_p=0.0, blur_p=0.0)
    assert torch.equal(photometric(x, off), x.clamp(0, 1))
    # blur of a constant image is the same constant; blur reduces variance of noise
    c = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(c, torch.tensor([1.0])), c, atol=1e-6)
    assert gaussian_blur(x[:1], torch.tensor([1.0])).var() < x[:1].var()
