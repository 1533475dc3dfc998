"""The file that describes an exported model, defined once here and written by ``export``.

Every exported model file has its own metadata file :class:`ModelMetadata` beside it (see :func:`metadata_path`):
``<name>.onnx`` -> ``<name>.json``, ``<name>.engine`` -> ``<name>.engine.json``, ``<name>.plan`` ->
``<name>.plan.json``, so that an engine built from an ONNX file never overwrites the ONNX file's metadata. ONNX files
also carry the same metadata inside the graph (``metadata_props`` key ``segadapt``), so a copied ``.onnx`` alone still
runs. The runtime reads it to know the input layout and size, normalisation, output kind and class names, and (for
TensorRT engines) to refuse an engine built for another TensorRT version or GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

from segadapt.runtime.classes import ClassInfo
from segadapt.runtime.files import read_json_object, write_json

METADATA_VERSION = 1
INPUT_LAYOUTS = ("uint8_nhwc", "float_nchw")
OUTPUT_KINDS = ("class_map", "logits")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ModelMetadata:
    """Description of an exported segmenter.

    Attributes:
        classes, palette, ignore_index: the label set (class id i is ``classes[i]``; palette RGB 0-255).
        input_name, output_name: graph tensor names.
        input_layout: ``uint8_nhwc`` (B, H, W, 3) uint8 RGB, normalisation inside the graph, or ``float_nchw``
            (B, 3, H, W) float32, already normalised with ``mean``/``std``.
        input_size: (H, W) in pixels of the static graph or of the optimisation profile's ``opt`` shape.
        dynamic: whether batch, height and width are dynamic.
        min_size, max_size: (H, W) bounds of a dynamic graph (TensorRT profile); ignored for static graphs.
        batch: static batch size (or the profile's ``opt`` batch); max_batch: the profile's max batch.
        mean, std: per-channel RGB normalisation in [0, 1] units: ``x = (rgb / 255 - mean) / std``.
        output_kind: ``class_map`` (B, H, W) integer ids at input resolution or ``logits`` (B, K, H/s, W/s) float
            with s = ``output_stride``.
        output_dtype: numpy dtype name of the output (``uint8``, ``int32``, ``float32``, ``float16``).
        precision: ``fp32``, ``fp16`` or ``int8`` (as baked into the graph or engine).
        format: ``onnx``, ``engine`` or ``openvino`` (an OpenVINO IR ``.xml``, e.g. the NNCF INT8 one).
        source_checkpoint, source_checkpoint_sha256: where the weights came from.
        exporter: versions of the tools that produced the file (torch, onnx, onnxslim, onnxruntime, tensorrt...).
        tensorrt_version, gpu_name, gpu_compute_capability: for engines, what they are bound to.
        parity: agreement measured at export time (max abs logit difference, class-map agreement...).
        quantization: for INT8 graphs and engines, how they were quantised (empty otherwise): ``scheme``
            (``onnxruntime``: uint8 asymmetric activations, for ONNX Runtime's CPU kernels; ``tensorrt``: int8
            symmetric activations, every zero point 0, the only form TensorRT's ONNX parser accepts), ``format``
            (``QDQ``), ``activation_type``/``weight_type`` (``uint8``/``int8``), ``activation_symmetric``,
            ``weight_symmetric``, ``per_channel``, ``op_types``, ``calibration_method``, ``calibration_frames``,
            ``calibration_data``.
        adaptation: the label-free selection of the ``segadapt adapt`` run that made the model: ``verdict``
            (``better``, ``no better`` or ``uncertain``: whether the picked model is expected to beat the source
            model), ``margin`` (the validator margin, float, may be negative), ``picked`` (the candidate kept, e.g.
            ``source``, ``adabn_0.75``, ``step_000150``), ``rule`` (how it was picked) and ``reason`` (one sentence).
            Empty for a model not made by ``segadapt adapt`` with selection (and in metadata written before it).
    """

    classes: List[str]
    palette: List[List[int]]
    ignore_index: int = 255
    input_name: str = "images"
    output_name: str = "class_map"
    input_layout: str = "uint8_nhwc"
    input_size: Tuple[int, int] = (360, 480)
    dynamic: bool = False
    min_size: Tuple[int, int] = (64, 64)
    max_size: Tuple[int, int] = (1080, 1920)
    batch: int = 1
    max_batch: int = 1
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    output_kind: str = "class_map"
    output_dtype: str = "uint8"
    output_stride: int = 1
    precision: str = "fp32"
    format: str = "onnx"
    arch: str = ""
    source_checkpoint: str = ""
    source_checkpoint_sha256: str = ""
    exporter: dict = field(default_factory=dict)
    tensorrt_version: Optional[str] = None
    gpu_name: Optional[str] = None
    gpu_compute_capability: Optional[str] = None
    parity: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    adaptation: dict = field(default_factory=dict)
    created: str = ""
    metadata_version: int = METADATA_VERSION

    def __post_init__(self) -> None:
        if self.input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got {self.input_layout!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.input_size = tuple(int(v) for v in self.input_size)
        self.min_size = tuple(int(v) for v in self.min_size)
        self.max_size = tuple(int(v) for v in self.max_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @property
    def class_info(self) -> ClassInfo:
        return ClassInfo(tuple(self.classes), tuple(tuple(c) for c in self.palette), self.ignore_index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "ModelMetadata":
        """Build from a dict; unknown keys are ignored (newer writers), missing required ones are an error.

        Raises:
            ValueError: required keys missing or bad values (the message names ``source``).
        """
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source or 'metadata'}: invalid model metadata: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write as JSON atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelMetadata":
        """Read a metadata JSON file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON or not valid metadata (the message names the file).
        """
        return cls.from_dict(read_json_object(path, "model metadata"), str(path))


#: the keys of a selection record (the adaptation's ``selection``) that metadata keeps
SELECTION_KEYS = ("verdict", "margin", "picked", "rule", "reason")


def selection_record(selection) -> dict:
    """The :data:`SELECTION_KEYS` of an adaptation's selection record (``summary.json``'s ``selection``, or a
    checkpoint's ``info["selection"]``); {} when ``selection`` is not a dict or names no verdict."""
    if not isinstance(selection, dict) or not selection.get("verdict"):
        return {}
    return {k: selection[k] for k in SELECTION_KEYS if k in selection}


def margin_text(selection: dict, label: str = "margin") -> str:
    """`` (<label> +0.071)`` for a selection record's ``margin``; "" when it has none or it is not a number."""
    try:
        return f" ({label} {float(selection['margin']):+.3g})"
    except (KeyError, TypeError, ValueError):
        return ""


def verdict_line(selection) -> str:
    """``adaptation verdict: <verdict> (margin <m>)`` for a selection record, "" when it has no verdict."""
    rec = selection_record(selection)
    return f"adaptation verdict: {rec['verdict']}{margin_text(rec)}" if rec else ""


def metadata_path(model_path: str | Path) -> Path:
    """The metadata file beside a model file, one per artefact.

    ``dir/name.onnx`` -> ``dir/name.json`` (as before); any other file (``name.engine``, ``name.plan``, ``name.trt``)
    -> ``dir/name.engine.json`` etc.: the full file name plus ``.json``, so that ``model.onnx`` and the engine built
    from it (``model.engine``) keep separate metadata. Engines built before this naming had ``name.json``: rebuild
    them (engines are bound to one machine anyway) or rename the file.
    """
    p = Path(model_path)
    if p.suffix.lower() == ".onnx":
        return p.with_suffix(".json")
    return p.with_name(p.name + ".json")
