"""The Cityscapes label table (label ids, train ids, colours) and the built-in Cityscapes -> CamVid-11 map (no torch).

KITTI semantics, Cityscapes, ACDC, Dark Zurich, BDD100K, IDD and Mapillary (Cityscapes version) publish labels in
one of three Cityscapes forms: label ids (0-33, ``*_labelIds.png``, KITTI's ``semantic/``), train ids (0-18 and 255,
``*_labelTrainIds.png``) or the colour palette (``*_color.png``, KITTI's ``semantic_rgb/``). The table is
cityscapesScripts' ``helpers/labels.py`` (Cordts et al., CVPR 2016).

:data:`CAMVID11_MAP` maps every Cityscapes class name to a CamVid-11 class name or None (ignore). It is the mapping
of the ``kitti-semantics`` data set (its README): sidewalk -> Pavement, vegetation -> Tree, traffic light/sign ->
SignSymbol, truck/bus -> Car, person -> Pedestrian, rider/bicycle/motorcycle -> Bicyclist; wall, terrain, guard
rail, parking, rail track, bridge, tunnel, train, caravan, trailer and the void classes -> ignore. Classes that
share a colour share a target, so ids and colours convert alike: polegroup -> Pole (pole's colour), license plate
-> Car (car's colour), and the void classes unlabeled, ego vehicle, rectification border, out of roi, static (all
black), dynamic and ground -> ignore.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

#: (name, label id, train id (255 = not a train class), RGB colour), in label-id order; license plate has id -1.
CITYSCAPES_LABELS: Tuple[Tuple[str, int, int, Tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
    ("license plate", -1, 255, (0, 0, 142)),
)

#: ignore value of Cityscapes train-id labels
TRAIN_IGNORE = 255

#: Cityscapes class name -> CamVid-11 class name, or None (ignore); covers every name of :data:`CITYSCAPES_LABELS`.
CAMVID11_MAP: Dict[str, Optional[str]] = {
    "unlabeled": None, "ego vehicle": None, "rectification border": None, "out of roi": None, "static": None,
    "dynamic": None, "ground": None,
    "road": "Road", "sidewalk": "Pavement", "parking": None, "rail track": None,
    "building": "Building", "wall": None, "fence": "Fence", "guard rail": None, "bridge": None, "tunnel": None,
    "pole": "Pole", "polegroup": "Pole", "traffic light": "SignSymbol", "traffic sign": "SignSymbol",
    "vegetation": "Tree", "terrain": None, "sky": "Sky",
    "person": "Pedestrian", "rider": "Bicyclist",
    "car": "Car", "truck": "Car", "bus": "Car", "caravan": None, "trailer": None, "train": None,
    "motorcycle": "Bicyclist", "bicycle": "Bicyclist", "license plate": "Car",
}

#: the name under which :data:`CAMVID11_MAP` can be given instead of a map file (``--map cityscapes-camvid11``)
BUILTIN_MAPS = {"cityscapes-camvid11": CAMVID11_MAP}


def label_id_names() -> Dict[int, str]:
    """Label id (0-33) -> Cityscapes class name."""
    return {i: n for n, i, _, _ in CITYSCAPES_LABELS if i >= 0}


def train_id_names() -> Dict[int, str]:
    """Train id (0-18) -> Cityscapes class name (255, the ignore value, is not a class)."""
    return {t: n for n, _, t, _ in CITYSCAPES_LABELS if t != TRAIN_IGNORE}


def train_class_names() -> List[str]:
    """The 19 Cityscapes evaluation classes in train-id order (road ... bicycle): a Cityscapes-19 model's classes."""
    ids = train_id_names()
    return [ids[t] for t in sorted(ids)]


def colour_names() -> Dict[Tuple[int, int, int], List[str]]:
    """RGB colour -> the Cityscapes class names drawn in it (several for black, pole grey and car blue)."""
    out: Dict[Tuple[int, int, int], List[str]] = {}
    for n, _, _, c in CITYSCAPES_LABELS:
        out.setdefault(c, []).append(n)
    return out
