"""Any config setting from the command line, the list of every setting, and a config as TOML.

``innerloop train --set KEY=VALUE`` (and ``innerloop rl train``) sets any field of the config by
its dotted key (``train.iterations``, ``algorithm.inner_lr``, ``task.options.amplitude_range``,
``out_dir``). ``VALUE`` is read as a TOML value (``5``, ``0.1``, ``true``, ``"omniglot"``,
``[0.1, 5.0]``, ``{dim = 2}``); text that is no TOML value is taken as a string (``--set
task.family=omniglot``), and so is any value given for a string field (``--set out_dir=2024``);
``null`` clears an optional field. A key the config does not have is refused before any work,
naming the nearest valid key; the values are then checked exactly as a config file's are.

:func:`config_fields` lists every setting of a config (key, type, value, first line of its
docstring): ``innerloop train --help`` prints it; :func:`to_toml` writes a config's tables as a
config file (``innerloop config show``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import re
import sys
import textwrap
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from innerloop.algorithms.registry import ALGORITHMS
from innerloop.training.config import LEGACY_ALGORITHM_KEYS, AlgorithmConfig, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Field", "cli_changes", "config_fields", "describe_fields", "parse_value", "to_toml"]


@dataclass(frozen=True)
class Field:
    """One setting of a config: its dotted ``key``, type annotation, current ``value`` and the first
    line of its docstring (``doc``, empty when it has none)."""

    key: str
    hint: Any
    value: Any
    doc: str


_ATTRIBUTE = re.compile(r"^(\s{4,})(\w+):\s*(.*)$")


_DOCS: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: its docstring on one line}`` of a dataclass and its bases: the string literal under
    each annotated field, or the ``name: text`` entries of an ``Attributes:`` section of the class
    docstring. Empty when the source cannot be read."""
    if cls in _DOCS:
        return _DOCS[cls]
    out: dict[str, str] = _DOCS.setdefault(cls, {})
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        in_attributes, current, indent = False, "", 0
        for line in (klass.__doc__ or "").splitlines():
            if line.strip() == "Attributes:":
                in_attributes = True
                continue
            if not in_attributes:
                continue
            match = _ATTRIBUTE.match(line)
            if match and (not current or len(match.group(1)) <= indent):
                current, indent = match.group(2), len(match.group(1))
                out[current] = match.group(3)
            elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
                out[current] += " " + line.strip()
            elif not line.strip():
                current = ""
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen application): no docs
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for item, after in zip(body, [*body[1:], None], strict=True):
            if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                out[item.target.id] = " ".join(after.value.value.split())
    return out


_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def summary(doc: str, width: int = 100) -> str:
    """The first sentence of a docstring as plain text (no reST markup), cut to ``width`` characters."""
    text = _ROLE.sub(r"\1", doc).replace("``", "")
    end = next((m for m in re.finditer(r"\.(\s|$)", text) if not text[: m.start()].endswith(("e.g", "i.e"))), None)
    text = text[: end.start() + 1] if end else text
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _algorithm_fields(prefix: str, algorithm: AlgorithmConfig, name: str | None) -> list[Field]:
    """``algorithm.name`` and the options of algorithm ``name`` (default: the config's): its current
    values when it is the config's algorithm, else that algorithm's defaults."""
    name = name or algorithm.name
    entry = ALGORITHMS[name]
    options = algorithm.options if name == algorithm.name else entry.options()
    hints, docs = get_type_hints(entry.cls.Options), field_docs(entry.cls.Options)
    out = [Field(f"{prefix}name", str, name, field_docs(AlgorithmConfig).get("name", ""))]
    for option in entry.option_names():
        out.append(Field(f"{prefix}{option}", hints[option], getattr(options, option), docs.get(option, "")))
    return out


def config_fields(config: Any, algorithm: str | None = None, prefix: str = "") -> list[Field]:
    """Every setting of the dataclass instance ``config`` (a :class:`~innerloop.training.config.Config`,
    an :class:`~innerloop.rl.config.RLConfig` or one of their sections), nested sections flattened
    into dotted keys; ``algorithm``: list that algorithm's options under ``algorithm.*`` instead of
    the config's own algorithm's."""
    hints, docs = get_type_hints(type(config)), field_docs(type(config))
    out: list[Field] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, AlgorithmConfig):
            out += _algorithm_fields(f"{prefix}{f.name}.", value, algorithm)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += config_fields(value, algorithm, f"{prefix}{f.name}.")
        else:
            out.append(Field(f"{prefix}{f.name}", hints[f.name], value, docs.get(f.name, "")))
    return out


def parse_value(text: str) -> Any:
    """A command-line value: ``null`` is None; else the TOML value ``text`` spells (``5``, ``0.1``,
    ``true``, ``"a b"``, ``[1, 2]``, ``{a = 1}``); text that is no TOML value is the string itself."""
    text = text.strip()
    if text == "null":
        return None
    try:
        table = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return table["value"] if list(table) == ["value"] else text


def _text_only(hint: Any) -> bool:
    """Whether annotation ``hint`` accepts strings (and None) and nothing else: ``str``, a ``Literal``
    of strings, or either ``| None``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return all(a is type(None) or _text_only(a) for a in args) and any(a is not type(None) for a in args)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    return hint is str


def _free_table(hint: Any) -> bool:
    """Whether ``hint`` is a table of keys the config does not fix (``task.options``)."""
    return hint is dict or get_origin(hint) is dict


def nearest_key(key: str, keys: Iterable[str]) -> str | None:
    """The valid key closest to ``key``: by spelling, else one with the same last part."""
    keys = list(keys)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    last = key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if same:
        return same[0]
    close = difflib.get_close_matches(last, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
    return next((k for k in keys if close and k.rsplit(".", 1)[-1] == close[0]), None)


def cli_changes(config: Any, items: Sequence[str] | None, command: str = "innerloop train") -> dict[str, Any]:
    """The dotted-key changes of ``--set KEY=VALUE`` items for ``config`` (a later item wins over an
    earlier one of the same key), values parsed by :func:`parse_value` (the text itself for a string
    field). A key ``config`` does not have raises :class:`ConfigError` naming the nearest valid key;
    the values are checked when the config is built from them (``config.override(changes)``)."""
    pairs: list[tuple[str, str]] = []
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is invalid: give KEY=VALUE, e.g. --set train.iterations=5 "
                              f"(`{command} --help` lists every key).")
        pairs.append((key.strip(), text))
    new_algorithm = next((parse_value(t) for k, t in reversed(pairs) if k == "algorithm.name"), None)
    if isinstance(new_algorithm, str) and new_algorithm not in ALGORITHMS:
        raise ConfigError(f"--set algorithm.name={new_algorithm} is invalid: choose one of {list(ALGORITHMS)}.")
    fields = config_fields(config, new_algorithm if isinstance(new_algorithm, str) else None)
    hints = {f.key: f.hint for f in fields}
    if isinstance(getattr(config, "algorithm", None), AlgorithmConfig):
        name = new_algorithm if isinstance(new_algorithm, str) else config.algorithm.name
        options = ALGORITHMS[name].cls.Options
        for old, new in options.aliases.items():  # an option's former name
            if f"algorithm.{new}" in hints:
                hints[f"algorithm.{old}"] = hints[f"algorithm.{new}"]
        for old in LEGACY_ALGORITHM_KEYS:  # 0.1.0's place of an execution key
            if f"execution.{old}" in hints:
                hints[f"algorithm.{old}"] = hints[f"execution.{old}"]
    sections = {k.rsplit(".", 1)[0] for k in hints if "." in k}
    changes: dict[str, Any] = {}
    for key, text in pairs:
        value = parse_value(text)
        hint = hints.get(key)
        if hint is None:
            free = any(key.startswith(f"{k}.") and _free_table(h) for k, h in hints.items())
            if not free and not (key in sections and isinstance(value, dict)):
                best = nearest_key(key, [f.key for f in fields])
                hint_text = f"; did you mean {best!r}?" if best else "."
                raise ConfigError(f"--set {key}: unknown config key {key!r}{hint_text} (`{command} --help` lists "
                                  "every key)")
        elif value is not None and not isinstance(value, str) and _text_only(hint):
            value = text.strip()  # a string field: the text as given (--set out_dir=2024)
        changes[key] = value
    return changes


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "|".join(json.dumps(a) for a in get_args(hint))
    text = getattr(hint, "__name__", None) if get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    return "null" if value is None else _toml_value(value)


def describe_fields(config: Any, command: str = "innerloop train") -> str:
    """The help text listing every setting of ``config``: key, type, default and meaning, one a line;
    for a supervised config also each algorithm's options."""
    fields = config_fields(config)
    width = max(len(f.key) for f in fields)
    lines = [
        "config keys (set any with --set KEY=VALUE, repeatable; VALUE in TOML syntax: 5, 0.1, true,",
        "[16, 16], {dim = 2}; unquoted text is a string; null clears an optional value; the value is",
        f"checked as a config file's; `innerloop config show{' --rl' if command.endswith('rl train') else ''}` "
        "prints the resolved config):",
    ]
    for f in fields:
        default = f"{_type_name(f.hint)} = {_show(f.value)}"
        lines.append(f"  {f.key:<{width}}  {default}" + (f"  {summary(f.doc)}" if f.doc else ""))
    if isinstance(getattr(config, "algorithm", None), AlgorithmConfig):
        lines += ["", "algorithm.* of each algorithm (algorithm.name = NAME, then its options):"]
        for name, entry in ALGORITHMS.items():
            lines.append(f"  {name}: {', '.join(entry.option_names()) or '(no options)'}")
    return "\n".join(lines)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    return json.dumps(str(value))


def to_toml(data: Mapping[str, Any]) -> str:
    """A config's tables (``config.to_dict()``) as a TOML config file: scalars first, then one
    ``[section]`` per table (``[section.sub]`` for a non-empty nested table). TOML has no null: a
    ``None`` is written as a comment line (``# key = null``), so the file leaves it at its default."""
    lines: list[str] = []

    def table(values: Mapping[str, Any], path: str) -> None:
        subtables = [(k, v) for k, v in values.items() if isinstance(v, Mapping) and v]
        if path:
            lines.extend(["", f"[{path}]"])
        for k, v in values.items():
            if isinstance(v, Mapping) and v:
                continue
            lines.append(f"# {_toml_key(k)} = null" if v is None else f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables:
            table(v, f"{path}.{_toml_key(k)}" if path else _toml_key(k))

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
