"""The config engine: typed dataclasses from YAML-shaped dicts, and back.

A config is a tree of dataclasses. :func:`build` makes one from nested dicts (a YAML file with
``--set`` overrides applied): an unknown key is refused with a suggestion, each value is coerced to
its field's type (``int``, ``float``, ``bool``, ``str``, ``Optional``, ``List`` and nested
dataclasses) or refused, always with a one-line :class:`~ngdiag.core.errors.ConfigError` naming the key.
:func:`to_dict` is the inverse.

A section whose config keys are other names for some fields of its dataclass (the training config's
``sampling: {steps, guidance, ...}`` is a :class:`~ngdiag.models.generation.SamplingConfig`) names them in
the field's metadata, ``field(default_factory=..., metadata={CONFIG_KEYS: {"num_steps": "steps", ...}})``:
only those keys are accepted, and a key left out keeps the field default's value.

Also here: :func:`apply_overrides` (``key.sub=value`` strings), :func:`config_diff` (what differs
between two config dicts), :func:`read_text` and :func:`read_yaml_mapping` (files, with one-line
errors), and the value checks of ``validate()`` methods (:func:`check_choice`,
:func:`check_at_least`, :func:`check_positive`, :func:`check_nonneg`).

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Lora:
    ...     rank: int = 16
    >>> @dataclass
    ... class Config:
    ...     lora: Lora = field(default_factory=Lora)
    ...     lr: float = 1e-4
    >>> build(Config, apply_overrides({"lora": {"rank": 4}}, ["lr=0.5"]))
    Config(lora=Lora(rank=4), lr=0.5)
    >>> build(Config, {"lora": {"rnak": 4}})
    Traceback (most recent call last):
    ...
    ngdiag.core.errors.ConfigError: unknown config key 'lora.rnak' (did you mean 'lora.rank'?)
    >>> config_diff(to_dict(Config()), {"lora": {"rank": 8}, "lr": 1e-4})
    ['lora.rank: 16 -> 8']
"""

import copy
import dataclasses
import difflib
import functools
import math
import typing
from pathlib import Path
from typing import Any, List

import yaml

from ngdiag.core.errors import ConfigError

__all__ = [
    "CONFIG_KEYS",
    "build",
    "to_dict",
    "apply_overrides",
    "config_diff",
    "read_text",
    "read_yaml_mapping",
    "check_choice",
    "check_at_least",
    "check_positive",
    "check_nonneg",
]

CONFIG_KEYS = "config_keys"
"""Field metadata key: ``{field name: config key}`` of a section whose keys are other names for its fields."""


# ----------------------------------------------------------------------------------------- dicts -> dataclasses
def build(cls, data, prefix: str = "", *, base=None):
    """A ``cls`` dataclass from the nested dict ``data``; ``prefix`` is the dotted section name for errors.

    Keys left out take ``cls``'s defaults, or the values of ``base`` (an instance of ``cls``) when given.
    """
    return _build(cls, data, prefix, {f.name: f.name for f in dataclasses.fields(cls)}, base)


def _build(cls, data, prefix: str, keys: dict, base):
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    by_key = {key: name for name, key in keys.items()}
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in by_key:
            raise _unknown_key(key, by_key, prefix)
        name = by_key[key]
        kwargs[name] = _field_value(fields[name], hints[name], value, f"{prefix}{key}")
    make = cls if base is None else functools.partial(dataclasses.replace, base)
    try:
        return make(**kwargs)
    except ConfigError as exc:  # a dataclass that checks its values (SamplingConfig): name the key
        if not prefix:
            raise
        where = prefix.rstrip(".")
        for name, value in kwargs.items():
            try:
                make(**{name: value})
            except ConfigError:
                where = f"{prefix}{keys[name]}"
                break
            except TypeError:  # other fields are required: this one alone cannot be checked
                continue
        raise ConfigError(f"{where}: {exc}") from None


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


def _field_value(f: dataclasses.Field, tp, value, name: str):
    keys = f.metadata.get(CONFIG_KEYS)
    if dataclasses.is_dataclass(tp):
        default = _field_default(f)
        if value is None:
            return default if default is not None else tp()
        keys = keys or {g.name: g.name for g in dataclasses.fields(tp)}
        return _build(tp, value, name + ".", keys, default)
    return _coerce(tp, value, name)


def _coerce(tp, value, name: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, name)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return build(tp, value, name + ".")
    if origin in (list, List):
        (item,) = args or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(item, v, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _unknown_key(key: str, known, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


# ----------------------------------------------------------------------------------------- dataclasses -> dicts
def to_dict(config) -> dict:
    """The nested dict of a config dataclass (the inverse of :func:`build`; values are copies)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        keys = f.metadata.get(CONFIG_KEYS)
        if keys is not None:
            out[f.name] = {key: copy.deepcopy(getattr(value, name)) for name, key in keys.items()}
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------------- dicts
def config_diff(old: dict, new: dict, *, skip=(), prefix: str = "") -> List[str]:
    """The keys whose values differ between two nested config dicts, as ``"key: old -> new"`` lines.

    Keys in ``skip`` (dotted names, e.g. ``"iterations"``) are ignored.
    """
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in skip:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, skip=skip, prefix=name + ".")
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``"key.sub=value"`` overrides to nested dicts (values parsed as YAML scalars)."""
    data = dict(data)
    for item in overrides or []:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section; cannot set '{key}'")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------- files
def read_text(path, what: str) -> str:
    """The UTF-8 text of ``path``; a one-line :class:`ConfigError` when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (undecodable byte at position {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None


def read_yaml_mapping(path, what: str = "config file") -> dict:
    """The mapping a YAML file holds (an empty file is ``{}``); one-line errors naming the line of a syntax error."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"cannot parse {path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


# ----------------------------------------------------------------------------------------- value checks
def check_choice(name: str, value, choices) -> None:
    """``value`` is one of ``choices``, else a :class:`ConfigError` with the closest choice."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def check_at_least(name: str, value, low: int) -> None:
    """The integer ``value`` is at least ``low``."""
    if int(value) < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


def check_positive(name: str, value) -> None:
    """``value`` is a finite number > 0."""
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def check_nonneg(name: str, value) -> None:
    """``value`` is a finite number >= 0."""
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
