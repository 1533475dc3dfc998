"""``segadapt data convert``: labelled frames in a published format -> the project's layout (numpy + PIL, no torch).

Input formats (``--from``): ``cityscapes-ids`` (label ids 0-33, single channel), ``cityscapes-trainids`` (train
ids 0-18, 255 = ignore), ``cityscapes-color`` (the Cityscapes colour palette, RGB), ``palette:FILE`` (RGB labels in
the colours of FILE, a classes.json-style ``{"classes": [...], "palette": [[r, g, b], ...]}``).

Source layouts (``SRC``; or name the folders with ``--images``/``--labels``, relative to SRC or absolute):
``images/`` + ``labels/``; KITTI semantics ``image_2/`` + ``semantic/`` (ids) or ``semantic_rgb/`` (colour);
Cityscapes-style ``leftImg8bit/`` + ``gtFine/`` (all splits below them; pass ``--images leftImg8bit/val --labels
gtFine/val`` for one split). Folders are searched recursively; an image and its label are paired by file name
without the published suffixes (``_leftImg8bit``, ``_rgb_anon``, ``_gtFine_labelIds``, ``_gt_labelColor`` ...);
where a label folder holds several kinds (Cityscapes' ``_labelIds``/``_labelTrainIds``/``_color``), the one of
``--from`` is taken.

Output (``OUT``): ``images/<name>.<ext>`` (copied byte for byte), ``labels/<name>.png`` (single channel, value =
class id of ``--to``, its ignore index for void), ``classes.json`` (``--to``) and ``convert.json`` (what was done,
per-class pixel shares). Every file is written atomically; all inputs are checked (pairs, sizes, label values
against the map) before anything is written.

The map (``--map``): a JSON file or a built-in name (:mod:`segadapt.adapt.class_map`); default: the built-in
Cityscapes -> CamVid-11 map when the source is a Cityscapes format and ``--to`` has the 11 CamVid classes, else
classes of the same name. Label values whose class the map does not cover are refused (``--unmapped error``, one
line naming the file and the values) or become the ignore index (``--unmapped ignore``).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from segadapt.adapt.class_map import ClassMap, check_targets, load_class_map, norm
from segadapt.adapt.data import cityscapes as cs
from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import read_json_object, write_atomic, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CAMVID11 = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
            "Bicyclist")
_IMAGE_TAIL = re.compile(r"_(leftImg8bit|rgb_anon|rgb_ref_anon|rgb)$", re.I)
_LABEL_TAIL = re.compile(r"(_(gtFine|gtCoarse|gt))?_(labelIds|labelTrainIds|color|labelColor)$", re.I)
_KIND_TAIL = {"ids": re.compile(r"labelIds$", re.I), "trainids": re.compile(r"labelTrainIds$", re.I),
              "color": re.compile(r"(_color|labelColor)$", re.I)}
UNMAPPED = -1


@dataclass
class SourceFormat:
    """A label format: the codes it uses and the source class names of each code.

    Attributes:
        name: the ``--from`` value.
        colour: codes are RGB colours (packed ``r << 16 | g << 8 | b``) rather than single-channel values.
        codes: code -> source class names (several where classes share a colour).
        kind: ``ids``, ``trainids`` or ``color``: which files to take from a folder holding several kinds.
        ignore_codes: codes that always mean "no class" (255 in train ids).
    """

    name: str
    colour: bool
    codes: Dict[int, List[str]]
    kind: str
    ignore_codes: Tuple[int, ...] = field(default_factory=tuple)


def pack(rgb: Sequence[int]) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def source_format(spec: str) -> SourceFormat:
    """The format named by ``--from``.

    Raises:
        ValueError: an unknown format, or a palette file without classes and colours (named).
        FileNotFoundError: ``palette:FILE`` names no file.
    """
    if spec == "cityscapes-ids":
        return SourceFormat(spec, False, {i: [n] for i, n in cs.label_id_names().items()}, "ids")
    if spec == "cityscapes-trainids":
        return SourceFormat(spec, False, {i: [n] for i, n in cs.train_id_names().items()}, "trainids",
                            (cs.TRAIN_IGNORE,))
    if spec == "cityscapes-color":
        return SourceFormat(spec, True, {pack(c): n for c, n in cs.colour_names().items()}, "color")
    if spec.startswith("palette:"):
        path = spec[len("palette:"):]
        d = read_json_object(path, "palette")
        names, pal = d.get("classes"), d.get("palette")
        if not isinstance(names, list) or not isinstance(pal, list) or len(names) != len(pal) or not names:
            raise ValueError(f"{path}: a palette file needs equally long 'classes' and 'palette' lists")
        codes: Dict[int, List[str]] = {}
        for n, c in zip(names, pal):
            codes.setdefault(pack(c), []).append(str(n))
        return SourceFormat(spec, True, codes, "color")
    raise ValueError(f"--from {spec!r}: use cityscapes-ids, cityscapes-trainids, cityscapes-color or palette:FILE")


def default_map(fmt: SourceFormat, target: ClassInfo) -> ClassMap:
    """Built-in Cityscapes -> CamVid-11 map for a Cityscapes format and the 11 CamVid classes; else same names."""
    if fmt.name.startswith("cityscapes-") and [norm(n) for n in target.names] == [norm(n) for n in CAMVID11]:
        return load_class_map("cityscapes-camvid11")
    tnames = {norm(n) for n in target.names}
    pairs = {norm(n): norm(n) for names in fmt.codes.values() for n in names if norm(n) in tnames}
    return ClassMap(pairs, "classes of the same name")


def build_lut(fmt: SourceFormat, cmap: ClassMap, target: ClassInfo, unmapped: str) -> np.ndarray:
    """Code -> target class id, the target's ignore index, or :data:`UNMAPPED` (-1, only with ``unmapped="error"``).

    Returns:
        int16 lookup table over all codes: 2^24 entries for colours, 2^16 for single-channel values.

    Raises:
        ValueError: the map names target classes ``target`` lacks, or sends classes that share a code (colour) to
            different targets.
    """
    tidx = check_targets(cmap, target.names, "--to")
    fill = target.ignore_index if unmapped == "ignore" else UNMAPPED
    lut = np.full(1 << (24 if fmt.colour else 16), fill, np.int16)
    for code, names in fmt.codes.items():
        covered = [n for n in names if cmap.covers(n)]
        dsts = {cmap.target(n) for n in covered}
        if len(dsts) > 1:
            raise ValueError(f"{cmap.origin}: classes {covered} share one {'colour' if fmt.colour else 'value'} in "
                             f"{fmt.name} but are mapped to different classes {sorted(map(str, dsts))}")
        if dsts:
            d = dsts.pop()
            lut[code] = target.ignore_index if d is None else tidx[d]
    for code in fmt.ignore_codes:
        lut[code] = target.ignore_index
    return lut


def _key(path: Path, tail: re.Pattern) -> str:
    return tail.sub("", path.stem)


def _files(d: Path) -> List[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_folders(src: Path, fmt: SourceFormat, images: str = "", labels: str = "") -> Tuple[Path, Path]:
    """The image and label folders: ``--images``/``--labels`` (relative to ``src`` or absolute) or a known layout.

    Raises:
        FileNotFoundError: a named folder is missing, or ``src`` has no known layout (the layouts are listed).
    """
    if images or labels:
        if not (images and labels):
            raise ValueError("--images and --labels go together")
        pair = (src / images, src / labels)
    else:
        kitti_labels = "semantic_rgb" if fmt.colour else "semantic"
        layouts = [("images", "labels"), ("image_2", kitti_labels), ("leftImg8bit", "gtFine")]
        found = [(src / i, src / l) for i, l in layouts if (src / i).is_dir() and (src / l).is_dir()]
        if not found:
            raise FileNotFoundError(f"{src}: no known layout ({', '.join(f'{i}/ + {l}/' for i, l in layouts)}); "
                                    f"name the folders with --images and --labels")
        pair = found[0]
    for d, flag in zip(pair, ("--images", "--labels")):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder ({flag})")
    return pair


def find_pairs(image_dir: Path, label_dir: Path, fmt: SourceFormat,
               skip_unlabelled: bool = False) -> Tuple[List[Tuple[str, Path, Path]], int]:
    """(name, image, label) for every frame, sorted by name, and the number of images skipped for lack of a label.

    Raises:
        ValueError: no images, two files with the same name, labels without images, or (unless
            ``skip_unlabelled``) images without labels (counted, the first few named).
    """
    imgs = _files(image_dir)
    labs = _files(label_dir)
    kind = [p for p in labs if _KIND_TAIL[fmt.kind].search(p.stem)]
    labs = kind or [p for p in labs if not re.search(r"(instanceIds|labelIds|labelTrainIds|color|labelColor)$",
                                                     p.stem, re.I)] or labs
    if not imgs:
        raise ValueError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    maps = []
    for files, tail, d in ((imgs, _IMAGE_TAIL, image_dir), (labs, _LABEL_TAIL, label_dir)):
        m: Dict[str, Path] = {}
        for p in files:
            k = _key(p, tail)
            if k in m:
                raise ValueError(f"{d}: two files named {k!r}: {m[k]} and {p}")
            m[k] = p
        maps.append(m)
    im, lm = maps
    checks = [(lm, im, f"labels without an image in {image_dir}")]
    if not skip_unlabelled:
        checks.append((im, lm, f"images without a label in {label_dir} (--skip-unlabelled leaves them out)"))
    for a, b, what in checks:
        miss = sorted(set(a) - set(b))
        if miss:
            raise ValueError(f"{len(miss)} {what}: {', '.join(miss[:5])}{' ...' if len(miss) > 5 else ''}")
    keys = sorted(set(im) & set(lm))
    if not keys:
        raise ValueError(f"{image_dir}: no image has a label in {label_dir}")
    return [(k, im[k], lm[k]) for k in keys], len(im) - len(keys)


def read_codes(path: Path, fmt: SourceFormat) -> np.ndarray:
    """A label file as (H, W) int64 codes: values (ids) or packed RGB (colours).

    Raises:
        ValueError: unreadable, or a colour image where values are expected and vice versa (the file named).
    """
    try:
        with Image.open(path) as im:
            if fmt.colour:
                if im.mode not in ("RGB", "RGBA", "P"):
                    raise ValueError(f"{path}: a {im.mode} image, not RGB colours (--from {fmt.name}); single-channel "
                                     f"ids take --from cityscapes-ids or cityscapes-trainids")
                a = np.asarray(im.convert("RGB"), np.int64)
                return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"{path}: a {im.mode} image, not single-channel ids (--from {fmt.name}); colour "
                                 f"labels take --from cityscapes-color or palette:FILE")
            return np.asarray(im, np.int64)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the label image ({e})") from None


def _describe(code: int, colour: bool) -> str:
    return f"({code >> 16},{(code >> 8) & 255},{code & 255})" if colour else str(code)


def lookup(codes: np.ndarray, lut: np.ndarray, fill: int) -> np.ndarray:
    """(H, W) int16 target ids of (H, W) codes; codes outside the table (negative, too large) get ``fill``."""
    valid = (codes >= 0) & (codes < len(lut))
    if valid.all():
        return lut[codes]
    res = np.full(codes.shape, fill, np.int16)
    res[valid] = lut[codes[valid]]
    return res


def check_frames(pairs, fmt: SourceFormat, lut: np.ndarray, fill: int = UNMAPPED) -> int:
    """Pass 1, before anything is written: images readable, labels the image's size, every label value mapped
    (``fill``: what codes outside the table become: :data:`UNMAPPED` or, with ``--unmapped ignore``, the ignore
    index).

    Returns:
        the number of label pixels (all frames).

    Raises:
        ValueError: the first bad file, named, with its unmapped values (colours as (r,g,b)) or its sizes.
    """
    total = 0
    for _, img, lab in pairs:
        try:
            with Image.open(img) as im:
                w, h = im.size
        except OSError as e:
            raise ValueError(f"{img}: cannot read the image ({e})") from None
        codes = read_codes(lab, fmt)
        if codes.shape != (h, w):
            raise ValueError(f"{lab}: label is {codes.shape[1]}x{codes.shape[0]}, its image {img.name} is {w}x{h}")
        bad = np.unique(codes[lookup(codes, lut, fill) == UNMAPPED])
        if bad.size:
            shown = ", ".join(_describe(int(c), fmt.colour) for c in bad[:12]) + (" ..." if bad.size > 12 else "")
            raise ValueError(f"{lab}: {'colours' if fmt.colour else 'values'} {shown} are not covered by the class "
                             f"map (add them to --map, or --unmapped ignore)")
        total += codes.size
    return total


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def pixel_shares(counts: np.ndarray, target: ClassInfo) -> Dict[str, float]:
    """Per-class share of all label pixels in percent (class names, then ``ignore``)."""
    total = max(int(counts.sum()), 1)
    out = {n: float(counts[i]) * 100 / total for i, n in enumerate(target.names)}
    out["ignore"] = float(counts[target.ignore_index]) * 100 / total
    return out


def convert_dataset(src: str | Path, out: str | Path, from_format: str, to: str | Path, map_spec: str = "",
                    unmapped: str = "error", images: str = "", labels: str = "", overwrite: bool = False,
                    skip_unlabelled: bool = False, log: Callable[[str], None] = print) -> dict:
    """Convert a labelled set into the project's layout (see the module docstring); returns the ``convert.json``
    dict (frames, map, per-class pixel shares in percent).

    Raises:
        FileNotFoundError / ValueError: a bad input (named), found before anything is written.
    """
    if unmapped not in ("error", "ignore"):
        raise ValueError(f"--unmapped {unmapped!r}: use error or ignore")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such source folder")
    fmt = source_format(from_format)
    target = ClassInfo.load(to)
    if target.ignore_index > 255:
        raise ValueError(f"{to}: ignore index {target.ignore_index} does not fit an 8-bit label PNG")
    cmap = load_class_map(map_spec) if map_spec else default_map(fmt, target)
    lut = build_lut(fmt, cmap, target, unmapped)
    pairs, skipped = find_pairs(*resolve_folders(src, fmt, images, labels), fmt, skip_unlabelled)
    if (out / "labels").is_dir() and any((out / "labels").iterdir()) and not overwrite:
        raise FileExistsError(f"{out / 'labels'}: not empty (--overwrite replaces its files)")
    log(f"checking {len(pairs)} frames ({fmt.name}, map: {cmap.origin})"
        + (f"; {skipped} images without a label left out" if skipped else ""))
    check_frames(pairs, fmt, lut, target.ignore_index if unmapped == "ignore" else UNMAPPED)
    counts = np.zeros(256, np.int64)
    for name, img, lab in pairs:
        ids = lookup(read_codes(lab, fmt), lut, target.ignore_index).astype(np.uint8)  # pass 1: no UNMAPPED
        counts += np.bincount(ids.ravel(), minlength=256)
        write_atomic(out / "labels" / f"{name}.png", _png(ids))
        write_atomic(out / "images" / f"{name}{img.suffix.lower()}", img.read_bytes())
    shares = pixel_shares(counts, target)
    report = {"source": str(src), "from": fmt.name, "map": cmap.origin, "unmapped": unmapped, "frames": len(pairs),
              "skipped_unlabelled": skipped, "pixels": int(counts.sum()), "pixel_share_percent": shares}
    write_json(out / "classes.json", read_json_object(to, "class description"))
    write_json(out / "convert.json", report)
    return report


def format_shares(report: dict) -> str:
    """The per-class pixel shares of :func:`convert_dataset`'s report as a small table."""
    shares = report["pixel_share_percent"]
    w = max(len(n) for n in shares)
    lines = [f"{report['frames']} frames, {report['pixels']} label pixels ({report['from']}, map: {report['map']})",
             f"{'class':<{w}}  {'pixels %':>8}"]
    lines += [f"{n:<{w}}  {v:8.3f}" for n, v in shares.items()]
    return "\n".join(lines)
