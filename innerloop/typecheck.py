"""One checker of values against type annotations, for the options of every algorithm and the
sections of every config: the value, or a ``ValueError`` that names the key, the value and the type
expected."""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["typed"]


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def typed(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``: ``bool``, ``int``, ``float`` (finite; an int
    becomes a float), ``str``, ``None``, ``Any``, ``Literal``, unions, ``list[X]``, ``tuple[X, ...]``
    and fixed tuples (a list becomes a tuple), ``dict``. Raises ``ValueError`` naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return typed(value, option, key)
            except ValueError:
                continue
        if isinstance(value, float) and not math.isfinite(value) and float in args:
            raise ValueError(f"{key} = {value!r} is invalid: must be a finite number.")
        raise ValueError(f"{key} = {value!r} has the wrong type: expected {' or '.join(map(_name, args))}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} = {value!r} is not allowed: choose one of {list(args)}.")
        return value
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{key} = {value!r}: expected nothing (null).")
        return None
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected a list.")
        if origin is list:
            return [typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{key} = {value!r} is invalid: give a list of {len(args)}.")
        return tuple(typed(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected a table.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected true or false.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected an integer.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected a number.")
        if not math.isfinite(value):
            raise ValueError(f"{key} = {value!r} is invalid: must be a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} = {value!r} has the wrong type: expected a string.")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the caller's annotations
