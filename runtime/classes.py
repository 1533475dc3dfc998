"""Class names, palette and ignore index of a label set, plus colourisation helpers (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class ClassInfo:
    """A label set: class names, an RGB palette and the ignore index.

    Attributes:
        names: class names; class id ``i`` is ``names[i]``.
        palette: one RGB triple (0-255) per class.
        ignore_index: label value that marks pixels without a class (void); never a valid class id.
        stuff: optional per-class flag, True for amorphous "stuff" (road, sky, ...), False for countable "things"
            (car, pedestrian, ...); read from a ``"stuff"`` list of booleans in ``classes.json``. None (the file has
            no such list) = :func:`default_stuff_flags` by class name, see :meth:`stuff_flags`. Used by SeCo's
            pseudo-label pass (see docs/method-notes.md, SeCo).
    """

    names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    ignore_index: int = 255
    extra: dict = field(default_factory=dict, compare=False)
    stuff: Optional[Tuple[bool, ...]] = None

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise ValueError("ClassInfo needs at least one class name")
        if len(self.palette) != len(self.names):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.names)} classes")
        if 0 <= self.ignore_index < len(self.names):
            raise ValueError(f"ignore_index {self.ignore_index} collides with class id of "
                             f"{self.names[self.ignore_index]!r}")
        if self.stuff is not None and len(self.stuff) != len(self.names):
            raise ValueError(f"'stuff' has {len(self.stuff)} flags for {len(self.names)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassInfo":
        """Build from ``{"classes": [...], "palette": [[r, g, b], ...], "ignore_index": int}``."""
        names = d.get("classes", d.get("names"))
        if names is None:
            raise ValueError("class description has no 'classes' list")
        palette = d.get("palette") or default_palette(len(names))
        stuff = d.get("stuff")
        if stuff is not None and (not isinstance(stuff, list) or not all(isinstance(v, bool) for v in stuff)):
            raise ValueError("'stuff' must be a list of true/false, one per class")
        return cls(
            names=tuple(str(n) for n in names),
            palette=tuple(tuple(int(v) for v in c) for c in palette),
            ignore_index=int(d.get("ignore_index", 255)),
            stuff=tuple(stuff) if stuff is not None else None,
        )

    def to_dict(self) -> dict:
        d = {"classes": list(self.names), "palette": [list(c) for c in self.palette],
             "ignore_index": self.ignore_index}
        if self.stuff is not None:
            d["stuff"] = list(self.stuff)
        return d

    def stuff_flags(self) -> Tuple[bool, ...]:
        """One flag per class, True = stuff: the ``stuff`` list of the class file, else :func:`default_stuff_flags`.

        Raises:
            ValueError: no ``stuff`` list and a class name the built-in table does not know (the message names it).
        """
        return self.stuff if self.stuff is not None else default_stuff_flags(self.names)

    @classmethod
    def load(cls, path: str | Path) -> "ClassInfo":
        """Read a ``classes.json`` file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not valid JSON or lacks the class list (the message names the file).
        """
        from segadapt.runtime.files import read_json_object

        d = read_json_object(path, "class description")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid class description: {e}") from None

    def palette_array(self) -> np.ndarray:
        """Palette as a (256, 3) uint8 lookup table; ids without a class (ignore included) map to black."""
        lut = np.zeros((256, 3), np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, np.uint8)
        return lut


#: Built-in stuff/things split by (lower-case) class name, for class files without a ``stuff`` list. Cityscapes-19
#: follows SeCo (Zhao et al., arXiv 2312.06331): stuff = road, sidewalk, building, wall, fence, vegetation, terrain,
#: sky; things = pole, traffic light/sign, person, rider and the vehicles. CamVid-11 maps onto it (Pavement =
#: sidewalk, Tree = vegetation, SignSymbol = sign, Pedestrian = person, Bicyclist = rider): stuff = Sky, Building,
#: Road, Pavement, Tree, Fence; things = Pole, SignSymbol, Car, Pedestrian, Bicyclist.
STUFF_BY_NAME = {
    **{n: True for n in ("road", "sidewalk", "pavement", "building", "wall", "fence", "vegetation", "tree",
                         "terrain", "sky")},
    **{n: False for n in ("pole", "traffic light", "traffic sign", "signsymbol", "person", "pedestrian", "rider",
                          "bicyclist", "car", "truck", "bus", "train", "motorcycle", "bicycle")},
}


def default_stuff_flags(names: Sequence[str]) -> Tuple[bool, ...]:
    """Stuff (True) / thing (False) per class name from :data:`STUFF_BY_NAME` (case-insensitive).

    Raises:
        ValueError: a name the table does not know; add a ``"stuff": [true, false, ...]`` list to classes.json.
    """
    unknown = [n for n in names if n.lower() not in STUFF_BY_NAME]
    if unknown:
        raise ValueError(f"no built-in stuff/thing flag for class(es) {unknown}; add a \"stuff\" list of true/false "
                         "(one per class) to classes.json")
    return tuple(STUFF_BY_NAME[n.lower()] for n in names)


def default_palette(n: int) -> List[List[int]]:
    """A deterministic, well-spread RGB palette for ``n`` classes (PASCAL VOC bit-interleaving scheme)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def colorize(class_map: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Colour a class map.

    Args:
        class_map: (H, W) integer class ids.
        palette: (K, 3) RGB colours, 0-255; ids >= K become black.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    pal = np.asarray(palette, np.uint8)
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(pal)] = pal[:256]
    return lut[np.clip(class_map, 0, 255).astype(np.uint8)]


def overlay(image_rgb: np.ndarray, class_map: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised class map over an image (OpenCV LUT + addWeighted: about 2 ms at 960x540).

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        class_map: (H, W) integer class ids (0-255), same H and W as the image.
        palette: (K, 3) RGB colours.
        alpha: opacity of the class colours, in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: the image and class map sizes differ, or alpha is outside [0, 1].
    """
    import cv2

    if image_rgb.shape[:2] != class_map.shape[:2]:
        raise ValueError(f"image {image_rgb.shape[:2]} and class map {class_map.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pal = np.asarray(palette, np.uint8)
    lut = np.zeros((256, 1, 3), np.uint8)
    lut[: len(pal), 0] = pal[:256]
    cm = np.clip(class_map, 0, 255).astype(np.uint8)
    col = cv2.LUT(cv2.merge([cm, cm, cm]), lut)
    return cv2.addWeighted(np.ascontiguousarray(image_rgb), 1.0 - alpha, col, alpha, 0.0)
