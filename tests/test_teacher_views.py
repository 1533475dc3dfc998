"""benchmarks/probes/teacher_views.py: the same weights at another output stride; views averaged after mirroring back."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model


def _load():
    path = Path(__file__).parents[1] / "benchmarks" / "probes" / "teacher_views.py"
    spec = importlib.util.spec_from_file_location("teacher_views", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_output_stride_8_keeps_the_weights_and_doubles_the_logit_map():
    tv = _load()
    torch.manual_seed(0)
    m16 = tiny_model("deeplabv3-mobilenetv2").eval()
    m8 = tv.at_output_stride(m16, 8)
    assert m8.output_stride == 8 and m16.output_stride == 16
    s16, s8 = m16.state_dict(), m8.state_dict()
    assert s16.keys() == s8.keys() and all(torch.equal(s16[k], s8[k]) for k in s16)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert m16(x).shape[-2:] == (4, 6) and m8(x).shape[-2:] == (8, 12)
    with pytest.raises(ValueError, match="only deeplabv3-mobilenetv2"):
        tv.at_output_stride(tiny_model("segformer"), 8)


def test_mirrored_view_is_flipped_back_before_averaging():
    tv = _load()
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 3, padding=1).eval()  # K = 5 logits; its kernels are not mirror-symmetric
    half = torch.randn(1, 3, 64, 48)
    x = torch.cat([half, half.flip(-1)], -1)  # a mirror-symmetric frame (1, 3, 64, 96)
    with torch.no_grad():
        one = tv.view_probs(model, x, [(1.0, False)], (64, 96), {})
        both = tv.view_probs(model, x, [(1.0, False), (1.0, True)], (64, 96), {})
        direct = F.softmax(F.interpolate(model(x), size=(64, 96), mode="bilinear", align_corners=False), 1)
    assert torch.allclose(one, direct, atol=1e-6)
    assert torch.allclose(both.sum(1), torch.ones(1, 64, 96), atol=1e-5)
    # the model is not mirror-equivariant, so one pass on a symmetric frame is not symmetric; the mean of the pass and
    # its mirrored pass flipped back is (not flipping back would give the one pass again)
    assert not torch.allclose(one, one.flip(-1), atol=1e-4)
    assert torch.allclose(both, both.flip(-1), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--adabn-alpha", "2"], "--adabn-alpha must be in [0, 1]"),
    (["--target", "{tmp}"], "labels: no such folder"),
    (["--strides", "5"], "invalid choice"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "images").mkdir()  # images/ without labels/
    tv = _load()
    argv = ["--checkpoint", str(tmp_path / "no_checkpoint")] + [x.format(tmp=tmp_path) for x in args]
    with pytest.raises(SystemExit) as e:
        tv.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
