"""``segadapt data convert``: Cityscapes ids / train ids / colours and palette labels -> the project's layout, checked
on the real KITTI frames of ../shared/data (kitti5 has Cityscapes label ids; kitti-semantics the CamVid-11 labels)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segadapt.adapt.data import cityscapes as cs
from segadapt.adapt.data.convert import convert_dataset
from segadapt.cli import main

NAMES = [f"{i:06d}_10.png" for i in range(5)]
QUIET = dict(log=lambda *_: None)


def _read(p):
    return np.array(Image.open(p))


@pytest.fixture(scope="module")
def ids(kitti):
    return {n: _read(kitti / "semantic" / n) for n in NAMES}


def _split(root, kitti, labels: dict):
    """A images/ + labels/ split of the kitti5 frames with the given label arrays."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for n, lab in labels.items():
        shutil.copy(kitti / "image_2" / n, root / "images" / n)
        Image.fromarray(lab).save(root / "labels" / n)
    return root


def _colour(label_ids):
    lut = np.zeros((256, 3), np.uint8)
    for _, i, _, c in cs.CITYSCAPES_LABELS:
        if i >= 0:
            lut[i] = c
    return lut[label_ids]


def _out_labels(out):
    return {n: _read(out / "labels" / n) for n in NAMES}


def test_label_ids_reproduce_the_kitti_semantics_labels(kitti, shared_data, camvid, tmp_path, capsys):
    # the kitti5 folder as it is (image_2/ + semantic/), through the command line
    rc = main(["data", "convert", str(kitti), str(tmp_path / "o"), "--from", "cityscapes-ids",
               "--to", str(camvid / "classes.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Road" in out and "ignore" in out and "%" in out
    got = _out_labels(tmp_path / "o")
    sem = shared_data / "kitti-semantics" / "target_adapt" / "labels"
    for n in NAMES:  # kitti-semantics is half resolution: nearest neighbour = every second pixel
        half = _read(sem / n)
        assert np.array_equal(got[n][::2, ::2][: half.shape[0], : half.shape[1]], half), n
    written = json.loads((tmp_path / "o" / "classes.json").read_text())
    assert written == json.loads((camvid / "classes.json").read_text())
    rep = json.loads((tmp_path / "o" / "convert.json").read_text())
    assert rep["frames"] == 5 and abs(sum(rep["pixel_share_percent"].values()) - 100) < 1e-6
    assert sorted(p.name for p in (tmp_path / "o" / "images").iterdir()) == NAMES
    assert (tmp_path / "o" / "images" / NAMES[0]).read_bytes() == (kitti / "image_2" / NAMES[0]).read_bytes()


def test_kitti5_label_camvid11_is_the_map_with_wall_building_and_train_car(kitti, camvid, ids, tmp_path):
    """kitti5/label_camvid11 maps wall -> Building and train -> Car, where kitti-semantics ignores both: the
    built-in map differs from it exactly on those pixels, and a user map with these two changes reproduces it."""
    ref = {n: _read(kitti / "label_camvid11" / n) for n in NAMES}
    convert_dataset(kitti, tmp_path / "a", "cityscapes-ids", camvid / "classes.json", **QUIET)
    for n, lab in _out_labels(tmp_path / "a").items():
        diff = lab != ref[n]
        assert set(np.unique(ids[n][diff]).tolist()) <= {12, 31}
        assert np.all(lab[diff] == 11)
    assert any((ids[n] == 12).any() for n in NAMES)  # the difference is real on these frames
    user = dict(cs.CAMVID11_MAP, wall="Building", train="Car")
    (tmp_path / "map.json").write_text(json.dumps({"map": user}))
    convert_dataset(kitti, tmp_path / "b", "cityscapes-ids", camvid / "classes.json", str(tmp_path / "map.json"),
                    **QUIET)
    for n, lab in _out_labels(tmp_path / "b").items():
        assert np.array_equal(lab, ref[n]), n


def test_colours_and_train_ids_convert_like_label_ids(kitti, camvid, ids, tmp_path):
    convert_dataset(kitti, tmp_path / "ids", "cityscapes-ids", camvid / "classes.json", **QUIET)
    want = _out_labels(tmp_path / "ids")
    col = _split(tmp_path / "col", kitti, {n: _colour(a) for n, a in ids.items()})
    convert_dataset(col, tmp_path / "o_col", "cityscapes-color", camvid / "classes.json", **QUIET)
    assert all(np.array_equal(v, want[n]) for n, v in _out_labels(tmp_path / "o_col").items())

    train = np.full(256, 255, np.uint8)
    for _, i, t, _ in cs.CITYSCAPES_LABELS:
        if i >= 0:
            train[i] = t
    assert not any((a == 18).any() for a in ids.values())  # polegroup (no train id) would differ: not in these frames
    tr = _split(tmp_path / "tr", kitti, {n: train[a] for n, a in ids.items()})
    convert_dataset(tr, tmp_path / "o_tr", "cityscapes-trainids", camvid / "classes.json", **QUIET)
    got = _out_labels(tmp_path / "o_tr")
    assert all(np.array_equal(v, want[n]) for n, v in got.items())
    ignored = sum(int((train[a] == 255).sum()) for a in ids.values())
    assert ignored > 0 and all(((train[ids[n]] == 255) <= (got[n] == 11)).all() for n in NAMES)  # ignore kept


def test_unmapped_colours_are_refused_or_ignored(kitti, camvid, ids, tmp_path, capsys):
    labs = {n: _colour(a) for n, a in list(ids.items())[:2]}
    labs[NAMES[1]][10:12, 20:25] = (1, 2, 3)
    src = _split(tmp_path / "s", kitti, labs)
    rc = main(["data", "convert", str(src), str(tmp_path / "o"), "--from", "cityscapes-color", "--to",
               str(camvid / "classes.json")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the progress line "checking ..." comes before it
    assert rc == 2 and err.startswith("error: ")
    assert NAMES[1] in err and "(1,2,3)" in err and "--unmapped ignore" in err
    assert not (tmp_path / "o").exists()  # checked before anything was written
    rc = main(["data", "convert", str(src), str(tmp_path / "o"), "--from", "cityscapes-color", "--to",
               str(camvid / "classes.json"), "--unmapped", "ignore"])
    assert rc == 0
    got = _read(tmp_path / "o" / "labels" / NAMES[1])
    assert np.all(got[10:12, 20:25] == 11) and (got != 11).mean() > 0.5
    # a non-empty output is not overwritten without --overwrite
    rc = main(["data", "convert", str(src), str(tmp_path / "o"), "--from", "cityscapes-color", "--to",
               str(camvid / "classes.json"), "--unmapped", "ignore"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_user_map_must_cover_the_values_and_name_real_classes(kitti, camvid, tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"map": {"road": "Road", "car": "Vehicle"}}))
    rc = main(["data", "convert", str(kitti), str(tmp_path / "o"), "--from", "cityscapes-ids", "--to",
               str(camvid / "classes.json"), "--map", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Vehicle".lower() in err.lower() and "m.json" in err
    (tmp_path / "m.json").write_text(json.dumps({"map": {"road": "Road", "car": "Car"}}))
    rc = main(["data", "convert", str(kitti), str(tmp_path / "o"), "--from", "cityscapes-ids", "--to",
               str(camvid / "classes.json"), "--map", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "000000_10.png" in err and "not covered" in err  # e.g. building (11) is not in the map
    rc = main(["data", "convert", str(kitti), str(tmp_path / "o"), "--from", "cityscapes-ids", "--to",
               str(camvid / "classes.json"), "--map", str(tmp_path / "m.json"), "--unmapped", "ignore"])
    assert rc == 0
    lab, sem = _read(tmp_path / "o" / "labels" / NAMES[0]), _read(kitti / "semantic" / NAMES[0])
    assert np.array_equal(lab == 3, sem == 7) and np.array_equal(lab == 8, sem == 26)
    assert set(np.unique(lab).tolist()) == {3, 8, 11}


def test_palette_labels_and_cityscapes_folder_names(tiny, camvid, tmp_path):
    """CamVid colour labels (palette:classes.json, classes matched by name) in a Cityscapes-style tree whose label
    folder also holds other kinds of file."""
    from segadapt.runtime.classes import ClassInfo

    classes = ClassInfo.load(camvid / "classes.json")
    src = tmp_path / "cs"
    refs = {}
    for p in sorted((tiny / "source" / "labels").iterdir())[:3]:
        imgs, gt = src / "leftImg8bit" / "val" / "cambridge", src / "gtFine" / "val" / "cambridge"
        imgs.mkdir(parents=True, exist_ok=True)
        gt.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny / "source" / "images" / p.name, imgs / f"{p.stem}_leftImg8bit.png")
        lab = _read(p)
        refs[p.stem] = lab
        Image.fromarray(classes.palette_array()[lab]).save(gt / f"{p.stem}_gtFine_color.png")
        Image.fromarray(np.zeros_like(lab)).save(gt / f"{p.stem}_gtFine_instanceIds.png")
    rep = convert_dataset(src, tmp_path / "o", f"palette:{camvid / 'classes.json'}", camvid / "classes.json",
                          unmapped="ignore", **QUIET)  # void pixels are black, a colour of no class
    assert rep["frames"] == 3
    for stem, lab in refs.items():
        assert np.array_equal(_read(tmp_path / "o" / "labels" / f"{stem}.png"), lab)
        assert (tmp_path / "o" / "images" / f"{stem}.png").is_file()


def test_images_without_labels_are_named_or_skipped(kitti, camvid, tmp_path, capsys):
    src = _split(tmp_path / "s", kitti, {n: _read(kitti / "semantic" / n) for n in NAMES[:2]})
    shutil.copy(kitti / "image_2" / NAMES[2], src / "images" / NAMES[2])
    rc = main(["data", "convert", str(src), str(tmp_path / "o"), "--from", "cityscapes-ids", "--to",
               str(camvid / "classes.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "1 images without a label" in err and "000002_10" in err
    rep = convert_dataset(src, tmp_path / "o", "cityscapes-ids", camvid / "classes.json", skip_unlabelled=True,
                          **QUIET)
    assert rep["frames"] == 2 and rep["skipped_unlabelled"] == 1


def test_convert_imports_no_torch(kitti, camvid, tmp_path):
    code = ("import sys\nfrom segadapt.cli import main\n"
            f"rc = main(['-q', 'data', 'convert', {str(kitti)!r}, {str(tmp_path / 'o')!r}, '--from', "
            f"'cityscapes-ids', '--to', {str(camvid / 'classes.json')!r}])\n"
            "print('RC', rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 0 False" in out.stdout, out.stdout + out.stderr
