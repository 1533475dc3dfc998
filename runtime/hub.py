"""Model folders named by a Hugging Face Hub id: resolved to the local Hugging Face cache (no torch).

``--checkpoint nvidia/segformer-b0-finetuned-cityscapes-512-1024`` (or ``--model.pretrained``) works when no folder of
that name exists: the id is looked up in the Hugging Face cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``) first, and downloaded into it only where the Hub is reachable and ``HF_HUB_OFFLINE`` is
not set. Loading then reads the cached folder like any local transformers directory (``from_pretrained`` with
``local_files_only=True``).
"""

from __future__ import annotations

import re
from pathlib import Path

#: ``owner/name`` as the Hub spells repository ids
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
#: the files a segmentation model folder needs (no other weights formats, no ONNX, no images)
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def is_hub_id(ref: str | Path) -> bool:
    """Whether ``ref`` reads as a Hub id (``owner/name``) and is no existing path."""
    s = str(ref)
    return not Path(s).exists() and HUB_ID.fullmatch(s) is not None and ".." not in s


def resolve_model_dir(ref: str | Path) -> Path:
    """A local folder for ``ref``: the path itself, or the cached snapshot of the Hub model ``ref``.

    Args:
        ref: a folder path, or a Hub id ``owner/name`` when no such folder exists.

    Returns:
        The folder to load (``config.json`` and weights inside).

    Raises:
        FileNotFoundError: ``ref`` is a Hub id that is neither in the cache nor downloadable (offline, unknown id,
            or ``huggingface_hub`` not installed); the message names the id and the cache.
    """
    if not is_hub_id(ref):
        return Path(ref)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{ref}: no such folder (a Hub id needs huggingface_hub: pip install "
                                f"'segadapt[adapt]')") from None
    try:
        return Path(snapshot_download(str(ref), allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache entry without a snapshot
        pass
    where = f"not in the Hugging Face cache {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{ref}: no such folder, and {where} (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(str(ref), allow_patterns=MODEL_FILES))
    except Exception as e:  # network errors, unknown or gated repositories: one line, not a traceback
        raise FileNotFoundError(f"{ref}: no such folder, {where}, and the Hub did not give it "
                                f"({type(e).__name__})") from None
