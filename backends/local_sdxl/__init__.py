"""Embedded SDXL backend (``type: local_sdxl``): the tuned diffusers pipeline on a local device.

Importing this package does not import torch; ``LocalSDXLBackend.start()`` does.
"""

from __future__ import annotations

from .backend import LocalSDXLBackend
from .settings import Settings, Shape

__all__ = ["LocalSDXLBackend", "Settings", "Shape"]
