"""`segadapt bench` for both architectures in one run, and its JSON as the tables of docs/results.md.

Measures DeepLabV3-MobileNetV2 and SegFormer-b0 on the same real frames at one input size (default 1x360x480, batch
8 for throughput): PyTorch eager, ONNX Runtime FP32 and INT8 Q/DQ, OpenVINO f32, bf16 (skipped with the reason on
a CPU without bf16) and NNCF INT8, each with latency, throughput, peak memory, class agreement with PyTorch and the
ratio to the model's FLOP floor on this machine (:func:`segadapt.export.bench.run_bench`). Without a SegFormer
checkpoint, a random-initialised SegFormer-b0 is built (seed 0) and the report says so: its speed and memory are
those of the architecture, but its class agreement is not that of a trained model (random logits are close to each
other, so small numeric differences flip classes more often).

Run on a quiet machine (nothing else running; every backend runs in its own process):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_bench.py --dlv3 runs/pipeline/source/best \\
        --frames $DATA/camvid-day2dusk/target_adapt --json runs/bench/cpu_bench.json
Then the tables only, from the JSON:
    python benchmarks/cpu_bench.py --table runs/bench/cpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segadapt.adapt.config import default_camvid_dir
from segadapt.export.bench import format_bench, run_bench
from segadapt.runtime.files import write_atomic


def random_segformer_b0(path: Path, classes_json: Path, size) -> Path:
    """A random-initialised SegFormer-b0 checkpoint at ``path`` (seed 0), classes from ``classes_json``."""
    import torch
    from segadapt.adapt.models.checkpoint import CheckpointMeta, save_checkpoint
    from segadapt.adapt.models.segmenter import build_segmenter
    from segadapt.runtime.classes import ClassInfo

    classes = ClassInfo.load(classes_json)
    torch.manual_seed(0)
    model = build_segmenter("segformer", classes.num_classes, "b0", ignore_index=classes.ignore_index).eval()
    meta = CheckpointMeta(classes=classes, input_size=tuple(size),
                          info={"note": "random initialisation (benchmarks/cpu_bench.py)"})
    return save_checkpoint(path, model, meta)


def tables(both: dict) -> str:
    """The Markdown of each architecture's report (a heading, a note for a random-initialised model, the table)."""
    out = []
    for name, rep in both.items():
        cfg = rep["config"]
        out += [f"### {name} ({cfg['arch']}), 1x{cfg['size'][0]}x{cfg['size'][1]}, batch {cfg['batch']}", ""]
        if rep.get("note"):
            out += [f"Note: {rep['note']}", ""]
        out += [format_bench(rep), ""]
    m = next(iter(both.values()))["machine"]
    out.append("Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dlv3", help="DeepLabV3-MobileNetV2 checkpoint")
    ap.add_argument("--segformer", default="", help="SegFormer-b0 checkpoint (default: a random-initialised one)")
    ap.add_argument("--frames", default=str(Path(default_camvid_dir()) / "target_adapt"))
    ap.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--video", default="", help="a clip: also measure the video pipeline against the backend alone")
    ap.add_argument("--work", default="runs/bench/cpu_bench")
    ap.add_argument("--json", default="runs/bench/cpu_bench.json")
    ap.add_argument("--table", default="", help="only print the tables of this JSON (no measurement)")
    a = ap.parse_args(argv)
    if a.table:
        print(tables(json.loads(Path(a.table).read_text())))
        return 0
    if not a.dlv3:
        ap.error("--dlv3 is required (unless --table)")
    work = Path(a.work)
    seg, note = a.segformer, ""
    if not seg:
        frames = Path(a.frames)
        classes = next((p / "classes.json" for p in (frames, *frames.parents) if (p / "classes.json").is_file()), None)
        if classes is None:
            ap.error(f"{a.frames}: no classes.json beside or above it for the random SegFormer-b0")
        seg = str(random_segformer_b0(work / "segformer_b0_random", classes, a.size))
        note = ("SegFormer-b0 with random weights (no trained checkpoint given): speed and memory are the "
                "architecture's; agreement is not a trained model's")
    both = {}
    for name, ck in (("DeepLabV3-MobileNetV2", a.dlv3), ("SegFormer-b0", seg)):
        rep = run_bench(ck, a.frames, size=a.size, batch=a.batch, iters=a.iters, out_dir=str(work / name),
                        precisions=("fp32", "int8"), video=a.video, log=lambda s: print(s, flush=True))
        if name == "SegFormer-b0" and note:
            rep["note"] = note
        both[name] = rep
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.json, json.dumps(both, indent=1).encode(), what="report")  # after each, in case one fails
    print(tables(both))
    return 0


if __name__ == "__main__":
    sys.exit(main())
