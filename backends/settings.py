"""Typed, strict construction of frozen dataclasses from parsed YAML.

Both the gateway's own config sections and each backend's ``settings:`` block are declared as frozen
dataclasses; ``build`` turns a mapping into one, refusing unknown keys, missing required keys and values
of the wrong type, and naming the key path in the error. One mechanism, so every part of routes.yaml
fails the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class SettingsError(ValueError):
    """A value in a config mapping is wrong. ``path`` is the dotted key path relative to the mapping."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path or '<root>'}: {reason}")


def _join(prefix: str, key: object) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers to immutable ones."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, path)
            except SettingsError as exc:
                errors.append(exc.reason)
        raise SettingsError(path, " or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise SettingsError(path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SettingsError(path, f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], item, _join(path, i)) for i, item in enumerate(value))
        if len(value) != len(args):
            raise SettingsError(path, f"must have {len(args)} items, got {len(value)}")
        return tuple(coerce(a, item, _join(path, i)) for i, (a, item) in enumerate(zip(args, value, strict=True)))
    if origin in (frozenset, set):
        (arg,) = get_args(tp)
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise SettingsError(path, f"must be a list, got {type(value).__name__}")
        return frozenset(coerce(arg, item, _join(path, i)) for i, item in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping) or tp in (dict, Mapping):
        args = get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise SettingsError(path, f"must be a mapping, got {type(value).__name__}")
        return types.MappingProxyType(
            {coerce(args[0], k, _join(path, k)): coerce(args[1], v, _join(path, k)) for k, v in value.items()}
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(path, f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(path, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(path, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(path, f"must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise SettingsError(path, f"must be {_type_name(tp)}, got {value!r}")


def build(cls: type[T], raw: Any, path: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``raw``.

    Unknown keys are errors (a typo must not silently fall back to a default). A dataclass may define
    ``__post_init__`` raising ``ValueError`` for cross-field checks; the message is reported at ``path``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingsError(path, f"must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise SettingsError(_join(path, unknown[0]), f"unknown key (allowed: {', '.join(sorted(fields)) or 'none'})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in raw:
            kwargs[name] = coerce(hints[name], raw[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except SettingsError as exc:
        raise SettingsError(_join(path, exc.path) if exc.path else path, exc.reason) from None
    except (ValueError, TypeError) as exc:
        raise SettingsError(path, str(exc)) from None
