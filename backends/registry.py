"""``type:`` name in routes.yaml → backend class. Adding a backend = its module + one line here.

Entries are import strings so that checking a config, or running a gateway without the local backend,
never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from backends.base import Backend, BackendSpec

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
    return backend_class(spec.type)(spec)
