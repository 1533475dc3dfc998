"""Typed dataclass configs as command-line flags (torch-free; the CLI builds its parsers from these).

Every field of a config dataclass becomes a flag: ``--field-name`` for top-level fields and ``--section.field-name``
for fields of nested dataclasses. Values are parsed with the field's type, booleans take ``true/false``, tuples take
several values. A JSON file passed with ``--config`` is applied first, flags after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Tuple

from segadapt.adapt.config import _hints, from_dict


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (recursively for nested dataclasses, as ``--section.field``).

    Defaults are left as None in argparse so that only flags the user gave override the config.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(t):
            add_dataclass_arguments(parser, t, prefix=name + ".")
            continue
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict = {"dest": name, "default": None, "help": f"(default: {default})"}
        origin = typing.get_origin(t)
        if origin in (tuple, Tuple):
            args = typing.get_args(t)
            kw.update(nargs=len(args), type=args[0], metavar=args[0].__name__.upper())
        elif t is bool:
            kw.update(type=_parse_bool, metavar="BOOL")
        elif t in (int, float, str):
            kw.update(type=t)
        else:
            raise TypeError(f"unsupported config field type {t} for {name}")
        parser.add_argument(flag, **kw)


def merge_namespace(cfg, ns: argparse.Namespace):
    """Apply the flags the user gave (non-None values in ``ns``, dotted names for nested fields) onto ``cfg``."""
    for key, val in vars(ns).items():
        if val is None or key.startswith("_"):
            continue
        parts = key.split(".")
        obj = cfg
        ok = True
        for p in parts[:-1]:
            if not hasattr(obj, p):
                ok = False
                break
            obj = getattr(obj, p)
        if not ok or not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
            continue
        setattr(obj, parts[-1], tuple(val) if isinstance(val, list) else val)
    return cfg


def config_from_cli(cls, ns: argparse.Namespace, config_file: str | None = None):
    """``cls()`` defaults, then the JSON file (if any), then the command-line flags."""
    cfg = cls()
    if config_file:
        p = Path(config_file)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read config: {e}") from None
        cfg = from_dict(cls, d)
    return merge_namespace(cfg, ns)
