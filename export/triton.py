"""A Triton Inference Server model repository for an exported ONNX model or TensorRT plan.

::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx | model.plan
    <repo>/<name>/1/model.json | model.plan.json   (our metadata, for clients: classes, palette, normalisation;
                                                     named as runtime.metadata.metadata_path names it)

Batch is Triton's implicit first dimension (``max_batch_size`` > 0 with dynamic batching). Triton batches only
requests of the same H x W; dynamic H/W show as -1.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

from segadapt.runtime.files import write_atomic
from segadapt.runtime.metadata import ModelMetadata, metadata_path
from segadapt.runtime.predictor import load_metadata

_TRITON_DTYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32",
                  "float16": "TYPE_FP16"}


def triton_config(meta: ModelMetadata, name: str, platform: str, max_batch_size: int = 8,
                  instance_count: int = 1, kind: str = "KIND_GPU") -> str:
    """The ``config.pbtxt`` text for a model described by ``meta``.

    Args:
        platform: ``onnxruntime_onnx`` or ``tensorrt_plan``.
        max_batch_size: largest batch Triton forms (<= the graph's/profile's max batch).
        kind: ``KIND_GPU`` or ``KIND_CPU``.

    Raises:
        ValueError: unknown platform, or a static graph whose batch does not allow dynamic batching.
    """
    if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ValueError(f"unknown Triton platform {platform!r}")
    h, w = (-1, -1) if meta.dynamic else meta.input_size
    in_dims: List[int] = [h, w, 3] if meta.input_layout == "uint8_nhwc" else [3, h, w]
    in_type = "TYPE_UINT8" if meta.input_layout == "uint8_nhwc" else "TYPE_FP32"
    if meta.output_kind == "class_map":
        out_dims = [h, w]
    else:
        s = meta.output_stride
        out_dims = [meta.num_classes, -1, -1] if meta.dynamic else [meta.num_classes, -(-h // s), -(-w // s)]
    # a dynamic graph gets Triton's implicit batch dimension; a static graph's fixed batch is written out
    mbs = min(max_batch_size, meta.max_batch) if meta.dynamic else 0
    dims_in = in_dims if mbs > 0 else [meta.batch] + in_dims
    dims_out = out_dims if mbs > 0 else [meta.batch] + out_dims
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {mbs}",
        "input [",
        "  {",
        f'    name: "{meta.input_name}"',
        f"    data_type: {in_type}",
        f"    dims: [ {', '.join(str(d) for d in dims_in)} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{meta.output_name}"',
        f"    data_type: {_TRITON_DTYPES[meta.output_dtype]}",
        f"    dims: [ {', '.join(str(d) for d in dims_out)} ]",
        "  }",
        "]",
    ]
    if mbs > 0:
        pref = sorted({b for b in (1, 2, 4, 8, mbs) if b <= mbs})
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, pref))} ]",
                  "  max_queue_delay_microseconds: 2000", "}"]
    lines += ["instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def write_triton_repository(model_path: str | Path, repo: str | Path, name: str = "segadapt",
                            max_batch_size: int = 8, kind: str = "KIND_GPU") -> Path:
    """Lay out a Triton model repository for ``model_path`` (``.onnx`` or ``.engine``/``.plan``).

    Returns:
        the model directory ``<repo>/<name>``.

    Raises:
        FileNotFoundError: the model is missing.
        BackendError: no metadata (a sidecar, or for an ``.onnx`` file the copy embedded in the graph) or an
            invalid one.
    """
    model_path = Path(model_path)
    meta = load_metadata(model_path)  # the sidecar, or for an .onnx file the copy embedded in the graph
    platform = "onnxruntime_onnx" if model_path.suffix == ".onnx" else "tensorrt_plan"
    mdir = Path(repo) / name
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    target = mdir / "1" / ("model.onnx" if platform == "onnxruntime_onnx" else "model.plan")
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(model_path, tmp)
    tmp.replace(target)
    meta.save(metadata_path(target))
    write_atomic(mdir / "config.pbtxt", triton_config(meta, name, platform, max_batch_size, kind=kind).encode())
    return mdir
