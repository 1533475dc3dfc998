"""The UDA mode of ``segadapt adapt`` (``--source-data``, issue #13): source CE, DACS source->target ClassMix, the
paper forms of RCCR/BiDA, and the source-free guarantee without it (nothing opens a source file)."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segadapt.adapt.methods.config import BiDAConfig, RCCRConfig
from segadapt.adapt.config import AdaptConfig, RectifierConfig
from segadapt.adapt.methods.uda import dacs_mix, paste_masks, source_ce

IGNORE = 11


def _cfg(ckpt, tiny, out, steps=2, **kw) -> AdaptConfig:
    return AdaptConfig(checkpoint=str(ckpt), target=str(tiny / "target"), out=str(out), steps=steps, size=(48, 64),
                       select="last", batch_size=4, num_workers=0, debug_every=0, log_every=1, save_every=1,
                       rectifier=RectifierConfig(enabled=False), **kw)


def test_source_ce_decreases_on_a_fixed_batch(tiny_checkpoint, tiny):
    from segadapt.adapt.augment import normalize
    from segadapt.adapt.data.datasets import LabeledImageFolder, collate
    from segadapt.adapt.data.transforms import Resize
    from segadapt.adapt.models.checkpoint import load_segmenter

    torch.manual_seed(0)
    model, meta = load_segmenter(tiny_checkpoint)
    model.eval()  # dropout off, BatchNorm statistics fixed: the batch and the model are all that change the loss
    ds = LabeledImageFolder(tiny / "source", transform=Resize((48, 64)))
    b = collate([ds[i] for i in (0, 5, 10, 15)])
    x, y = normalize(b["image"], meta.mean, meta.std), b["label"]
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(6):
        loss, feats = source_ce(model.forward_features, x, y, IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert feats.shape[:1] == (4,) and feats.requires_grad
    assert losses[-1] < 0.9 * losses[0], losses
    # every pixel void: zero, with a graph (no NaN from an empty mean)
    zero, _ = source_ce(model.forward_features, x, torch.full_like(y, IGNORE), IGNORE)
    assert zero.item() == 0.0 and zero.requires_grad


def test_dacs_mask_pastes_exactly_the_chosen_classes_and_the_label_follows():
    torch.manual_seed(3)
    bs, b, h, w = 2, 4, 12, 16
    src = torch.full((bs, h, w), IGNORE, dtype=torch.long)
    src[0, :, :4], src[0, :, 4:8], src[0, :, 8:12] = 0, 3, 5  # 3 classes + void
    src[1, :6], src[1, 6:] = 8, 1  # 2 classes
    masks = paste_masks(src, IGNORE)
    assert masks.shape == (bs, 1, h, w)
    for j, n in ((0, 3), (1, 2)):
        picked = torch.unique(src[j][masks[j, 0] > 0])
        assert picked.numel() == (n + 1) // 2 and IGNORE not in picked.tolist()
        assert torch.equal(masks[j, 0] > 0, torch.isin(src[j], picked))  # all pixels of those classes, nothing else
    x_t, x_s = torch.rand(b, 3, h, w), torch.rand(bs, 3, h, w)
    pl = torch.randint(0, 11, (b, h, w))
    wt, r = torch.rand(b, h, w), torch.rand(b, h, w)
    x, lab, wm, rm, m = dacs_mix(x_t, x_s, pl, wt, src, masks, r)
    for i in range(b):
        j, on = i % bs, m[i, 0] > 0  # source frame i % Bs onto target frame i
        assert torch.equal(on, masks[j, 0] > 0)
        assert torch.equal(x[i][:, on], x_s[j][:, on]) and torch.equal(x[i][:, ~on], x_t[i][:, ~on])
        assert torch.equal(lab[i][on], src[j][on]) and torch.equal(lab[i][~on], pl[i][~on])
        assert bool((wm[i][on] == 1).all()) and torch.equal(wm[i][~on], wt[i][~on])
        assert bool((rm[i][on] == 1).all()) and torch.equal(rm[i][~on], r[i][~on])


def _spy_reads(monkeypatch) -> list:
    """Record every path given to cv2.imread and open() (the two ways this code reads an image or a file)."""
    opened = []
    real_imread, real_open = cv2.imread, builtins.open

    def imread(path, *a, **k):
        opened.append(str(Path(path).resolve()))
        return real_imread(path, *a, **k)

    def spy_open(file, *a, **k):
        if isinstance(file, (str, Path)):
            opened.append(str(Path(file).resolve()))
        return real_open(file, *a, **k)

    monkeypatch.setattr(cv2, "imread", imread)
    monkeypatch.setattr(builtins, "open", spy_open)
    return opened


def test_source_free_mode_opens_no_source_file(tiny_checkpoint, tiny, tmp_path, monkeypatch):
    import segadapt.adapt.data.datasets as dsmod
    from segadapt.adapt.engine import adapt

    def no_labelled(*a, **k):
        raise AssertionError("a labelled dataset was built in the source-free mode")

    monkeypatch.setattr(dsmod.LabeledImageFolder, "__init__", no_labelled)
    opened = _spy_reads(monkeypatch)
    cfg = _cfg(tiny_checkpoint, tiny, tmp_path / "sf", steps=1)
    assert cfg.source_data == ""  # the default: source-free
    s = adapt(cfg, log=lambda *_: None)
    assert s["steps"] == 1 and "loss_source_ce" not in s["last_losses"]
    source = str((tiny / "source").resolve())
    assert any("/target/" in p for p in opened), "the spy saw no reads"
    assert not [p for p in opened if p.startswith(source)]


def test_tiny_uda_run_logs_loss_src_reads_no_target_label_and_resumes_exactly(tiny_checkpoint, tiny, tmp_path,
                                                                              monkeypatch, capsys):
    from segadapt.adapt.models.checkpoint import load_training_state
    from segadapt.adapt.engine import adapt
    from segadapt.cli import main

    opened = _spy_reads(monkeypatch)
    out = tmp_path / "cli"
    rc = main(["adapt", "--checkpoint", str(tiny_checkpoint), "--target", str(tiny / "target"), "--out", str(out),
               "--source-data", str(tiny / "source"), "--steps", "2", "--size", "48", "64", "--batch-size", "2",
               "--num-workers", "0", "--log-every", "1", "--debug-every", "0"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "coverage.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["loss_source_ce"] > 0 for r in recs)
    # segadapt adapt --source-data adapts at the UDA mode's measured learning rate (the source-free one without)
    from segadapt.adapt.config import SOURCE_FREE_LR, UDA_LR, AdaptConfig

    assert json.loads((out / "summary.json").read_text())["lr"] == UDA_LR != SOURCE_FREE_LR
    assert AdaptConfig().learning_rate() == SOURCE_FREE_LR and AdaptConfig(lr=1e-4).learning_rate() == 1e-4
    target_labels = str((tiny / "target" / "labels").resolve())
    assert not [p for p in opened if p.startswith(target_labels)]  # no target label is ever read
    assert any(p.startswith(str((tiny / "source" / "labels").resolve())) for p in opened)
    capsys.readouterr()
    monkeypatch.undo()

    # the paper forms of RCCR and BiDA, and an exact resume of the source stream and the components
    comps = dict(source_data=str(tiny / "source"),
                 rccr=RCCRConfig(enabled=True, weight=1.0, ramp=False, confidence=0.0, bank_size=64, bank_samples=16),
                 bida=BiDAConfig(enabled=True),
                 # plain AdaBN: with the default 0.75 blend this 30-step tiny model leaves BiDA's source->target term
                 # without a pixel at step 3 (measured 0.0), and the test is about that term working
                 adabn_alpha=1.0)
    s = adapt(_cfg(tiny_checkpoint, tiny, tmp_path / "a", 3, **comps), log=lambda *_: None)
    assert {"loss_source_ce", "loss_rccr", "loss_bida", "bida_ts", "bida_st"} <= set(s["last_losses"])
    assert s["last_losses"]["rccr_anchors"] > 0 and s["last_losses"]["bida_st"] > 0
    st = load_training_state(tmp_path / "a" / "last")["components"]
    assert st["bida"]["valid_s"].any() and st["bida"]["src_feats"].shape[0] == 0  # P^s from source labels only
    adapt(_cfg(tiny_checkpoint, tiny, tmp_path / "b", 2, **comps), log=lambda *_: None)
    adapt(_cfg(tiny_checkpoint, tiny, tmp_path / "b", 3, resume=True, **comps), log=lambda *_: None)
    a, b = (load_training_state(tmp_path / d / "last") for d in ("a", "b"))
    for k, v in a["teacher"].items():
        assert torch.equal(v, b["teacher"][k]), k
    assert torch.equal(a["components"]["bida"]["proto_s"], b["components"]["bida"]["proto_s"])
    assert torch.equal(a["components"]["rccr"]["bank"]["feats"], b["components"]["rccr"]["bank"]["feats"])


def _bad_label_split(tiny: Path, root: Path) -> Path:
    """A one-frame copy of a tiny source frame whose label holds class id 12 (K = 11, ignore 11)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    name = sorted((tiny / "source" / "images").iterdir())[0].name
    shutil.copy(tiny / "source" / "images" / name, root / "images" / name)
    lab = cv2.imread(str(tiny / "source" / "labels" / name), cv2.IMREAD_UNCHANGED)
    lab[:4, :4] = 12
    cv2.imwrite(str(root / "labels" / name), lab.astype(np.uint8))
    return root


def _split_with_classes(tiny: Path, root: Path, names) -> Path:
    """A copy of the tiny source split with its own classes.json naming ``names`` (the tiny palette)."""
    shutil.copytree(tiny / "source", root)
    cj = json.loads((tiny.parent / "classes.json").read_text())
    cj["classes"] = list(names)
    cj["palette"] = (cj["palette"] * 2)[:len(names)]
    cj["ignore_index"] = 11 if len(names) == 11 else 255
    (root / "classes.json").write_text(json.dumps(cj))
    return root


@pytest.mark.parametrize("case", ["missing", "no_labels", "bad_class", "reversed_names", "twelve_classes"])
def test_a_bad_source_folder_is_one_line_naming_it(case, tiny_checkpoint, tiny, tmp_path, capsys, monkeypatch):
    import segadapt.adapt.engine as st
    from segadapt.cli import main

    root = tmp_path / "src"
    if case == "no_labels":
        shutil.copytree(tiny / "source" / "images", root / "images")
    elif case == "bad_class":
        _bad_label_split(tiny, root)
    elif case != "missing":  # the split's own classes.json against the checkpoint's classes
        names = json.loads((tiny.parent / "classes.json").read_text())["classes"]
        _split_with_classes(tiny, root, names[::-1] if case == "reversed_names" else names + ["Extra"])

    def no_work(*a, **k):
        raise AssertionError("adaptation started before the source folder was checked")

    monkeypatch.setattr(st, "adapt", no_work)
    rc = main(["adapt", "--checkpoint", str(tiny_checkpoint), "--target", str(tiny / "target"), "--out",
               str(tmp_path / "o"), "--source-data", str(root)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and str(root) in err, err
    assert {"missing": "no such", "no_labels": "labels", "bad_class": "[12]", "reversed_names": "differ",
            "twelve_classes": "has 12"}[case] in err, err
    # the library entry point checks too, before any step (one line naming the folder or file)
    from segadapt.adapt.methods.uda import source_dataset
    from segadapt.runtime.classes import ClassInfo

    with pytest.raises((FileNotFoundError, ValueError)) as e:
        source_dataset(root, ClassInfo.load(tiny.parent / "classes.json"), (48, 64), (48, 64), (1.0, 1.0))
    assert str(root) in str(e.value) and "\n" not in str(e.value)



def test_uda_source_stream_with_rare_class_sampling_resumes_exactly(tiny, tmp_path, tiny_classes, monkeypatch):
    """--rare-class-sampling in the UDA mode: the source frames are drawn by rare-class sampling (at T = 0.01 a rare
    class, and the crop shows it; the class statistics in the run folder, read back on resume), and a resumed stream
    reads the uninterrupted one's batches; off, uniform frames and no statistics file."""
    from types import SimpleNamespace

    import segadapt.adapt.data.rare_class as rc
    from segadapt.adapt.methods.uda import UDAMode

    drawn = []
    real = rc.ClassCrops.__getitem__

    def spy(self, item):
        out = real(self, item)
        drawn.append((item[1], bool((out["label"] == item[1]).any())))
        return out

    monkeypatch.setattr(rc.ClassCrops, "__getitem__", spy)

    def mode(rcs, out, consumed=None):
        cfg = AdaptConfig(checkpoint="c", target="t", source_data=str(tiny / "source"), batch_size=2, num_workers=0,
                          rare_class_sampling=rcs, rare_class_min_pixels=16, device="cpu")
        run = SimpleNamespace(size=(48, 64), classes=tiny_classes, ignore_index=IGNORE, mean=(0.5,) * 3,
                              std=(0.25,) * 3, device=torch.device("cpu"), out=out, fresh=consumed is None,
                              log=lambda *_: None, student=None, teacher=None)
        m = UDAMode(cfg)
        m.setup(run)
        if consumed is not None:
            m.load_state_dict({"consumed": consumed})
        return m

    def labels(m, n):
        out = []
        for _ in range(n):
            s = SimpleNamespace(image=torch.zeros(2, 3, 48, 64, dtype=torch.uint8))
            m.start_step(s)
            out.append(s.source.labels)
        return out

    for rcs in (False, True):
        out = tmp_path / str(rcs)
        drawn.clear()
        full = labels(mode(rcs, out), 4)
        assert (out / "class_stats.json").is_file() == rcs
        assert torch.equal(labels(mode(rcs, out, consumed=3), 1)[0], full[3])
        # Pole, SignSymbol, Fence, Pedestrian, Bicyclist (ids 2, 6, 7, 9, 10): the rare classes of the tiny split
        assert len(drawn) == (10 if rcs else 0) and all(c in (2, 6, 7, 9, 10) and shown for c, shown in drawn)
