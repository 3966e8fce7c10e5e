"""The ``settings:`` block of a ``type: fal`` backend and the model input mapping inside it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from backends.base import EMPTY

# fal's named image sizes (fast-sdxl, FLUX and most SDXL-family apps). Models with other presets override them.
PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "square_hd": "1024x1024",
        "square": "512x512",
        "portrait_4_3": "768x1024",
        "portrait_16_9": "576x1024",
        "landscape_4_3": "1024x768",
        "landscape_16_9": "1024x576",
    }
)
MIN_START_TIMEOUT = 0.1  # fal refuses smaller X-Fal-Request-Timeout values


def _parse_size(text: str, where: str) -> tuple[int, int]:
    w, sep, h = text.partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"{where}: {text!r} is not WIDTHxHEIGHT")
    return int(w), int(h)


@dataclass(frozen=True, slots=True)
class InputMapping:
    """How a gateway request becomes this model's input. ``*_key: null`` = the model has no such input.

    ``image_size``: ``auto`` sends a preset name when the size is one and ``{width, height}`` otherwise;
    ``preset`` only names (other sizes are refused); ``dims`` always ``{width, height}``.
    ``formats``: the values the model's ``format_key`` accepts; other output formats are left to the gateway.
    """

    image_size: Literal["auto", "preset", "dims"] = "auto"
    presets: Mapping[str, str] | None = None
    image_size_key: str = "image_size"
    num_images_key: str | None = "num_images"
    max_images_per_call: int = 4
    steps_key: str | None = "num_inference_steps"
    guidance_key: str | None = "guidance_scale"
    seed_key: str | None = "seed"
    negative_prompt_key: str | None = "negative_prompt"
    format_key: str | None = "format"
    formats: tuple[str, ...] = ("jpeg", "png")
    sync_mode: bool = False
    enable_safety_checker: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        if self.max_images_per_call < 1:
            raise ValueError("max_images_per_call must be at least 1")
        for name, size in (self.presets or {}).items():
            _parse_size(size, f"presets.{name}")

    @property
    def per_call(self) -> int:
        """Images one call can make (1 when the model has no ``num_images`` input)."""
        return self.max_images_per_call if self.num_images_key else 1

    def preset_table(self) -> dict[str, tuple[int, int]]:
        table = PRESETS if self.presets is None else self.presets
        return {name: _parse_size(size, name) for name, size in table.items()}


@dataclass(frozen=True, slots=True)
class FalSettings:
    """The ``settings:`` block of a ``type: fal`` backend."""

    key: str
    app: str
    mode: Literal["queue", "sync"] = "queue"
    queue_base_url: str = "https://queue.fal.run"
    run_base_url: str = "https://fal.run"
    poll_interval: float = 0.25
    start_timeout: float | None = None
    allowed_output_hosts: tuple[str, ...] = ("fal.media", "*.fal.media")
    max_output_bytes: int = 50 * 1024 * 1024
    output_timeout: float = 30.0
    cancel_timeout: float = 5.0
    input: InputMapping = field(default_factory=InputMapping)

    def __post_init__(self) -> None:
        if not self.key.strip():
            raise ValueError("key is empty (set it from ${FAL_KEY})")
        parts = self.app.split("/")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"app must look like owner/name[/path], got {self.app!r}")
        for name in ("queue_base_url", "run_base_url"):
            if not getattr(self, name).startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        if self.poll_interval <= 0 or self.cancel_timeout <= 0 or self.output_timeout <= 0:
            raise ValueError("poll_interval, cancel_timeout and output_timeout must be positive")
        if self.start_timeout is not None and self.start_timeout <= MIN_START_TIMEOUT:
            raise ValueError(f"start_timeout must be more than {MIN_START_TIMEOUT}s")
