"""Plain data to validated config dataclasses: the type checks and coercions behind ``RunConfig.from_dict``.

Generic over frozen dataclasses: a value is checked against its field's annotation (numbers, booleans,
strings, tuples, mappings, nested sections), and every error names the dotted field and the fix.
``config.py`` declares the sections; this module knows nothing of them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from typing import Any

import yaml

from .errors import RayS2PError


class ConfigError(RayS2PError, ValueError):
    """A configuration value is missing, unknown or out of range."""


def require(condition: bool, path: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(f"config field '{path}': {problem}. Fix: {fix}")


def plain_data(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"config field '{dotted}': '{part}' is not a section. Fix: check the key in docs/config.md")
        node = node[part]
    node[parts[-1]] = value


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check (and gently coerce) one value against a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            value = parse_scalar(value, float, path)
        if not math.isfinite(value):  # YAML .inf / .nan, or --set key=inf: no setting means infinity here
            raise ConfigError(f"config field '{path}': {value!r} is not a finite number. Fix: write a finite number")
        return float(value)
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            value = parse_scalar(value, int, path)
        return value
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{path}': expected true or false, got {value!r}. Fix: write true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{path}': expected a string, got {value!r}. Fix: quote the value")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}': expected a list, got {value!r}. Fix: write a YAML list")
        return tuple(coerce(v, args[0], f"{path}[]") for v in value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}': expected a mapping, got {value!r}. Fix: write a YAML mapping")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}': expected a section (mapping), got {value!r}")
        return build_section(annotation, value, path + ".")
    return value


def parse_scalar(value: Any, kind: type, path: str) -> Any:
    if isinstance(value, str):
        try:
            return kind(float(value)) if kind is int and value.replace(".", "", 1).isdigit() else kind(value)
        except ValueError:
            pass
    name = "an integer" if kind is int else "a number"
    raise ConfigError(f"config field '{path}': expected {name}, got {value!r}. Fix: write {name}")


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"config field '{prefix}{unknown[0]}': unknown key. Fix: remove it or use one of "
            f"{', '.join(sorted(known))} (see docs/config.md)"
        )
    kwargs = {name: coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


Renames = dict[tuple[str, str], str]  # (section, old key) -> new key


def _warn_renamed(section: str, key: str, renamed: Renames, why: dict[tuple[str, str], str]) -> None:
    new = f"{section}.{renamed[section, key]}"
    warnings.warn(f"config key '{section}.{key}' is deprecated: it is now '{new}' ({why[section, key]}). "
                  f"Fix: write {new}", FutureWarning, stacklevel=4)


def apply_renames(data: dict[str, Any], renamed: Renames, why: dict[tuple[str, str], str] | None = None
                  ) -> dict[str, Any]:
    """``data`` with keys written under an old name moved to the new one, with one FutureWarning each when
    ``why`` gives the reasons (None: silently, e.g. for files an earlier version wrote).

    Raises:
        ConfigError: a key given under both its old and its new name.
    """
    data = dict(data)
    for (section, key), new in renamed.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            if new in part:
                raise ConfigError(f"config field '{section}.{key}': the old name of '{section}.{new}', and both "
                                  f"are given. Fix: keep {section}.{new} only")
            if why is not None:
                _warn_renamed(section, key, renamed, why)
            data[section] = {(new if k == key else k): v for k, v in part.items()}
    return data


def renamed_key(dotted: str, renamed: Renames, why: dict[tuple[str, str], str]) -> str:
    """A dotted ``--set`` key under its current name (with one FutureWarning when it was an old one)."""
    section, _, key = dotted.partition(".")
    if (section, key) not in renamed:
        return dotted
    _warn_renamed(section, key, renamed, why)
    return f"{section}.{renamed[section, key]}"


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set dotted.key=value`` (value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value. Fix: e.g. --set optimizer.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. an unquoted glob such as *.bias: take it as a string
    return key.strip(), value


def one_of(values: tuple[str, ...]) -> str:
    """"a, b or c": the values of a choice as a fix names them."""
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
