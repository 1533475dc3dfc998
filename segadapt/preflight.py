"""Preflight: every command's inputs and outputs checked before any model loads or any work starts.

One function per command (``train_source``, ``adapt``, ``evaluate``, ``export``, ``predict``, ``bench``, ``demo``,
``pipeline``, ``data``), each given the resolved config (or the parsed options) and built from the checks beside the
data they check: :mod:`segadapt.runtime.inputs` (images, videos, exported models, output paths, disk space; no torch)
and :mod:`segadapt.data_checks` (class files, labelled splits, checkpoints, depth; no torch). A problem is one
:class:`~segadapt.runtime.inputs.InputError` line naming the file or flag; the command line prints it and exits 2.
Warnings (a renamed class) are logged and the run goes on.

Nothing here loads a model, imports torch or writes a file (writability is probed with a temporary file that is
removed at once). Numbers are checked by the configs' types (:mod:`segadapt.adapt.typed_config`) as they are parsed;
what needs a file to check (a size below the model's stride) is checked here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from segadapt.data_checks import (check_checkpoint, check_class_file, check_depth_inputs, check_labelled_split,
                                  check_size_vs_stride, find_class_file)
from segadapt.runtime.files import IMAGE_SUFFIXES
from segadapt.runtime.inputs import (InputError, check_free_space, check_model_file, check_output_dir,
                                     check_output_file, check_video, compare_classes, folder_images, image_sizes,
                                     is_video_path)

__all__ = ["InputError", "adapt", "bench", "data", "demo", "evaluate", "export", "pipeline", "predict",
           "train_source"]


def _required(flag: str, value, what: str) -> None:
    if not value:
        raise InputError(f"{flag} is required ({what})")


def _class_file_for(folder: Path, flag: str):
    cf = find_class_file(folder)
    if cf is None:
        raise InputError(f"{folder}: no classes.json in it or its parents ({flag})")
    return check_class_file(cf, flag)


def data(ns: argparse.Namespace) -> None:
    """``segadapt data``: the output folder."""
    check_output_dir(ns.out, "--out")


def train_source(cfg) -> None:
    """``segadapt train-source``: the cheap checks first (paths, a pretrained checkpoint, sizes against the stride,
    the run folder), then both splits against the class file, every frame and label."""
    root = Path(cfg.data)
    if not root.is_dir():
        raise InputError(f"{root}: no such data folder (--data)")
    train_dir, val_dir = root / cfg.train_split, root / cfg.val_split
    if not train_dir.is_dir():
        raise InputError(f"{train_dir}: no such split folder (--train-split)")
    if cfg.val_split and not val_dir.is_dir():
        raise InputError(f"{val_dir}: no such split folder (--val-split; empty = no validation)")
    classes = _class_file_for(train_dir, "--data")
    mc = cfg.model
    stride = 32 if mc.arch == "segformer" else int(mc.output_stride)
    weights = 0
    if mc.pretrained:
        info = check_checkpoint(mc.pretrained, "--model.pretrained")
        if info.kind == "segadapt":
            compare_classes(info.classes.names, mc.pretrained, classes.names, str(find_class_file(train_dir)),
                            "--model.pretrained")
            stride = info.stride
        weights = info.weights_bytes
    check_size_vs_stride(cfg.size, stride, "--size")
    check_size_vs_stride(cfg.crop, stride, "--crop")
    check_output_dir(cfg.out, "--out")
    if weights:  # last/ (weights + AdamW's two moments) and best/
        check_free_space(cfg.out, 4 * weights, "--out", "the checkpoints")
    check_labelled_split(train_dir, classes, "--train-split")
    if cfg.val_split:
        check_labelled_split(val_dir, classes, "--val-split")


def _target_videos(target) -> list:
    """The video files of a video target: the file, or the videos of a folder that holds no image; [] otherwise."""
    p = Path(target)
    if is_video_path(p):
        return [p]
    img_dir = p / "images" if (p / "images").is_dir() else p
    if not p.is_dir() or any(f.suffix.lower() in IMAGE_SUFFIXES for f in img_dir.iterdir()):
        return []
    return sorted(f for f in p.iterdir() if f.is_file() and is_video_path(f))


def _target_frames(cfg):
    """(image files, is_video) of an adaptation target, checked (a video's frames are read over its whole length,
    so every frame its container lists must be there)."""
    videos = _target_videos(cfg.target)
    for v in videos:
        check_video(v, "--target")
    if videos:
        if getattr(cfg, "video_cache", ""):
            check_output_dir(cfg.video_cache, "--video-cache")
        return [], True
    files = folder_images(cfg.target, "--target", "target folder")
    image_sizes(files, "--target")
    return files, False


def adapt(cfg) -> None:
    """``segadapt adapt``: the source checkpoint, sizes against its stride, the run folder and its free space, then
    the target frames (decoded, or a video's container) and depth for every frame; with ``--source-data`` (UDA
    mode) every source frame and label against the checkpoint's classes."""
    _required("--checkpoint", cfg.checkpoint, "the source model")
    _required("--target", cfg.target, "the unlabelled target footage, a folder or a video")
    info = check_checkpoint(cfg.checkpoint, "--checkpoint")
    check_size_vs_stride(cfg.size, info.stride, "--size")
    check_size_vs_stride(cfg.crop, info.stride, "--crop")
    check_output_dir(cfg.out, "--out")
    # last/ holds student, EMA teacher, anchor and AdamW's two moments; adapted/ one more copy
    check_free_space(cfg.out, 6 * info.weights_bytes, "--out", "the checkpoints")
    frames, video = _target_frames(cfg)
    check_depth_inputs(cfg.depth, frames, video)
    if getattr(cfg, "source_data", ""):  # UDA mode: the labelled source split against the checkpoint's classes
        src = Path(cfg.source_data)
        split = _class_file_for(src, "--source-data") if find_class_file(src) is not None else None
        if split is not None and info.classes is not None:  # the split's own class file must name the same classes
            where = str(find_class_file(src))
            if len(split.names) != len(info.classes.names):
                compare_classes(info.classes.names, str(cfg.checkpoint), split.names, where, "--source-data")
            if list(split.names) != list(info.classes.names):  # training on them would teach the wrong classes
                raise InputError(f"{where}: its class names {list(split.names)} differ from the checkpoint's "
                                 f"{list(info.classes.names)} (--source-data: source labels must use the "
                                 "checkpoint's class ids)")
        check_labelled_split(cfg.source_data, info.classes or split or _class_file_for(src, "--source-data"),
                             "--source-data")


def evaluate(ns: argparse.Namespace) -> None:
    """``segadapt evaluate``: checkpoint, the split's class file against the checkpoint's, every label, outputs."""
    from segadapt.adapt.config import check_device

    info = check_checkpoint(ns.checkpoint, "--checkpoint")
    check_device(ns.device)
    if ns.size:
        check_size_vs_stride(ns.size, info.stride, "--size")
    data_dir = Path(ns.data)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such split folder (--data)")
    classes = _class_file_for(data_dir, "--data")
    if getattr(ns, "size", None) and getattr(ns, "keep_aspect", 0):
        raise InputError("--size and --keep-aspect exclude each other; give one")
    if getattr(ns, "map", ""):  # labels of another class set: the map must fit both (segadapt.adapt.class_map)
        from segadapt.adapt.class_map import evaluation_mapping, load_class_map

        cmap = load_class_map(ns.map)
        if info.classes is not None:
            evaluation_mapping(cmap, info.classes, classes)
    elif info.classes is not None:
        compare_classes(classes.names, str(find_class_file(data_dir)), info.classes.names, str(ns.checkpoint),
                        "--data; --map scores labels of another class set")
    if ns.overlays:
        check_output_dir(ns.overlays, "--overlays")
    if ns.json:
        check_output_file(ns.json, "--json")
    check_labelled_split(data_dir, classes, "--data")


def export(cfg) -> None:
    """``segadapt export``: checkpoint, sizes against the stride, calibration and parity frames, the output folder
    and its free space (about the weights' size per graph, twice that while quantising)."""
    from segadapt.adapt.config import default_camvid_dir

    _required("--checkpoint", cfg.checkpoint, "the checkpoint to export")
    info = check_checkpoint(cfg.checkpoint, "--checkpoint")
    check_size_vs_stride(cfg.imgsz, info.stride, "--imgsz")
    if cfg.dynamic:
        check_size_vs_stride(cfg.min_size, info.stride, "--min-size")
    ck = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else ck.with_name(ck.name + "-export")
    check_output_dir(out, "--out")
    need = info.weights_bytes * (1 + 0.5 * cfg.half + 2.25 * cfg.int8 + (cfg.format != "onnx"))
    check_free_space(out, need, "--out", "the exported graphs")
    calib = _frames_or_video(cfg.calib, "--calib", "calibration folder") if cfg.int8 and cfg.calib else []
    parity = cfg.parity_data or cfg.calib
    flag = "--parity-data" if cfg.parity_data else "--calib" if cfg.calib else ""
    if not parity:
        parity = str(Path(default_camvid_dir()) / "tiny" / "target")
        flag = "--parity-data (default: CamVid tiny target; give a folder of your frames or a video)"
    parity_files = _frames_or_video(parity, flag, "parity frame folder")
    image_sizes(calib, "--calib")
    image_sizes(parity_files, flag)


def _frames_or_video(path: str, flag: str, what: str) -> list:
    """The image files of a frame folder, or [] for a video file that opens and holds frames (checked here)."""
    if is_video_path(path) and Path(path).is_file():
        check_video(path, flag)
        return []
    return folder_images(path, flag, what)


def _check_predict_size(meta, size, flag: str, model: str) -> None:
    if not size:
        return
    size = tuple(size)
    if not meta.dynamic and size != tuple(meta.input_size):
        raise InputError(f"{model}: static graph takes {meta.input_size[0]} {meta.input_size[1]}, not {size[0]} "
                         f"{size[1]} ({flag}; export with --dynamic for other sizes)")
    if meta.dynamic and not (meta.min_size[0] <= size[0] <= meta.max_size[0]
                             and meta.min_size[1] <= size[1] <= meta.max_size[1]):
        raise InputError(f"{flag} {size[0]} {size[1]} is outside the graph's range {meta.min_size[0]} "
                         f"{meta.min_size[1]} .. {meta.max_size[0]} {meta.max_size[1]} ({model})")


def predict(ns: argparse.Namespace) -> None:
    """``segadapt predict``: the source exists, the model and its metadata, ``--size`` against the graph, the output
    folder; then every image decodes (a video holds the frames its container lists) and the free space."""
    src = ns.source
    p = Path(src)
    if not src.isdigit() and not p.exists():
        raise InputError(f"{src}: no such image, folder, video or camera index (--source)")
    meta = check_model_file(ns.model, "--model")
    _check_predict_size(meta, ns.size, "--size", ns.model)
    check_output_dir(ns.out, "--out")
    if src.isdigit():
        return
    if is_video_path(p):
        check_video(p, "--source", max_frames=ns.max_frames)
        est = 3 * p.stat().st_size  # x264 "ultrafast" overlays are larger than the source
    else:
        files = [p] if p.is_file() else folder_images(p, "--source")
        image_sizes(files, "--source")
        est = sum(2 * f.stat().st_size for f in files)
    check_free_space(ns.out, est, "--out", "the overlays")


def bench(ns: argparse.Namespace) -> None:
    """``segadapt bench``: checkpoint, frames, video, sizes, the work folder, the JSON file."""
    info = check_checkpoint(ns.checkpoint, "--checkpoint")
    if ns.size:
        check_size_vs_stride(ns.size, info.stride, "--size")
    image_sizes(folder_images(ns.frames, "--frames", "frame folder"), "--frames")
    if ns.video:
        check_video(ns.video, "--video")
    work = Path(ns.work_dir) if ns.work_dir else Path(str(ns.checkpoint).rstrip("/\\") + "-bench")
    check_output_dir(work, "--work-dir")
    check_free_space(work, 4 * info.weights_bytes, "--work-dir", "the exported graphs")
    if ns.json:
        check_output_file(ns.json, "--json")


def demo(ns: argparse.Namespace) -> None:
    """``segadapt demo``: the model(s) and their metadata (a reference with another class count is an error), the
    examples folder, the Adapt tab's checkpoint, the port."""
    meta = check_model_file(ns.model, "--model")
    if ns.reference:
        ref = check_model_file(ns.reference, "--reference")
        compare_classes(ref.classes, ns.reference, meta.classes, ns.model, "--reference")
    if ns.examples:
        image_sizes(folder_images(ns.examples, "--examples", "examples folder"), "--examples")
    if getattr(ns, "checkpoint", None):  # the Adapt tab's starting point, when given
        check_checkpoint(ns.checkpoint, "--checkpoint")
    if ns.port is not None and ns.port > 65535:
        raise InputError(f"--port {ns.port}: ports go up to 65535")


def _pipeline_state(out: Path) -> dict:
    from segadapt.runtime.files import read_json_object

    sp = out / "state.json"
    if not sp.exists():
        return {"done": {}}
    try:
        st = read_json_object(sp, "pipeline state")
    except ValueError as e:
        raise InputError(f"{e} (delete it to start the run over)") from None
    if not isinstance(st.get("done", {}), dict):
        raise InputError(f"{sp}: 'done' is not a mapping (delete the file to start the run over)")
    st.setdefault("done", {})
    return st


def pipeline(cfg) -> None:
    """``segadapt pipeline``: what the remaining steps read (the source splits and class file, a given source
    checkpoint, the target frames, the clip), sizes against the stride, the run folder."""
    from segadapt.pipeline import check_inputs, default_video

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file, an output folder is needed (--out)")
    state = _pipeline_state(out)
    check_inputs(cfg, state)  # what is missing, all of it in one line
    done = state["done"]
    data_dir = Path(cfg.data)
    target = data_dir / cfg.target_split
    if "train_source" not in done and cfg.source_checkpoint:
        check_checkpoint(cfg.source_checkpoint, "--source-checkpoint")
    train = "train_source" not in done and not cfg.source_checkpoint
    # training reads source_train and source_val; the evaluate step every split with labels (the target's too)
    splits = (["source_train"] if train else []) + [s for s in ("source_val", cfg.target_split)
                                                      if (train or "evaluate" not in done)
                                                      and (data_dir / s / "labels").is_dir()]
    if train and "source_val" not in splits:
        splits.append("source_val")
    for split in splits:
        flag = "--target-split" if split == cfg.target_split else "--data"
        check_labelled_split(data_dir / split, _class_file_for(data_dir / split, flag), flag)
    if target.is_dir() and not {"adapt", "export"} <= set(done):
        image_sizes(folder_images(target, "--target-split", "target split"), "--target-split")
    clip: Optional[Path] = Path(cfg.video) if cfg.video else default_video()
    if "video" not in done and clip is not None and clip.is_file():
        check_video(clip, "--video" if cfg.video else "--video (default clip)", max_frames=cfg.video_max_frames)
    check_size_vs_stride(cfg.size, 32, "--size")
    check_output_dir(out, "--out")

