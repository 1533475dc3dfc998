"""Typed dataclass configs: value bounds, choices, per-field documentation, dict/JSON mapping and checks (no torch).

A config is a plain ``@dataclass`` whose fields use these types:

- ``int``, ``float``, ``str``, ``bool``, ``Tuple[int, int]``-style tuples, nested config dataclasses;
- ``Literal["a", "b"]`` for enumerated values (the command line lists them as choices);
- ``Annotated[float, Bounds(0, 1)]`` for numbers with a range (tuples: every element); floats are always finite.

Each field is documented by the string literal right under it (an *attribute docstring*, as in Sphinx and
simple-parsing); :func:`field_docs` reads them, and the command line shows them as the flags' help. A config class
may define ``check(self)`` for rules across fields (raise ``ValueError`` naming the flags).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class Bounds:
    """A numeric range for a config field: ``lo <= v <= hi`` (``<`` where the end is open); None = unbounded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        """Whether ``v`` lies in the range; NaN never does (every comparison with it is false)."""
        if v != v:
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(v: Optional[float]) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


#: common field types
PositiveInt = typing.Annotated[int, Bounds(1)]
NonNegInt = typing.Annotated[int, Bounds(0)]
PositiveFloat = typing.Annotated[float, Bounds(0, lo_open=True)]
NonNegFloat = typing.Annotated[float, Bounds(0)]
Fraction = typing.Annotated[float, Bounds(0, 1)]
Size = typing.Annotated[Tuple[int, int], Bounds(0)]  # (H, W) pixels; (0, 0) = "the default size"


def check_size(hw: Tuple[int, int], flag: str, zero_means: str = "") -> None:
    """A (H, W) size: both positive, or (with ``zero_means``) both 0; one 0 alone would be silently ignored.

    Raises:
        ValueError: naming ``flag``.
    """
    if tuple(hw) == (0, 0) and zero_means:
        return
    if min(hw) < 1:
        raise ValueError(f"{flag}: H and W must both be >= 1" + (f" (or both 0 for {zero_means})" if zero_means else "")
                         + f", got {hw[0]} {hw[1]}")


def hints(cls) -> Dict[str, Any]:
    """The field types of dataclass ``cls`` with their ``Annotated`` extras."""
    return typing.get_type_hints(cls, include_extras=True)


def unwrap(t) -> Tuple[Any, Optional[Bounds]]:
    """``Annotated[T, Bounds(..)]`` -> ``(T, Bounds)``; any other type -> ``(t, None)``."""
    if typing.get_origin(t) is typing.Annotated:
        base, *extra = typing.get_args(t)
        return base, next((e for e in extra if isinstance(e, Bounds)), None)
    return t, None


def choices(t) -> Optional[Tuple[str, ...]]:
    """The allowed values of a ``Literal[...]`` type, else None."""
    return tuple(typing.get_args(t)) if typing.get_origin(t) is typing.Literal else None


@lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """Attribute docstrings of a dataclass: ``{field name: the string literal right under the field}``.

    Returns an empty dict when the source is not available (a frozen application without .py files)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def check_value(name: str, t, v) -> Any:
    """Check (and normalise) value ``v`` of a field of type ``t``; ``name`` is used in the message.

    Raises:
        ValueError: wrong type, a value outside the field's choices or bounds, or a non-finite float.
    """
    base, bounds = unwrap(t)
    opts = choices(base)
    if opts is not None:
        if not any(v == o and type(v) is type(o) for o in opts):
            raise ValueError(f"{name}: {v!r} is not one of {', '.join(map(str, opts))}")
        return v
    if typing.get_origin(base) in (tuple, Tuple):
        args = typing.get_args(base)
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ValueError(f"{name} needs {len(args)} values, got {v!r}")
        return tuple(check_value(name, typing.Annotated[a, bounds] if bounds else a, x) for a, x in zip(args, v))
    if base is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name} needs true or false, got {v!r}")
        return v
    if base in (int, float, str):
        if base is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, base) or isinstance(v, bool):
            raise ValueError(f"{name} needs {'a number' if base is float else base.__name__}, got {v!r}")
        if base is float and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
        if bounds is not None and not bounds.ok(v):
            raise ValueError(f"{name} must be {bounds.describe()}, got {_num(v)}")
        return v
    return v


def from_dict(cls, d: dict, path: str = "", base=None):
    """Build dataclass ``cls`` from a (possibly partial, nested) dict, checking every value given.

    Args:
        cls: the config dataclass.
        d: field values; nested configs as nested dicts.
        path: key prefix for messages (``"teacher."``).
        base: the instance whose values the dict overrides (default ``cls()``); a nested dict overrides the parent's
            default of that section (``AdaptConfig.strong`` keeps its own defaults where the dict is silent).

    Raises:
        ValueError: a key that is not a field (with the closest names suggested) or a bad value (see
            :func:`check_value`).
    """
    obj = copy.deepcopy(base) if base is not None else cls()
    hs = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3)
            raise ValueError(f"unknown config key {path + k!r}" + (f"; did you mean {close}?" if close else ""))
        t = unwrap(hs[k])[0]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ValueError(f"config key {path + k!r} needs a mapping, got {v!r}")
            setattr(obj, k, from_dict(t, v, path + k + ".", base=getattr(obj, k)))
        else:
            setattr(obj, k, check_value(f"config key {path + k!r}", hs[k], v))
    return obj


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) for JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_config(cfg, flag_prefix: str = "--") -> None:
    """Check every field of a (nested) config against its type, choices and bounds, then each class's ``check``.

    Messages name the command-line flag (``--teacher.alpha``), so a user knows what to change.

    Raises:
        ValueError: the first bad value found.
    """
    hs = hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        flag = flag_prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(v):
            check_config(v, flag_prefix + f.name.replace("_", "-") + ".")
        else:
            setattr(cfg, f.name, check_value(flag, hs[f.name], v))
    own = getattr(cfg, "check", None)
    if callable(own):
        own()
