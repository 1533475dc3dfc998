"""Footage at scale: the adaptation input pipeline over a long video and over a folder of videos, its
peak resident memory against the number of frames read, and its frames per second.

Builds, under ``--work`` (never in the repository), ``--videos`` videos of ``--frames-per-video`` frames made by
cycling the dash-cam clip (OpenCV ``mp4v``; ``--scale`` of its 960x540 size), and one long video holding all of
them back to back (their packets remuxed by PyAV, nothing re-encoded): by default 20 videos x 520 frames and a
10,400-frame video. Then, for each source (``long``, ``folder``) and each of ``--lengths`` (frames read), a fresh
Python process builds the adaptation input pipeline as ``segadapt adapt`` does
(:class:`~segadapt.adapt.data.footage.VideoFootage` at ``--size`` with the training transform, batches from
:func:`~segadapt.adapt.data.sampling.resumable_loader`: shuffled, ``--num-workers`` DataLoader workers) and reads
that many frames. Reported per run: seconds to build the index, frames/s of reading (the input pipeline alone, no
model), decoded frames and seeks, and the peak resident memory (``VmHWM`` of /proc/<pid>/status) of the main
process and of each worker (read before the workers stop). ``flat`` says, per source, whether the peak of the main
process and of the largest worker each stay within 10 % over the lengths. One more run reads ``--lengths[0]``
frames in order from the long video (the order of the AdaBN pass: decoding forward, no seeking).

    python benchmarks/footage_scale.py --work /tmp/footage_work --json runs/footage_scale.json

Timings depend on the machine and on what else runs on it; the memory figures much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from segadapt.runtime.files import write_json

CLIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video" / "solidWhiteRight.mp4"


def _peak_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process in MB (Linux); 0.0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_videos(clip: Path, folder: Path, count: int, frames: int, scale: float) -> List[Path]:
    """``count`` mp4v videos of ``frames`` frames each, cycling through ``clip`` (resized by ``scale``), the frames
    continuing from one video to the next. Existing complete files are kept."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"drive_{i:03d}.mp4" for i in range(count)]
    cap = cv2.VideoCapture(str(clip))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    w0, h0 = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    size = (2 * round(w0 * scale / 2), 2 * round(h0 * scale / 2))
    for p in paths:
        if p.is_file() and int(cv2.VideoCapture(str(p)).get(cv2.CAP_PROP_FRAME_COUNT)) == frames:
            continue
        tmp = p.with_name(f".{p.stem}.tmp.mp4")
        out = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        for _ in range(frames):
            ok, bgr = cap.read()
            if not ok:  # the end of the clip: start it again
                cap.release()
                cap = cv2.VideoCapture(str(clip))
                ok, bgr = cap.read()
            out.write(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA) if size != (w0, h0) else bgr)
        out.release()
        os.replace(tmp, p)
    cap.release()
    return paths


def concatenate(parts: List[Path], out: Path) -> Path:
    """One video holding ``parts`` back to back: their packets, timestamps shifted, remuxed (nothing decoded)."""
    import av

    if out.is_file():
        return out
    tmp = out.with_name(f".{out.stem}.tmp.mp4")
    with av.open(str(tmp), "w") as o:
        ostream, offset = None, 0
        for part in parts:
            with av.open(str(part)) as i:
                s = i.streams.video[0]
                ostream = ostream or o.add_stream_from_template(s)
                end = offset
                for pkt in i.demux(s):
                    if pkt.dts is None:
                        continue
                    pkt.pts, pkt.dts = pkt.pts + offset, pkt.dts + offset
                    end = max(end, pkt.pts + (pkt.duration or 1))
                    pkt.stream = ostream
                    o.mux(pkt)
                offset = end
    os.replace(tmp, out)
    return out


def run_once(source: str, frames: int, a: argparse.Namespace, ordered: bool = False) -> Dict:
    """Read ``frames`` frames through the adaptation input pipeline in this process; the measurements."""
    import torch
    from torch.utils.data import DataLoader

    from segadapt.adapt.data.datasets import collate
    from segadapt.adapt.data.footage import VideoFootage
    from segadapt.adapt.data.sampling import resumable_loader
    from segadapt.adapt.data.transforms import Resize, train_transform

    torch.set_num_threads(1)
    size = tuple(a.size)
    t0 = time.perf_counter()
    if ordered:  # the AdaBN pass: resized frames in order, in the main process
        ds = VideoFootage(source, stride=a.stride, size=size, transform=Resize(size))
        loader = DataLoader(ds, batch_size=a.batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    else:
        ds = VideoFootage(source, stride=a.stride, size=size, transform=train_transform(size, size, (0.75, 1.25), 255))
        loader = resumable_loader(ds, a.batch_size, seed=0, num_workers=a.num_workers, collate_fn=collate)
    t_index = time.perf_counter() - t0
    it = iter(loader)
    read, t1 = 0, time.perf_counter()
    while read < frames:
        batch = next(it)
        read += len(batch["name"])
    seconds = time.perf_counter() - t1
    workers = [_peak_mb(w.pid) for w in getattr(it, "_workers", [])]
    del it
    return {"source": Path(source).name, "order": "sequential" if ordered else "shuffled", "frames_read": read,
            "dataset_frames": len(ds), "index_s": round(t_index, 3), "seconds": round(seconds, 2),
            "frames_per_s": round(read / seconds, 1), "main_peak_mb": round(_peak_mb(), 1),
            "worker_peak_mb": [round(w, 1) for w in workers], "decoded_main": ds.stats["decoded"],
            "seeks_main": ds.stats["seeks"]}


def _child(source: str, frames: int, a: argparse.Namespace, ordered: bool) -> Dict:
    """:func:`run_once` in a fresh Python process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--work", a.work, "--_run", source, str(frames), "--size", *map(str, a.size),
           "--batch-size", str(a.batch_size), "--num-workers", str(a.num_workers), "--stride", str(a.stride)]
    if ordered:
        cmd.append("--_ordered")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flat(rows: List[Dict]) -> Dict:
    """Whether the main and the largest worker peaks stay within 10 % over the lengths (spread = (max-min)/min)."""
    res = {}
    for key, vals in (("main", [r["main_peak_mb"] for r in rows]),
                      ("worker", [max(r["worker_peak_mb"] or [0.0]) for r in rows])):
        if min(vals) > 0:
            spread = (max(vals) - min(vals)) / min(vals)
            res[f"{key}_spread"] = round(spread, 4)
            res[f"{key}_flat"] = spread <= 0.10
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the built videos (outside the repository)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--clip", default=str(CLIP), help="the dash-cam clip to cycle through")
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--frames-per-video", type=int, default=520)
    ap.add_argument("--scale", type=float, default=0.5, help="built videos' size relative to the clip's 960x540")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 10000], help="frames read per run")
    ap.add_argument("--size", type=int, nargs=2, default=[180, 320], help="H W training size")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_ordered", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._run:
        print(json.dumps(run_once(a._run[0], int(a._run[1]), a, a._ordered)))
        return 0
    work = Path(a.work)
    repo = Path(__file__).resolve().parents[1]
    if work.resolve().is_relative_to(repo):
        ap.error(f"--work {work} is inside the repository; give a folder elsewhere")
    t0 = time.perf_counter()
    parts = write_videos(Path(a.clip), work / "folder", a.videos, a.frames_per_video, a.scale)
    long_video = concatenate(parts, work / "long.mp4")
    build_s = time.perf_counter() - t0
    print(f"built {len(parts)} videos and {long_video} in {build_s:.0f} s", flush=True)
    result = {"build_s": round(build_s, 1), "videos": len(parts), "frames_per_video": a.frames_per_video,
              "scale": a.scale, "size": a.size, "batch_size": a.batch_size, "num_workers": a.num_workers,
              "stride": a.stride, "runs": [], "flat": {}}
    for name, src in (("long", long_video), ("folder", work / "folder")):
        rows = []
        for n in a.lengths:
            rows.append(_child(str(src), n, a, ordered=False))
            print(json.dumps(rows[-1]), flush=True)
        result["runs"] += rows
        result["flat"][name] = _flat(rows)
    result["runs"].append(_child(str(long_video), a.lengths[0], a, ordered=True))
    print(json.dumps(result["runs"][-1]), flush=True)
    print(json.dumps(result["flat"]))
    if a.json:
        write_json(a.json, result, what="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
