"""What the command line prints: log levels (``--quiet``/``--verbose``), library warnings, progress bars and the
closing lines of the long commands.

- Messages go through :mod:`logging` (logger ``segadapt``) to stderr; results (tables, JSON) go to stdout.
- ``train-source``, ``adapt`` and ``pipeline`` end with a few lines on stdout (:func:`train_source_lines`,
  :func:`adapt_lines`, :func:`pipeline_lines`): where the result is and its headline numbers. The whole result is
  in the run folder's JSON file, and on stdout instead with ``--json``.
- Warnings that a user cannot act on are hidden unless ``--verbose``: every warning raised inside the libraries in
  :data:`NOISY_MODULES` and every DeprecationWarning/FutureWarning; other warnings (segadapt's own) show.
- tqdm progress bars redraw in place on a terminal (at most every 2 s). Where stderr is a file or a pipe (a log), a
  bar becomes one line every ``log_interval`` seconds instead of thousands of carriage-return updates; ``--quiet``
  hides them. This works through tqdm's own ``TQDM_*`` environment defaults, so the training loops need no flags.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings

LOG = logging.getLogger("segadapt")

#: library modules whose warnings and INFO logging are noise for a user of the command line
NOISY_MODULES = ("torch", "onnxscript", "onnx_ir", "transformers", "huggingface_hub", "onnxruntime", "onnxslim",
                 "onnxconverter_common", "timm", "torchvision", "gradio", "httpx", "urllib3")


class _LineStream:
    """A text stream wrapper that turns carriage-return redraws (tqdm on a non-terminal) into whole lines.

    Text after a ``\r`` replaces the line being built (as a terminal shows it): each finished redraw becomes a line,
    and a redraw of only spaces (tqdm clearing its bar) is dropped. Text ending in ``\n`` passes as it is, empty
    lines included; a partial line is written on ``close`` or at exit."""

    def __init__(self, stream):
        self._s = stream
        self._line = ""
        atexit.register(self.close)

    def write(self, text: str) -> int:
        for ch in text:
            if ch == "\n":
                self._s.write(self._line + "\n")
                self._line = ""
            elif ch == "\r":
                if self._line.strip():
                    self._s.write(self._line.rstrip() + "\n")
                self._line = ""
            else:
                self._line += ch
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:  # a partial line waits for its end: a bar's redraw must not split it
        self._s.flush()

    def close(self) -> None:
        """Write a pending partial line (called at exit); the wrapped stream stays open."""
        if self._line.strip():
            self._s.write(self._line + "\n")
        self._line = ""
        try:
            self._s.flush()
        except (OSError, ValueError):  # the stream was closed already at interpreter exit
            pass

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._s, name)


class _TqdmHandler(logging.Handler):
    """Log records through ``tqdm.write``, so that messages never land in the middle of a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


_OURS: dict = {}  # environment values this module set (a value the user set stays as it is)


def _set_env(key: str, value) -> None:
    """Set (or with None remove) an environment default, unless the user set that variable."""
    if key in os.environ and os.environ[key] != _OURS.get(key):
        return
    if value is None:
        os.environ.pop(key, None)
        _OURS.pop(key, None)
    else:
        os.environ[key] = _OURS[key] = value


def setup_console(quiet: bool = False, verbose: bool = False, log_interval: float = 30.0) -> None:
    """Configure logging, warning filters and progress bars for one command-line run.

    Args:
        quiet: WARNING level, no progress bars.
        verbose: DEBUG level, every library warning and log message.
        log_interval: seconds between progress lines when stderr is not a terminal.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    tty = sys.stderr.isatty()
    if not tty and not isinstance(sys.stderr, _LineStream):
        sys.stderr = _LineStream(sys.stderr)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
    if not verbose:
        for mod in NOISY_MODULES:
            logging.getLogger(mod).setLevel(logging.ERROR)
            warnings.filterwarnings("ignore", module=rf"{mod}(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # torch configures its own loggers when imported (after this): "Skipping torchvision::nms" and the like from
        # the ONNX exporter are silenced through torch's own switch; a TORCH_LOGS the user set wins
        _set_env("TORCH_LOGS", "-onnx")
    _set_env("TQDM_DISABLE", "1" if quiet else None)
    _set_env("TQDM_MININTERVAL", "2" if tty else str(log_interval))
    # tqdm's monitor thread forces a redraw every maxinterval (10 s by default) otherwise
    _set_env("TQDM_MAXINTERVAL", None if tty else str(log_interval))


def log(msg: str) -> None:
    """INFO message of the command line (the ``log`` callback handed to training, export and the pipeline)."""
    LOG.info(msg)


# -- the few lines a command ends with (the whole result is in its JSON file, or on stdout with --json) -----------

def train_source_lines(summary: dict) -> list:
    """``segadapt train-source``'s closing lines: the best checkpoint and its validation mIoU (0-100), steps made,
    where the whole summary is."""
    out = summary.get("out", "")
    made = f"{summary.get('steps')} steps in {summary.get('seconds', 0.0):.0f} s"
    if summary.get("stopped_early"):
        made += ", stopped early by the time budget"
    if summary.get("best_step", -1) >= 0:
        head = (f"best checkpoint: {out}/best (val mIoU {summary['best_val_miou']:.2f} at step "
                f"{summary['best_step']}; {made})")
    else:
        head = f"no validation split: the model is {out}/last ({made})"
    return [head, f"summary and validation history: {out}/history.json"]


def adapt_lines(summary: dict, out: str) -> list:
    """``segadapt adapt``'s closing lines: the adapted checkpoint, steps and size, the label-free monitor's last
    signals and an early stop, where the whole summary is."""
    size = "x".join(map(str, summary.get("size") or []))
    if not summary.get("steps") and "keep" not in summary:
        how = f"AdaBN only, at {size}"
    else:
        who = "EMA teacher" if summary.get("keep") == "teacher" else summary.get("keep", "")
        how = f"{who} after {summary.get('steps')} steps at {size}, {summary.get('seconds', 0.0):.0f} s"
    lines = [f"adapted checkpoint: {summary.get('adapted', out + '/adapted')} ({how})"]
    last = (summary.get("monitor") or {}).get("last")
    if last:
        agree = "no anchor" if last.get("anchor_agreement") is None else f"{last['anchor_agreement']:.3f}"
        plot = f"; plot {summary['monitor_plot']}" if summary.get("monitor_plot") else ""
        lines.append(f"monitor at step {last['step']} (no labels): class-share drift {last['class_drift']:.3f}, "
                     f"teacher-anchor agreement {agree}, teacher entropy {last['entropy']:.3f} of log K{plot}")
    if summary.get("stopped_early"):
        lines.append(f"stopped early: {summary['stopped_early']}")
    sel = summary.get("selection")
    if sel:
        lines.append(f"selection ({sel['rule']}, {len(sel['candidates'])} candidates, no labels): adapted/ holds "
                     f"{sel['picked']}; verdict against the source model: {sel['verdict']} ({sel['reason']}); "
                     f"{out}/selection.json")
    lines.append(f"summary: {out}/summary.json")
    return lines


def pipeline_lines(rep: dict, out: str) -> list:
    """``segadapt pipeline``'s closing lines: mIoU (0-100) of the source-only and adapted models per evaluated split,
    export parity, the adapted model's files, the overlay video and where the report is."""
    lines = [f"report: {out}/report.md (every number: {out}/report.json)"]
    metrics = rep.get("metrics", {})
    splits = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics))
    if splits:
        w = max(len(s) for s in [*splits, "mIoU (%)"]) + 2
        lines.append(f"{'mIoU (%)':<{w}} source-only  adapted  change")
        for split in splits:
            src, ada = (metrics.get(f"{m}/{split}", {}).get("miou") for m in ("source_only", "adapted"))
            change = f"{ada - src:+7.2f}" if src is not None and ada is not None else "    n/a"
            lines.append(f"{split:<{w}} {_num(src, 11)}  {_num(ada, 7)}  {change}")
    parity = rep.get("export_parity") or {}
    if parity:
        lines.append("export parity, same class as PyTorch: " + ", ".join(
            f"{k} {v['class_agreement'] * 100:.2f} %" for k, v in parity.items()))
    files = rep.get("files") or {}
    if files.get("adapted_checkpoint"):
        onnx = f", ONNX {files['onnx.adapted.fp32']}" if files.get("onnx.adapted.fp32") else ""
        lines.append(f"adapted model: checkpoint {files['adapted_checkpoint']}{onnx}")
    sel = rep.get("selection")
    if sel:
        lines.append(f"label-free verdict against the source model: {sel['verdict']} (the adapted model is "
                     f"{sel['picked']}, rule {sel['rule']}; {sel['reason']})")
    video = rep.get("video") or {}
    if video.get("output"):
        lines.append(f"video: {video['output']} ({video.get('frames')} frames, {video.get('fps', 0.0):.1f} "
                     f"frames/s end to end)")
    for name, st in (rep.get("steps") or {}).items():
        if st.get("cut_short"):
            lines.append(f"{name}: cut short at {st['done']} of {st['planned']} steps by the "
                         f"{st['minutes_cap']}-minute cap (not comparable to a full run)")
    return lines


def _num(v, width: int) -> str:
    return f"{v:{width}.2f}" if v is not None else f"{'n/a':>{width}}"


def first_help_group(parser, title: str, description: str | None = None):
    """The argument group of ``parser`` titled ``title``, created on first use and listed first in ``--help``
    (argparse lists groups in the order they were made, so a new one is moved to the front)."""
    for g in parser._action_groups:
        if g.title == title:
            return g
    g = parser.add_argument_group(title, description)
    parser._action_groups.remove(g)
    parser._action_groups.insert(0, g)
    return g
