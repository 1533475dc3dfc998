"""The FLOP floor of a model on this machine: its multiply-add work (from the ONNX graph) over the rate this CPU
multiplies matrices at (numpy's float32 GEMM), i.e. the time a perfect kernel library would need at GEMM speed.

Counted: ``Conv``, ``ConvTranspose``, ``MatMul`` and ``Gemm`` nodes, 2 FLOPs per multiply-add, with shapes from ONNX
shape inference on the graph with its input fixed to one concrete shape, and where that cannot resolve them (the
Shape/Reshape arithmetic of a dynamic SegFormer graph left 87 of its 88 weighted nodes unknown) from one ONNX Runtime
run on zeros. Elementwise ops, normalisation, resize and
softmax are left out (memory-bound, small next to the convolutions and matrix products of these models), so the
floor is a lower bound.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _shape_table(model) -> Dict[str, list]:
    shapes: Dict[str, list] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                           for d in vi.type.tensor_type.shape.dim]
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    return shapes


def _node_flops(n, shapes: Dict[str, list], batch: int) -> Optional[int]:
    """FLOPs of one weighted node, or None when a shape it needs is unknown (a leading unknown dimension is taken
    as ``batch``: dynamo graphs lose the batch after a global pool)."""
    a = shapes.get(n.input[0])
    w = shapes.get(n.input[1]) if len(n.input) > 1 else None
    out = shapes.get(n.output[0])
    if not (a and w and out):
        return None
    out = [batch if (i == 0 and d is None) else d for i, d in enumerate(out)]
    a = [batch if (i == 0 and d is None) else d for i, d in enumerate(a)]
    if None in out or None in w or None in a:
        return None
    if n.op_type == "Conv":  # out (N, Cout, ...) x (Cin/g * k...) multiply-adds
        return 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    if n.op_type == "ConvTranspose":  # every input pixel meets the whole kernel: in (N, Cin, ...) x (Cout/g * k...)
        return 2 * int(np.prod(a)) * int(np.prod(w[1:]))
    if n.op_type == "Gemm":
        trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return 2 * int(np.prod(out)) * int(k)
    return 2 * int(np.prod(out)) * int(a[-1])  # MatMul: (..., M, K) x (..., K, N)


def onnx_flops(path: str | Path, input_shape: Sequence[int]) -> dict:
    """FLOPs of one forward pass of an ONNX graph at a concrete input shape.

    Args:
        path: the ``.onnx`` file (FP32; quantised graphs count the same work).
        input_shape: the first input's shape, e.g. (1, 360, 480, 3) for uint8 NHWC; batch included.

    Returns:
        ``total`` (FLOPs, 2 per multiply-add), ``by_op`` {op type: FLOPs}, ``nodes`` (weighted nodes counted),
        ``unresolved`` (weighted nodes whose shapes inference could not resolve: not counted).

    Raises:
        ValueError: an input shape of the wrong rank.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"{path}: input has {len(dims)} dimensions, got shape {tuple(input_shape)}")
    for d, v in zip(dims, input_shape):
        d.Clear()
        d.dim_value = int(v)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shape_table(model)
    b = int(input_shape[0])
    init = {t.name for t in model.graph.initializer}
    todo = {t for n in model.graph.node if n.op_type in WEIGHTED_OPS for t in list(n.input[:2]) + [n.output[0]]
            if t and t not in init and (t not in shapes or None in shapes[t])}
    if todo:  # a dynamic graph's Shape/Reshape arithmetic (SegFormer's) defeats static inference: run it once
        shapes.update(_run_shapes(model, input_shape, sorted(todo)))
    by_op: Dict[str, int] = {}
    counted = unresolved = 0
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OPS:
            continue
        f = _node_flops(n, shapes, b)
        if f is None:
            unresolved += 1
            continue
        counted += 1
        by_op[n.op_type] = by_op.get(n.op_type, 0) + f
    return {"total": int(sum(by_op.values())), "by_op": by_op, "nodes": counted, "unresolved": unresolved}


def _run_shapes(model, input_shape: Sequence[int], names: list) -> Dict[str, list]:
    """The shapes of the tensors ``names`` (float32 activations) in one ONNX Runtime run of ``model`` on zeros of
    ``input_shape``; {} when the run fails (those nodes then stay unresolved)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    inp = model.graph.input[0]
    x = np.zeros(input_shape, onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(names, {inp.name: x})
    except Exception:  # noqa: BLE001 - a graph ORT cannot run: the static shapes are all there is
        return {}
    return {t: list(o.shape) for t, o in zip(names, outs)}


def gemm_gflops(n: int = 1024, repeats: int = 7) -> float:
    """This CPU's float32 matrix-multiply rate in GFLOP/s: numpy's ``A @ B`` on n x n matrices (its BLAS, all the
    threads it uses), best of ``repeats`` runs after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def flop_floor(path: str | Path, input_shape: Sequence[int], gflops: Optional[float] = None) -> dict:
    """The FLOP floor of a graph at one input shape: :func:`onnx_flops` / :func:`gemm_gflops`.

    Returns:
        ``gflop`` (model GFLOP per pass), ``gemm_gflops`` (measured rate), ``floor_ms`` (GFLOP / rate, ms per pass),
        ``input_shape``, ``by_op``, ``unresolved``.
    """
    f = onnx_flops(path, input_shape)
    rate = gflops or gemm_gflops()
    return {"gflop": f["total"] / 1e9, "gemm_gflops": rate, "floor_ms": f["total"] / 1e9 / rate * 1e3,
            "input_shape": list(input_shape), "by_op": {k: v / 1e9 for k, v in f["by_op"].items()},
            "unresolved": f["unresolved"]}
