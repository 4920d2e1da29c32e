"""Typed configs: dataclasses built from YAML plus command-line overrides, saved next to every output.

Every stage has a dataclass here or in its own module. ``from_dict`` refuses unknown keys with a sentence that
names the key and the known ones, and converts scalars to the annotated type, so a YAML typo never passes
silently. Overrides use dotted keys: ``--set optim.lr=3e-4``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cachekd.errors import CachekdError, ConfigFieldError, show_value

T = TypeVar("T")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[CachekdError] = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except CachekdError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        raise CachekdError(f"{where}: cannot use {show_value(value)}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise CachekdError(f"{where} must be a mapping of options, not {show_value(value)}.")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if value is None:  # `key: null` / `--set key=null` for a list means none (the list's default meaning)
            value = []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_convert(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise CachekdError(f"{where} must be a mapping, not {show_value(value)}.")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigFieldError(where, f"one of {', '.join(map(str, args))}", value)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigFieldError(where, "true or false", value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigFieldError(where, "a number", value)
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigFieldError(where, "a number", value) from None
        if tp is int and float(value) != out:
            raise ConfigFieldError(where, "a whole number", value)
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigFieldError(where, "text", value)
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise CachekdError. ``where`` names
    ``data`` in messages and prefixes its keys (``optim`` → ``optim.lr``); ``""`` is a whole config file, whose
    keys are named as they are (``optim.lr``, as ``--set`` spells them)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CachekdError(
            f"unknown option {unknown[0]!r} in {where or 'config'}; known options are: {', '.join(sorted(fields))}."
        )
    aliases = {k: f.metadata.get("aliases", {}) for k, f in fields.items()}
    kwargs = {k: _convert(aliases[k].get(v, v) if isinstance(v, str) else v, hints[k], f"{where}.{k}" if where else k)
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except CachekdError:
        raise
    except ValueError as e:  # __post_init__ validation of pure-library dataclasses
        raise CachekdError(f"{where or 'config'}: {e}") from None


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and of its dataclass bases), whitespace
    collapsed: ``{"lr": "Peak learning rate ..."}``. Fields without one are left out."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able view of a (nested) dataclass, its keys in the order of the class's ``key_order``
    (a tuple of field names) where it has one, else in field order."""
    if dataclasses.is_dataclass(obj):
        names = getattr(type(obj), "key_order", None) or [f.name for f in dataclasses.fields(obj)]
        return {name: to_dict(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(pairs: typing.Iterable[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "train.epochs=2"]`` → nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise CachekdError(f"override {pair!r} must look like key=value (for example optim.lr=3e-4).")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CachekdError(f"override {pair!r} conflicts with another override of {p!r}.")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read a YAML config file (a path, or the name of a shipped preset in cachekd/configs/)."""
    p = Path(path)
    if not p.exists():
        preset = PRESET_DIR / (str(path) if str(path).endswith(".yaml") else f"{path}.yaml")
        if preset.exists():
            p = preset
        else:
            raise CachekdError(
                f"config {str(path)!r} not found: give a YAML file or one of the presets "
                f"({', '.join(list_presets())})."
            )
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CachekdError(f"config {p} is not valid YAML{where}: {what}.") from None
    if data is None or data == {}:  # an empty file would silently mean "all defaults" (a 44M-parameter model)
        raise CachekdError(f"config {p} holds no options; write the options to set into it, or start from a "
                           f"shipped preset (`cachekd presets` lists them).")
    if not isinstance(data, dict):
        raise CachekdError(f"config {p} must be a mapping of options at the top level.")
    return data


PRESET_DIR = Path(__file__).parent / "configs"

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_description(name: str) -> str:
    """The one-line description of a shipped preset: the first line of its file, a ``#`` comment."""
    path = PRESET_DIR / f"{name.removesuffix('.yaml')}.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.exists() else ""
    return first.lstrip("#").strip()


def save_yaml(path: Path, obj: Any) -> None:
    from cachekd.io import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False).encode())
