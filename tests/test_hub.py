"""A Hugging Face Hub id as --checkpoint: read from the local Hugging Face cache, no network.

The cache is built here the way huggingface_hub lays it out (``models--owner--name/refs/main`` naming a snapshot
folder that holds the files ``save_pretrained`` wrote)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from segadapt.adapt.models.checkpoint import load_segmenter
from segadapt.data_checks import check_checkpoint
from segadapt.runtime.hub import is_hub_id, resolve_model_dir
from segadapt.runtime.inputs import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding one tiny SegFormer as ``segadapt-tests/tiny-segformer``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--segadapt-tests--tiny-segformer"
    torch.manual_seed(0)
    model = tiny_model("segformer").eval()
    model.hf.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # relative ids must not collide with folders of the checkout
    return model


def test_a_hub_id_loads_from_the_cache_and_an_existing_folder_wins(hub_cache, tmp_path):
    ref = "segadapt-tests/tiny-segformer"
    assert is_hub_id(ref) and resolve_model_dir(ref).name == COMMIT
    model, meta = load_segmenter(ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), hub_cache(x))
    assert meta.classes.num_classes == 11
    assert check_checkpoint(ref, "--checkpoint").kind == "transformers"
    (tmp_path / "segadapt-tests" / "tiny-segformer").mkdir(parents=True)  # a local folder of the same name
    assert not is_hub_id(ref) and resolve_model_dir(ref).resolve() == tmp_path / "segadapt-tests" / "tiny-segformer"


def test_an_id_missing_from_the_cache_is_one_line_naming_it(hub_cache):
    with pytest.raises(FileNotFoundError, match="segadapt-tests/absent.*HF_HUB_OFFLINE"):
        load_segmenter("segadapt-tests/absent")
    with pytest.raises(InputError, match="--checkpoint.*segadapt-tests/absent|segadapt-tests/absent.*--checkpoint"):
        check_checkpoint("segadapt-tests/absent", "--checkpoint")
    assert not is_hub_id("../escape/x") and not is_hub_id("a/b/c")
