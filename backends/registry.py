"""``type:`` name in routes.yaml → backend class. Adding a backend = its module + one line here.

Entries are import strings so that checking a config, or running a gateway without the local backend,
never imports torch. ``route_options`` and ``effective_capabilities`` apply a class's optional config-time
hooks (``Options``, ``check_options``, ``capabilities_for``; see ``backends.base``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from backends.base import EMPTY, Backend, BackendSpec, Capabilities
from backends.settings import SettingsError, build

BACKEND_TYPES: dict[str, str] = {
    "openai": "backends.openai_compat:OpenAIBackend",
    "local_sdxl": "backends.local_sdxl:LocalSDXLBackend",
    "replicate": "backends.replicate:ReplicateBackend",
    "cog": "backends.cog:CogBackend",
    "fal": "backends.fal:FalBackend",
    "triton": "backends.triton:TritonBackend",
}


def backend_class(type_name: str) -> Any:
    """The class registered for ``type_name``; KeyError if unknown, ImportError if its module fails."""
    module_name, _, attr = BACKEND_TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create(spec: BackendSpec) -> Backend:
    cls: Callable[[BackendSpec], Backend] = backend_class(spec.type)
    return cls(spec)


def route_options(cls: Any, settings: Any, raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A candidate's ``options`` for a backend of class ``cls``, validated at config load.

    With an ``Options`` dataclass: built strictly (unknown keys, wrong types and values outside a
    ``Literal`` are ``SettingsError`` with the key), then ``check_options(settings, options)``; the
    result maps the keys the route set to their checked values. A class without ``Options`` gets the
    mapping as written (its backend reads the keys it knows)."""
    options_cls = getattr(cls, "Options", None)
    if options_cls is None:
        return raw
    built = build(options_cls, raw)
    check = getattr(cls, "check_options", None)
    if check is not None:
        try:
            check(settings, built)
        except SettingsError:
            raise
        except ValueError as exc:
            raise SettingsError("", str(exc)) from None
    return MappingProxyType({key: getattr(built, key) for key in raw}) if raw else EMPTY


def effective_capabilities(cls: Any, settings: Any, declared: Capabilities) -> Capabilities:
    """``declared`` narrowed by the class's ``capabilities_for`` hook, if it has one."""
    narrow = getattr(cls, "capabilities_for", None)
    return declared if narrow is None else narrow(settings, declared)
