"""Exact resume and writers that lose nothing (issue #18).

- a seeded tiny ``segadapt adapt`` killed with SIGKILL after a checkpoint and resumed ends bit-identical (every tensor
  of ``last/`` and ``adapted/``: weights, EMA teacher, anchor, rectifier, optimiser, thresholds, class statistics,
  RNG states) to the uninterrupted run; a kill inside the checkpoint swap resumes from ``last.prev``;
- the same for ``train-source`` (crash injected in-process after a checkpoint);
- ``--resume`` with nothing to resume is one line, exit 2; ``--resume auto`` says "starting fresh";
- a full disk (injected ENOSPC, and a real tmpfs where mounting is allowed) and a read-only folder: one line naming
  the path and the space needed, the previous artefact intact, no temporary files left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "tests")}
STEPS = 5


def adapt_args(ckpt: Path, target: Path, out: Path, *extra: str):
    """A seeded tiny adaptation with every state-holding component on: EMA teacher, anchor, rectifier (and its
    optimiser group), class-balanced thresholds, class-frequency weights, ClassMix, photometric views, and a
    DataLoader worker process (its prefetching must not change the batches)."""
    return ["adapt", "--checkpoint", str(ckpt), "--target", str(target), "--out", str(out), "--size", "48", "64",
            "--steps", str(STEPS), "--batch-size", "2", "--save-every", "2", "--log-every", "1", "--debug-every", "0",
            "--num-workers", "1", "--seed", "7", "--device", "cpu", "--rectifier.warmup-steps", "1",
            "--rectifier.inr", "true", "--rectifier.hidden", "16", "--rectifier.latent-dim", "8", *extra]


def start(args, wrapper: str = "") -> subprocess.Popen:
    code = wrapper + "\nimport sys\nfrom segadapt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def tensors(obj, prefix: str = ""):
    """Every tensor in a nested state (dicts, lists), by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def assert_same_checkpoints(a: Path, b: Path, folders=("last", "adapted")) -> int:
    """Every tensor of the checkpoints in run folders ``a`` and ``b`` is equal (torch.equal); returns the count."""
    from safetensors.torch import load_file

    n = 0
    for sub in folders:
        wa, wb = load_file(str(a / sub / "model.safetensors")), load_file(str(b / sub / "model.safetensors"))
        assert wa.keys() == wb.keys()
        bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not bad, f"{sub}: {len(bad)} of {len(wa)} weight tensors differ, e.g. {bad[:3]}"
        n += len(wa)
        if (a / sub / "training_state.pt").is_file():
            sa = torch.load(a / sub / "training_state.pt", weights_only=True)
            sb = torch.load(b / sub / "training_state.pt", weights_only=True)
            ta, tb = dict(tensors(sa)), dict(tensors(sb))
            assert ta.keys() == tb.keys()
            bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
            assert not bad, f"{sub}/training_state: {len(bad)} of {len(ta)} tensors differ, e.g. {bad[:3]}"
            plain = {k for k, v in sa.items() if not isinstance(v, (dict, list)) and not torch.is_tensor(v)}
            assert {k: sa[k] for k in plain - {"elapsed"}} == {k: sb[k] for k in plain - {"elapsed"}}
            n += len(ta)
    return n


def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def leftovers(d: Path) -> list:
    """Temporary files or folders a writer left in ``d`` (recursively)."""
    return [str(p) for p in d.rglob("*") if ".tmp" in p.name or p.name.endswith(".prev")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint, tiny):
    """The uninterrupted reference adaptation, started at once in the background (it runs while a test kills
    another one); ``runs["ref"]()`` waits for it and returns its folder."""
    root = tmp_path_factory.mktemp("resume")
    ref = root / "ref"
    p = start(adapt_args(tiny_checkpoint, tiny / "target", ref))

    def wait() -> Path:
        if p.returncode is None:
            rc, log = finish(p)
            assert rc == 0, log
        return ref

    yield {"ref": wait, "root": root, "ckpt": tiny_checkpoint, "target": tiny / "target"}
    if p.returncode is None:
        p.kill()


def test_adapt_killed_after_a_checkpoint_resumes_bit_identically(runs):
    out = runs["root"] / "killed"
    p = start(adapt_args(runs["ckpt"], runs["target"], out))
    t0 = time.time()
    while not (out / "last" / "manifest.json").is_file():  # the first complete checkpoint (step 2)
        assert p.poll() is None, finish(p)[1]
        assert time.time() - t0 < 300, "no checkpoint written"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    rc, _ = finish(p)
    assert rc == -signal.SIGKILL and not (out / "summary.json").exists()
    step = torch.load(out / "last" / "training_state.pt", weights_only=True)["step"]
    assert step < STEPS
    rc, log = finish(start(adapt_args(runs["ckpt"], runs["target"], out, "--resume")))
    assert rc == 0, log
    assert f"resuming from {out / 'last'} at step {step}" in log
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    n = assert_same_checkpoints(runs["ref"](), out)
    assert n > 1000  # weights, teacher, anchor, rectifier, optimiser moments, RNG states...
    # the coverage log holds each step once, as the uninterrupted run's does
    steps = [json.loads(line)["step"] for line in (out / "coverage.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert leftovers(out) == []


KILL_IN_SWAP = """
import os, signal
from pathlib import Path
import segadapt.runtime.files as files
seen = []
def hook(stage, path):
    if stage == "prev" and Path(path).name == "last":
        seen.append(path)
        if len(seen) == 1:  # the second save of last/ (step 4): step 2's is now last.prev, step 4's not yet in
            os.kill(os.getpid(), signal.SIGKILL)
files._swap_hook = hook
"""


def test_kill_inside_the_checkpoint_swap_resumes_from_the_previous_checkpoint(runs):
    out = runs["root"] / "swap"
    rc, _ = finish(start(adapt_args(runs["ckpt"], runs["target"], out), wrapper=KILL_IN_SWAP))
    assert rc == -signal.SIGKILL
    # killed between the renames: no last/, the previous complete checkpoint as last.prev, the new one as last.tmp
    assert not (out / "last").exists() and (out / "last.prev" / "manifest.json").is_file()
    from segadapt.adapt.models.checkpoint import resumable_checkpoint

    assert resumable_checkpoint(out / "last") == out / "last.prev"
    rc, log = finish(start(adapt_args(runs["ckpt"], runs["target"], out, "--resume")))
    assert rc == 0, log
    assert f"resuming from the previous complete checkpoint {out / 'last.prev'}" in log
    assert f"resuming from {out / 'last.prev'} at step 2" in log
    assert_same_checkpoints(runs["ref"](), out)
    assert leftovers(out) == []  # last.prev and last.tmp are gone after the next save


def test_resume_with_nothing_to_resume(runs, capsys):
    from segadapt.cli import main

    out = runs["root"] / "nothing"
    args = adapt_args(runs["ckpt"], runs["target"], out, "--resume")
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --resume: nothing to resume in {out}") and "--resume auto" in err
    assert not (out / "last").exists()  # refused before any work
    # a half-written last/ (no manifest, a .tmp name) is not something to resume either
    (out / "last.tmp").mkdir(parents=True)
    assert main(args) == 2
    capsys.readouterr()
    a = adapt_args(runs["ckpt"], runs["target"], out, "--resume", "auto", "--steps", "1", "--save-every", "1",
                   "--num-workers", "0", "--rectifier.enabled", "false")
    assert main(a) == 0
    said = capsys.readouterr()
    assert f"--resume auto: no complete checkpoint in {out / 'last'}; starting fresh" in said.out + said.err
    assert (out / "last" / "manifest.json").is_file() and not (out / "last.tmp").exists()


def test_a_corrupt_manifest_is_named(runs, capsys):
    """A checkpoint whose manifest.json does not parse: --resume names the manifest; evaluate refuses the
    checkpoint naming it (it would otherwise be read as if complete)."""
    from segadapt.cli import main

    out = runs["root"] / "corrupt"
    a = adapt_args(runs["ckpt"], runs["target"], out, "--steps", "1", "--save-every", "1", "--num-workers", "0",
                   "--rectifier.enabled", "false")
    assert main(a) == 0
    for d in ("last", "adapted"):
        (out / d / "manifest.json").write_text("{not json")
    capsys.readouterr()
    assert main(a + ["--resume", "true"]) == 2
    err = capsys.readouterr().err
    assert str(out / "last" / "manifest.json") in err and "corrupt" in err and err.count("\n") == 1, err
    assert main(["evaluate", "--checkpoint", str(out / "adapted"), "--data", str(runs["target"])]) == 2
    err = capsys.readouterr().err
    assert str(out / "adapted" / "manifest.json") in err and "corrupt" in err, err


@pytest.mark.parametrize("extra", [{}, {"rare_class_sampling": True, "rare_class_min_pixels": 16, "loss": "balanced"}],
                         ids=["default", "rare_class_sampling+balanced"])
def test_train_source_crash_after_a_checkpoint_resumes_bit_identically(tiny, tmp_path, monkeypatch, extra):
    """Also with rare-class sampling and the balanced loss: the sampler's draws continue at the step done, with
    the class statistics stored in the run folder."""
    import segadapt.adapt.train_source as ts
    from segadapt.adapt.config import ModelConfig, PhotometricConfig, SourceTrainConfig

    def cfg(out, resume=False):
        return SourceTrainConfig(data=str(tiny), train_split="source", val_split="target", out=str(out),
                                 size=(48, 64), crop=(32, 48), scale=(0.75, 1.25), batch_size=4, steps=5, lr=1e-3,
                                 warmup_steps=2, val_every=4, save_every=2, num_workers=0, seed=5, resume=resume,
                                 device="cpu", photometric=PhotometricConfig(),
                                 model=ModelConfig(arch="deeplabv3-mobilenetv2", variant="0.35", output_stride=16),
                                 **extra)

    ts.train_source(cfg(tmp_path / "ref"), log=lambda *_: None)

    class Killed(BaseException):
        pass

    real = ts.save_checkpoint

    def crash_after_first_last(path, *a, **k):
        real(path, *a, **k)
        if Path(path).name == "last":
            raise Killed

    monkeypatch.setattr(ts, "save_checkpoint", crash_after_first_last)
    with pytest.raises(Killed):
        ts.train_source(cfg(tmp_path / "run"), log=lambda *_: None)
    monkeypatch.setattr(ts, "save_checkpoint", real)
    torch.manual_seed(1234)  # whatever the process did in between must not matter
    msgs = []
    s = ts.train_source(cfg(tmp_path / "run", resume=True), log=msgs.append)
    assert any("at step 2" in m for m in msgs) and s["steps"] == 5
    assert_same_checkpoints(tmp_path / "ref", tmp_path / "run", folders=("last", "best"))
    state = torch.load(tmp_path / "run" / "last" / "training_state.pt", weights_only=True)
    assert (state["data"].get("sampler") == "rare_class") == bool(extra)
    assert (tmp_path / "run" / "class_stats.json").is_file() == bool(extra)
    assert not any("class pixel frequencies" in m for m in msgs)  # the resumed run read the stored statistics
    flipped = cfg(tmp_path / "run", resume=True)  # another data order on resume is refused, naming the checkpoint
    flipped.rare_class_sampling = not flipped.rare_class_sampling
    with pytest.raises(ValueError, match=r"run[/\\]last: this run drew .*resuming with .*data order"):
        ts.train_source(flipped, log=lambda *_: None)


# ---- writers that lose nothing ------------------------------------------------------------------------------------

def _enospc_after(monkeypatch, n_bytes: int):
    """Make the low-level write of our writers fail with ENOSPC once ``n_bytes`` more have been written."""
    import segadapt.runtime.files as files

    left = {"n": n_bytes}
    real = files._write_chunk

    def write(fd, data):
        if left["n"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        k = real(fd, data[:left["n"]])
        left["n"] -= k
        return k

    monkeypatch.setattr(files, "_write_chunk", write)


def _tiny_ckpt(tiny_classes):
    from conftest import tiny_model

    from segadapt.adapt.models.checkpoint import CheckpointMeta

    torch.manual_seed(0)
    return tiny_model("deeplabv3-mobilenetv2"), CheckpointMeta(classes=tiny_classes)


def test_enospc_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_classes, monkeypatch):
    from segadapt.adapt.models.checkpoint import load_training_state, resumable_checkpoint, save_checkpoint
    from segadapt.runtime.files import ArtefactWriteError

    model, meta = _tiny_ckpt(tiny_classes)
    save_checkpoint(tmp_path / "last", model, meta, {"step": 1, "x": torch.ones(1000)})
    before = digests(tmp_path / "last")
    for n in (0, 100_000, 3_000_000):  # before the first byte, inside the weights (2.4 MB), inside the state
        _enospc_after(monkeypatch, n)
        with pytest.raises(ArtefactWriteError) as e:
            save_checkpoint(tmp_path / "last", model, meta, {"step": 2, "x": torch.ones(10**6)})
        msg = str(e.value)
        assert "\n" not in msg and e.value.errno == errno.ENOSPC
        assert msg.startswith(f"checkpoint {tmp_path / 'last'}: no space left on the device (needs about "), msg
        assert "nothing was replaced" in msg
        assert digests(tmp_path / "last") == before and leftovers(tmp_path) == []
    assert resumable_checkpoint(tmp_path / "last") == tmp_path / "last"
    assert load_training_state(tmp_path / "last")["step"] == 1


def test_not_enough_space_is_refused_before_writing(tmp_path, tiny_classes, monkeypatch):
    import segadapt.runtime.files as files
    from segadapt.adapt.models.checkpoint import save_checkpoint

    model, meta = _tiny_ckpt(tiny_classes)
    monkeypatch.setattr(files, "free_bytes", lambda p: 1000)
    with pytest.raises(files.ArtefactWriteError, match=r"not enough space on the device \(needs about .* MiB, "
                                                       r"1000 B free\); nothing was written"):
        save_checkpoint(tmp_path / "c", model, meta)
    assert list(tmp_path.iterdir()) == []


def test_enospc_in_file_writers_keeps_the_previous_file(tmp_path, monkeypatch):
    from segadapt.runtime.files import ArtefactWriteError, atomic_output, write_atomic

    report = tmp_path / "report.json"
    write_atomic(report, b'{"old": 1}')
    _enospc_after(monkeypatch, 3)
    with pytest.raises(ArtefactWriteError, match=f"^{report}: no space left on the device .*nothing was replaced"):
        write_atomic(report, b'{"new": 2}' * 100)
    assert report.read_bytes() == b'{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    # a library writing a temporary path itself (ONNX, OpenCV): EIO is reported the same way
    with pytest.raises(ArtefactWriteError, match="input/output error"):
        with atomic_output(report, what="") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.EIO, "Input/output error")
    assert report.read_bytes() == b'{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_json_creates_the_folder_and_keeps_the_previous_file_on_an_encoding_error(tmp_path):
    from segadapt.runtime.files import write_json

    report = tmp_path / "a" / "b" / "report.json"
    write_json(report, {"miou": 42.8, "seeds": [0, 1, 2]})
    assert json.loads(report.read_text()) == {"miou": 42.8, "seeds": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json(report, {"bad": object()})
    assert json.loads(report.read_text())["miou"] == 42.8
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]  # no temporary file left


def test_adapt_on_a_full_disk_keeps_the_last_checkpoint(runs, monkeypatch, capsys):
    """The disk fills up after the first checkpoint: one line, exit 2, no traceback; last/ (step 1) intact and
    resumable, no temporary folders."""
    import segadapt.runtime.files as files
    from segadapt.cli import main

    out = runs["root"] / "full"
    real_hook = files._swap_hook

    def hook(stage, path):
        real_hook(stage, path)
        if stage == "renamed" and Path(path).name == "last":
            _enospc_after(monkeypatch, 0)  # the disk is full from now on

    monkeypatch.setattr(files, "_swap_hook", hook)
    rc = main(adapt_args(runs["ckpt"], runs["target"], out, "--steps", "3", "--save-every", "1",
                         "--num-workers", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"error: checkpoint {out / 'adapted'}: no space left on the device (needs about "), err
    from segadapt.adapt.models.checkpoint import load_training_state, resumable_checkpoint

    assert resumable_checkpoint(out / "last") == out / "last"
    assert load_training_state(out / "last")["step"] == 1
    assert leftovers(out) == []


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


REAL_DISK = """
import errno, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from conftest import tiny_model
from segadapt.adapt.models.checkpoint import CheckpointMeta, load_training_state, save_checkpoint
from segadapt.runtime.classes import ClassInfo
import segadapt.runtime.files as files

d = Path(sys.argv[1])
classes = ClassInfo.load(sys.argv[2])
torch.manual_seed(0)
m = tiny_model("deeplabv3-mobilenetv2")
meta = CheckpointMeta(classes=classes)
res = {}
save_checkpoint(d / "last", m, meta, {"step": 1})
before = sorted((p.name, p.stat().st_size) for p in (d / "last").iterdir())
big = {"step": 2, "x": torch.ones(2 * 1024 * 1024)}  # 8 MiB: more than the disk holds
def attempt(key):
    try:
        save_checkpoint(d / "last", m, meta, big)
        res[key] = "saved"
    except OSError as e:
        res[key] = str(e)
    res[key + "_intact"] = sorted((p.name, p.stat().st_size) for p in (d / "last").iterdir()) == before
    res[key + "_left"] = sorted(p.name for p in d.iterdir())
attempt("preflight")                      # refused up front: the estimate exceeds the free space
files.check_space = lambda *a, **k: None  # no estimate: the disk really fills up in the middle of the write
attempt("midwrite")
os.system(f"mount -o remount,ro {d}")
attempt("readonly")
res["step"] = load_training_state(d / "last")["step"]
print(json.dumps(res))
"""


@pytest.mark.skipif(not _unshare_ok(), reason="cannot mount a tmpfs in a user namespace here")
def test_real_full_and_read_only_disk(tmp_path, camvid):
    """A 6 MiB tmpfs: a checkpoint fits once; a bigger one is refused before writing, fails cleanly when the disk
    really fills up, and a read-only remount is one line too; the first checkpoint stays intact every time."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    script = tmp_path / "s.py"
    script.write_text(REAL_DISK)
    cmd = (f"mount -t tmpfs -o size=6m tmpfs {mnt} && exec {sys.executable} {script} {mnt} "
           f"{camvid / 'classes.json'}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    last = mnt / "last"
    assert res["preflight"].startswith(f"checkpoint {last}: not enough space on the device (needs about 1"), res
    assert res["midwrite"].startswith(f"checkpoint {last}: no space left on the device (needs about 1"), res
    assert res["readonly"].startswith(f"checkpoint {last}: cannot write there (Read-only file system"), res
    for k in ("preflight", "midwrite", "readonly"):
        assert "\n" not in res[k] and res[k + "_intact"] and res[k + "_left"] == ["last"], (k, res)
    assert res["step"] == 1


def test_video_writer_replaces_a_video_only_when_the_new_one_is_whole(tmp_path, monkeypatch):
    import numpy as np

    from segadapt.runtime import video as video_mod
    from segadapt.runtime.files import ArtefactWriteError

    out = tmp_path / "clip.mp4"
    frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(6)]
    with video_mod.VideoWriter(out, 5.0) as w:
        for f in frames[:3]:
            w.write(f)
        assert not out.exists() and w.tmp.parent == tmp_path and w.tmp.suffix == ".mp4"  # written beside, hidden
    before = out.read_bytes()
    assert len(before) > 0
    real = video_mod.VideoWriter.write

    def write(self, rgb):  # the disk fills up at the 4th frame
        if self.frames >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, rgb)

    monkeypatch.setattr(video_mod.VideoWriter, "write", write)
    with pytest.raises(ArtefactWriteError, match=f"^video {out}: no space left on the device \\(needs about "):
        with video_mod.VideoWriter(out, 5.0) as w:
            for f in frames:
                w.write(f)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    # the one-line form the CLI shows, with the space needed
    w = video_mod.VideoWriter(out, 5.0)
    w.expected_frames = 600
    real(w, frames[0])
    err = w.error(OSError(errno.ENOSPC, "No space left on device"), "unused")
    w.discard()
    assert isinstance(err, ArtefactWriteError) and str(err).startswith(f"video {out}: no space left on the device "
                                                                       "(needs about ")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
