"""Typed dataclass configs as command-line flags (torch-free; the CLI builds its parsers from these).

Every field of a config dataclass becomes a flag: ``--field-name`` for top-level fields and ``--section.field-name``
for fields of nested dataclasses, with the field's attribute docstring as its help line. ``Literal`` fields take one
of their choices, bounded numbers are checked as they are parsed, booleans work bare (``--half``) or with a value
(``--amp false``), tuples take several values. A JSON file passed with ``--config`` is applied first, flags after it,
then the whole config is checked (:func:`segadapt.adapt.typed_config.check_config`), all before any work starts.
In ``--help`` the flags a run usually sets come first (the "essential" group), then one group per config section
(``rccr:``, ``teacher:``, ...).

Why not tyro, jsonargparse or simple-parsing: this layer is about 150 lines over argparse and the config module's
type helpers; it keeps the flag syntax users and scripts already have (``--amp false``, ``--size 180 240``,
``--config file.json`` with close-name suggestions for unknown keys), needs no new dependency in the runtime-only
install, and imports no torch, so ``segadapt --help`` stays instant. tyro (the closest fit) would change every boolean
flag to ``--amp/--no-amp`` pairs and pull typeguard, rich and docstring-parser into the runtime venv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from segadapt.adapt.typed_config import check_config, check_value, choices, field_docs, from_dict, hints, unwrap
from segadapt.console import first_help_group


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _bool_or_choice(opts: tuple):
    """An argparse ``type`` for a ``Literal`` mixing booleans and words (``Literal[False, True, "auto"]``): true/false
    spellings become booleans, the other choices stay words."""
    words = [o for o in opts if isinstance(o, str)]

    def parse(s: str):
        if s in words:
            return s
        try:
            return _parse_bool(s)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected true, false or {', '.join(words)}, got {s!r}") from None
    parse.__name__ = "choice"
    return parse


def checked_type(base: type, t):
    """An argparse ``type`` function: parse with ``base``, then check type ``t``'s bounds (argparse names the flag).

    ``checked_type(int, PositiveInt)`` also serves plain argparse options outside the configs."""
    def parse(s: str):
        try:
            v = base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a number' if base is float else base.__name__}, got {s!r}")
        try:
            return check_value("value", t, v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value ", "", 1).replace("value: ", "", 1))
    parse.__name__ = base.__name__  # argparse's "invalid <name> value" wording
    return parse


def _default_text(d) -> str:
    if isinstance(d, tuple):
        d = " ".join(map(str, d))
    elif isinstance(d, bool):
        d = str(d).lower()
    return f" (default: {d})" if d != "" else " (default: empty)"


ESSENTIAL_TITLE = "essential"


def essential_group(parser: argparse.ArgumentParser):
    """The parser's argument group titled "essential", shown before every other group of ``--help``."""
    return first_help_group(parser, ESSENTIAL_TITLE)


def section_groups(parser: argparse.ArgumentParser, general: str, descriptions: Optional[Dict[str, str]] = None,
                   by_field: Optional[Dict[str, str]] = None) -> Callable[[str], object]:
    """A ``group_for`` callback for :func:`add_dataclass_arguments`: one argument group per config section.

    A flag named ``section.field`` goes to the group titled ``section`` (its description from ``descriptions``); a
    top-level field goes to ``by_field[name]`` when listed there, else to the group titled ``general``. Groups are
    made on first use, so they appear in ``--help`` in the order of the dataclass fields."""
    made: Dict[str, object] = {}

    def group_for(name: str):
        title = name.split(".")[0] if "." in name else (by_field or {}).get(name, general)
        if title not in made:
            made[title] = parser.add_argument_group(title, (descriptions or {}).get(title))
        return made[title]
    return group_for


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Tuple[str, ...] = (),
                            defaults=None, group_for: Optional[Callable[[str], object]] = None,
                            essential: Tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (recursively for nested dataclasses, as ``--section.field``).

    Defaults are left as None in argparse so that only flags the user gave override the config (and a ``--config``
    file); the help line shows the field's documentation and its real default, taken from ``defaults`` (an
    instance; default ``cls()``), so a nested section shows its parent's defaults (``AdaptConfig.strong``).

    Args:
        group_for: ``name -> container`` for each flag's dotted name (``"lr"``, ``"rccr.weight"``): the argument
            group it is listed under in ``--help`` (e.g. :func:`section_groups`); None = the parser's own list.
        essential: top-level field names whose flags go, in this order, to the "essential" group shown first
            (:func:`essential_group`).

    Raises:
        TypeError: a field type this layer cannot parse.
        ValueError: a name in ``essential`` that is not a top-level field of ``cls``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = [n for n in essential if n not in fields]
    if unknown:
        raise ValueError(f"essential flags {unknown} are not fields of {cls.__name__}")
    hs = hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    if essential:
        essential_group(parser)
    if group_for is not None and not prefix:
        group_for("")  # the general group first, before any section's
    for f in [fields[n] for n in essential] + [f for n, f in fields.items() if n not in essential]:
        base, bounds = unwrap(hs[f.name])
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(base):
            add_dataclass_arguments(parser, base, prefix=name + ".", defaults=getattr(defaults, f.name),
                                    group_for=group_for)
            continue
        container = (essential_group(parser) if f.name in essential and not prefix
                     else group_for(name) if group_for is not None else parser)
        doc = docs.get(f.name, "")
        text = doc if doc.endswith("(required)") else doc + _default_text(getattr(defaults, f.name))
        container.add_argument("--" + name.replace("_", "-"), **_flag_kwargs(base, bounds, hs[f.name], name, text))


def _flag_kwargs(base, bounds, hint, name: str, help_text: str) -> dict:
    """argparse keyword arguments of one config field's flag (type, nargs, choices, metavar)."""
    kw: dict = {"dest": name, "default": None, "help": help_text}
    opts = choices(base)
    if opts is not None and any(isinstance(o, bool) for o in opts):  # e.g. --resume, --resume auto
        kw.update(type=_bool_or_choice(opts), nargs="?", const=True,
                  metavar="{" + ",".join(str(o).lower() for o in opts) + "}")
    elif opts is not None:
        kw.update(type=type(opts[0]), choices=opts)
    elif typing.get_origin(base) in (tuple, typing.Tuple):
        args = typing.get_args(base)
        elem = typing.Annotated[args[0], bounds] if bounds else args[0]
        kw.update(nargs=len(args), type=checked_type(args[0], elem), metavar=args[0].__name__.upper())
    elif base is bool:
        kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    elif base in (int, float):
        kw.update(type=checked_type(base, hint), metavar=base.__name__.upper())
    elif base is str:  # --depth.directory DIRECTORY, not DEPTH.DIRECTORY
        kw.update(type=str, metavar=name.split(".")[-1].upper())
    else:
        raise TypeError(f"unsupported config field type {base} for {name}")
    return kw


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
    """``cls()`` defaults, then the JSON file (if any), then the command-line flags; then the whole config is checked.

    Raises:
        ValueError: an unreadable config file, an unknown key, or a value outside its type, choices or bounds (the
            message names the flag).
    """
    cfg = cls()
    if config_file:
        p = Path(config_file)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read config: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config file must hold a JSON object")
        cfg = from_dict(cls, d)
    cfg = merge_namespace(cfg, ns)
    check_config(cfg)
    return cfg
