"""Many-to-one maps between class sets, by class name (numpy only, no torch).

A map file is JSON ``{"map": {"<class>": "<class>" | null, ...}}`` (other keys, e.g. ``"description"``, are
ignored); names are matched case-insensitively. ``cityscapes-camvid11`` names the built-in Cityscapes -> CamVid-11
map (:data:`segadapt.adapt.data.cityscapes.CAMVID11_MAP`) instead of a file.

Used twice:

- ``segadapt data convert``: source label classes (keys) -> the output class set (values); null = ignore.
- ``segadapt evaluate --map``: a model scored on labels of another class set. The map runs from one side to the
  other, many-to-one: keys are the model's classes and values the labels' (``predictions -> labels``: a
  Cityscapes-19 model on CamVid-11 labels), or keys are the labels' classes and values the model's (``labels ->
  predictions``: a CamVid-11 model on Cityscapes labels). Its keys must cover every class of their side (extra keys
  are allowed, so one map serves class sets of different sizes); the direction is found from which side they cover
  (both: predictions -> labels). Scoring happens in the value side's class set, restricted to the classes some key
  reaches: label pixels whose class has no counterpart are ignored; a prediction of a model class with no
  counterpart counts as wrong (a miss of the pixel's true class, a false positive of none); the mean IoU runs over
  the reached classes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import read_json_object

#: ignore value of labels in the scored class set of :class:`ScoredMapping`
SCORED_IGNORE = 255


def norm(name: str) -> str:
    """The form in which class names are compared: stripped, lower case."""
    return str(name).strip().lower()


@dataclass(frozen=True)
class ClassMap:
    """A name map ``source class -> target class or None (ignore)``.

    Attributes:
        pairs: normalised source name -> normalised target name or None.
        origin: the file or built-in name it came from (for messages).
    """

    pairs: Dict[str, Optional[str]]
    origin: str

    def covers(self, name: str) -> bool:
        return norm(name) in self.pairs

    def target(self, name: str) -> Optional[str]:
        """The (normalised) target of a covered source name, None for ignore. Raises KeyError if not covered."""
        return self.pairs[norm(name)]


def load_class_map(spec: str | Path) -> ClassMap:
    """A built-in map name (``cityscapes-camvid11``) or a JSON map file ``{"map": {src: dst | null}}``.

    Raises:
        FileNotFoundError: no such file (and not a built-in name).
        ValueError: not JSON, no ``map`` object, a non-string key or value, or a key given twice up to case
            (the message names the file).
    """
    from segadapt.adapt.data.cityscapes import BUILTIN_MAPS

    if str(spec) in BUILTIN_MAPS:
        raw = BUILTIN_MAPS[str(spec)]
    else:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec}: class map file not found (or use a built-in map: "
                                    f"{', '.join(sorted(BUILTIN_MAPS))})")
        raw = read_json_object(spec, "class map").get("map")
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f'{spec}: a class map needs a non-empty "map" object {{"source class": "target class" '
                             f'or null}}')
    pairs: Dict[str, Optional[str]] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str)):
            raise ValueError(f"{spec}: map entries must be class name -> class name or null, got {k!r}: {v!r}")
        if norm(k) in pairs:
            raise ValueError(f"{spec}: class {k!r} is mapped twice")
        pairs[norm(k)] = None if v is None else norm(v)
    return ClassMap(pairs, str(spec))


def name_index(names: Sequence[str], what: str) -> Dict[str, int]:
    """Normalised class name -> class id.

    Raises:
        ValueError: two classes with the same name up to case (``what`` names the class set).
    """
    idx: Dict[str, int] = {}
    for i, n in enumerate(names):
        if norm(n) in idx:
            raise ValueError(f"{what}: class name {n!r} appears twice (names are compared case-insensitively)")
        idx[norm(n)] = i
    return idx


def check_targets(cmap: ClassMap, target_names: Sequence[str], what: str) -> Dict[str, int]:
    """Every non-null value of the map is a class of ``target_names``; returns the target name index.

    Raises:
        ValueError: values that are no class of the target set (named, with the set's classes).
    """
    idx = name_index(target_names, what)
    bad = sorted({v for v in cmap.pairs.values() if v is not None and v not in idx})
    if bad:
        raise ValueError(f"{cmap.origin}: map targets {bad} are not classes of {what} ({', '.join(target_names)})")
    return idx


@dataclass(frozen=True)
class ScoredMapping:
    """How predictions and labels of two class sets meet in one scored class set (see the module docstring).

    Attributes:
        direction: ``"predictions -> labels"`` or ``"labels -> predictions"``.
        classes: the scored classes (names, palette; ignore index :data:`SCORED_IGNORE`); R = len(classes.names).
        pred_lut: (K_model,) int64: model class id -> scored id in [0, R), or R for "no counterpart" (wrong).
        label_lut: (L,) int64 over label values 0..L-1 (class ids and the label ignore index): scored id or
            :data:`SCORED_IGNORE`.
        unscored: names of classes (either side) that have no counterpart.
    """

    direction: str
    classes: ClassInfo
    pred_lut: np.ndarray
    label_lut: np.ndarray
    unscored: Tuple[str, ...]


def _covering(cmap: ClassMap, names: Sequence[str]) -> List[str]:
    return [n for n in names if not cmap.covers(n)]


def evaluation_mapping(cmap: ClassMap, model: ClassInfo, labels: ClassInfo) -> ScoredMapping:
    """Resolve the map's direction and build the lookup tables of :class:`ScoredMapping`.

    Raises:
        ValueError: the map's keys cover neither all model classes nor all label classes, or a value is not a
            class of the other side (the message names the classes).
    """
    miss_model, miss_label = _covering(cmap, model.names), _covering(cmap, labels.names)
    forward = not miss_model
    if not forward and miss_label:
        raise ValueError(f"{cmap.origin}: the map's keys cover neither the model's classes (missing: "
                         f"{', '.join(miss_model)}) nor the labels' (missing: {', '.join(miss_label)})")
    keys, values = (model, labels) if forward else (labels, model)
    vidx = check_targets(cmap, values.names, "the labels" if forward else "the model")
    reached = sorted({vidx[t] for t in (cmap.target(n) for n in keys.names) if t is not None})
    scored = {v: r for r, v in enumerate(reached)}
    R = len(reached)
    if R == 0:
        raise ValueError(f"{cmap.origin}: the map sends no class of one side to a class of the other")
    key_to_scored = np.array([scored[vidx[t]] if (t := cmap.target(n)) is not None else -1 for n in keys.names])
    val_to_scored = np.array([scored.get(v, -1) for v in range(values.num_classes)])
    # predictions: no counterpart -> R (a wrong class); labels: no counterpart -> ignored
    model_lut = key_to_scored if forward else val_to_scored
    label_cls = val_to_scored if forward else key_to_scored
    pred_lut = np.where(model_lut < 0, R, model_lut).astype(np.int64)
    label_lut = np.full(max(labels.num_classes, labels.ignore_index + 1), SCORED_IGNORE, np.int64)
    label_lut[: labels.num_classes] = np.where(label_cls < 0, SCORED_IGNORE, label_cls)
    unscored = tuple([n for n, s in zip(keys.names, key_to_scored) if s < 0] +
                     [n for n, s in zip(values.names, val_to_scored) if s < 0])
    cls = ClassInfo(tuple(values.names[v] for v in reached), tuple(values.palette[v] for v in reached), SCORED_IGNORE)
    return ScoredMapping("predictions -> labels" if forward else "labels -> predictions", cls, pred_lut, label_lut,
                         unscored)


def drop_no_counterpart(metrics: dict, num_scored: int) -> dict:
    """Metrics of an (R+1)-class confusion matrix whose last class is "no counterpart" -> metrics of the R scored
    classes: per-class lists cut to R, ``miou`` and ``mean_acc`` re-averaged over them (None left out);
    ``pixel_acc`` keeps the no-counterpart predictions as wrong."""
    out = dict(metrics)
    for k in ("iou", "acc", "support"):
        out[k] = list(metrics[k][:num_scored])
    for k, src in (("miou", "iou"), ("mean_acc", "acc")):
        vals = [v for v in out[src] if v is not None]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
