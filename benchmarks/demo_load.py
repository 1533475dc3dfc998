"""Load test of the demo: N concurrent gradio_client clients against ``segadapt demo`` on 127.0.0.1 for a bounded time.

The server runs as its own process (``python -m segadapt demo``, with its queue and concurrency settings), so its
peak memory (``VmHWM`` of /proc/<pid>/status: the largest resident set it ever had) is the server's alone. Every
client loops for ``--seconds``: mostly image requests, every ``--video-every``-th one a clip when ``--video`` is
given (spread over the clients). Reported: requests sent, answered, the errors (a refusal such as "queue full" or
any failure, with its message), latency p50/p95/max, whether the server is still alive, its peak and final resident
memory.

    python benchmarks/demo_load.py --model runs/pipeline/export/model.onnx \
        --image $DATA/camvid-day2dusk/target_adapt/images/0001TP_006690.png \
        --video $DATA/video/solidWhiteRight.mp4 --clients 8 --seconds 60 --json runs/demo_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from segadapt.runtime.files import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb(pid: int) -> Dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, MB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, kb = line.split(":")
            out["peak_rss_mb" if key == "VmHWM" else "rss_mb"] = int(kb.split()[0]) / 1024
    return out


def start_server(model: str, port: int, log: Path, concurrency: int = 1, queue_size: int = 32,
                 extra: Optional[list] = None, timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``segadapt demo`` on 127.0.0.1:port, its output going to the file ``log`` (a pipe nobody reads would
    fill and stall the server), and wait until it answers (or raise RuntimeError with the log's end)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "segadapt", "-q", "demo", "--model", model, "--host", "127.0.0.1", "--port",
           str(port), "--concurrency", str(concurrency), "--queue-size", str(queue_size), *(extra or [])]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the demo did not answer within {timeout_s:.0f} s")


def _client_loop(k: int, url: str, image: str, video: str, video_every: int, deadline: float,
                 rec: List[dict]) -> None:
    """Client ``k``: requests until ``deadline``; request i is a clip when (i + k) % video_every == 0 (so the clips
    are spread over the clients, client 0 starting with one)."""
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False)
    i = 0
    while time.time() < deadline:
        kind = "video" if video and video_every and (i + k) % video_every == 0 else "image"
        t = time.perf_counter()
        try:
            if kind == "video":
                c.predict(handle_file(video), 0.5, api_name="/segment_video")
            else:
                c.predict(handle_file(image), 0.5, api_name="/segment_image")
            rec.append({"kind": kind, "ok": True, "s": time.perf_counter() - t})
        except Exception as e:  # an answer with an error message (queue full, a refused upload) or a failure
            rec.append({"kind": kind, "ok": False, "s": time.perf_counter() - t, "error": str(e)[:200]})
        i += 1


def run_load(model: str, image: str, video: str = "", clients: int = 8, seconds: float = 30.0,
             video_every: int = 8, concurrency: int = 1, queue_size: int = 32) -> dict:
    """Serve ``model``, run ``clients`` looping clients for ``seconds``, stop the server; returns the summary."""
    import tempfile

    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="segadapt-demo-load-")) / "server.log"
    proc = start_server(model, port, log, concurrency, queue_size)
    url = f"http://127.0.0.1:{port}/"
    rec: List[dict] = []
    try:
        mem0 = _mem_mb(proc.pid)
        deadline = time.time() + seconds
        threads = [threading.Thread(target=_client_loop, args=(k, url, image, video, video_every, deadline, rec))
                   for k in range(clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 600)  # a request sent before the deadline is waited for
        wall = time.time() - t0
        alive = proc.poll() is None
        mem = _mem_mb(proc.pid) if alive else {}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(r["s"] for r in rec if r["ok"])
    errors: Dict[str, int] = {}
    for r in rec:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    return {"clients": clients, "seconds": round(wall, 1), "concurrency": concurrency, "queue_size": queue_size,
            "requests": len(rec), "answered": sum(r["ok"] for r in rec),
            "videos": sum(r["kind"] == "video" and r["ok"] for r in rec), "errors": errors,
            "latency_s": {"p50": pct(0.5), "p95": pct(0.95), "max": lat[-1] if lat else None},
            "server_alive": alive, "server_rss_mb_at_start": round(mem0.get("rss_mb", 0), 1),
            "server_peak_rss_mb": round(mem.get("peak_rss_mb", 0), 1), "server_rss_mb_at_end": round(
                mem.get("rss_mb", 0), 1), "threads_finished": all(not t.is_alive() for t in threads),
            "server_log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model (.onnx with metadata)")
    ap.add_argument("--image", required=True, help="image file the clients send")
    ap.add_argument("--video", default="", help="clip the clients send every --video-every requests")
    ap.add_argument("--video-every", type=int, default=8, help="every N-th request is a clip (default: 8)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the clients keep sending (default: 60)")
    ap.add_argument("--concurrency", type=int, default=1, help="the demo's --concurrency (default: 1)")
    ap.add_argument("--queue-size", type=int, default=32, help="the demo's --queue-size (default: 32)")
    ap.add_argument("--json", default="", help="also write the summary here")
    a = ap.parse_args()
    rep = run_load(a.model, a.image, a.video, a.clients, a.seconds, a.video_every, a.concurrency, a.queue_size)
    print(json.dumps(rep, indent=1))
    if a.json:
        write_json(a.json, rep, what="report")


if __name__ == "__main__":
    main()
