import json

import pytest
import torch

from segadapt.adapt.models.checkpoint import (CheckpointMeta, checkpoint_hash, load_checkpoint, load_segmenter,
                                     save_checkpoint)
from segadapt.adapt.models.segmenter import build_segmenter
from conftest import tiny_model


@pytest.mark.parametrize("arch,stride", [("segformer", 4), ("deeplabv3-mobilenetv2", 16)])
def test_logits_and_features_shapes(arch, stride):
    m = tiny_model(arch).eval()
    x = torch.randn(2, 3, 64, 96)
    logits, feats = m.forward_features(x)
    assert m.output_stride == stride
    assert logits.shape == (2, 11, 64 // stride, 96 // stride)
    assert feats.shape == (2, m.feature_channels, 64 // stride, 96 // stride)
    assert torch.equal(m(x), logits)


def test_unknown_arch_and_variant():
    with pytest.raises(ValueError, match="architecture"):
        build_segmenter("unet", 3)
    with pytest.raises(ValueError, match="variant"):
        build_segmenter("segformer", 3, "b9")


def test_four_channel_input():
    m = tiny_model("segformer", in_channels=4)
    assert m.in_channels == 4
    assert m(torch.randn(1, 4, 32, 32)).shape == (1, 11, 8, 8)


@pytest.mark.parametrize("arch", ["segformer", "deeplabv3-mobilenetv2"])
def test_checkpoint_round_trip_identical_outputs(tmp_path, arch, tiny_classes):
    torch.manual_seed(0)
    m = tiny_model(arch).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = m(x)
    meta = CheckpointMeta(classes=tiny_classes, input_size=(64, 80), info={"note": "test"})
    save_checkpoint(tmp_path / "ck", m, meta, training_state={"step": 7})
    m2, meta2 = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        out = m2(x)
    assert torch.equal(ref, out)
    assert meta2.classes == tiny_classes and meta2.input_size == (64, 80) and meta2.info["note"] == "test"
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["arch"] == arch and cfg["ignore_index"] == 11 and cfg["mean"] == [0.485, 0.456, 0.406]
    assert len(checkpoint_hash(tmp_path / "ck")) == 64


def test_checkpoint_overwrite_is_atomic_and_leaves_no_temp(tmp_path, tiny_classes):
    m = tiny_model("deeplabv3-mobilenetv2")
    meta = CheckpointMeta(classes=tiny_classes)
    save_checkpoint(tmp_path / "ck", m, meta)
    h1 = checkpoint_hash(tmp_path / "ck")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "ck", m, meta)
    assert checkpoint_hash(tmp_path / "ck") != h1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    # a failure while writing (here: the disk fills up) leaves the previous checkpoint untouched
    import segadapt.adapt.models.checkpoint as ckmod

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    h2 = checkpoint_hash(tmp_path / "ck")
    orig = ckmod.torch.save
    ckmod.torch.save = disk_full
    try:
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(tmp_path / "ck", m, meta, training_state={"step": 1})
    finally:
        ckmod.torch.save = orig
    assert checkpoint_hash(tmp_path / "ck") == h2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupt_checkpoints_give_clear_errors(tmp_path, tiny_classes):
    m = tiny_model("deeplabv3-mobilenetv2")
    save_checkpoint(tmp_path / "ck", m, CheckpointMeta(classes=tiny_classes))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path / "ck")
    # weights of another architecture
    save_checkpoint(tmp_path / "a", tiny_model("segformer"), CheckpointMeta(classes=tiny_classes))
    save_checkpoint(tmp_path / "b", m, CheckpointMeta(classes=tiny_classes))
    (tmp_path / "b" / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        load_segmenter(tmp_path / "nothing")


@pytest.mark.parametrize("arch", ["segformer", "deeplabv3-mobilenetv2"])
def test_from_pretrained_local_transformers_dir(tmp_path, arch):
    torch.manual_seed(0)
    m = tiny_model(arch).eval()
    m.hf.save_pretrained(tmp_path / "hf")  # what a user downloads from the hub, created here offline
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    x = torch.randn(1, 3, 64, 64)
    m2, meta = load_segmenter(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x))
    assert meta.classes.num_classes == 11
    # a new head for another class count keeps the encoder weights
    m3 = build_segmenter(arch, 5, pretrained=str(tmp_path / "hf"))
    assert m3.num_classes == 5
    enc = "hf.segformer.stages.0.patch_embeddings.proj.weight" if arch == "segformer" else \
        "hf.mobilenet_v2.conv_stem.first_conv.convolution.weight"
    assert torch.equal(m3.state_dict()[enc], m.state_dict()[enc])
    with pytest.raises(ValueError, match="requested"):
        build_segmenter("segformer" if arch != "segformer" else "deeplabv3-mobilenetv2", 5,
                        pretrained=str(tmp_path / "hf"))
