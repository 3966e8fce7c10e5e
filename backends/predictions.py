"""What the Replicate API and self-hosted cog containers share: the model input schemas (cog models *are*
Replicate models), the prediction object, output handling and failure classification.

Everything here is pure: plain dicts in, plain values (or vocabulary errors) out. The I/O the two backends
share with the other remote backends (clients, parallel calls, output fetches, cancels) is in
``backends.remote``.

Input mapping is table-driven. A *family* names a preset ``InputMapping`` for a model's input schema
(``sdxl``: width/height and ``num_outputs``; ``flux_schnell``/``flux_dev``: ``aspect_ratio`` +
``megapixels``, no size fields; ``flux_pro``: ``aspect_ratio``, one image per call; ``custom``: the prompt
only), and a backend's ``input:`` settings override any field of the preset.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

from backends.base import ImageRequest
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    scrub,
)
from backends.remote import seeded_batches
from backends.settings import build

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
STATUSES = TERMINAL | {"starting", "processing"}

# FLUX.1 [schnell]/[dev] on Replicate; [pro] lacks the two extreme ratios.
FLUX_ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
FLUX_PRO_ASPECT_RATIOS = ("1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "3:4", "4:3")
# Gateway format → the value Replicate image models take in their ``output_format`` input.
REPLICATE_FORMATS: Mapping[str, str] = MappingProxyType({"png": "png", "jpeg": "jpg", "webp": "webp"})


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _ratio_value(ratio: str) -> float:
    w, sep, h = ratio.partition(":")
    try:
        value = float(w) / float(h)
    except (ValueError, ZeroDivisionError):
        value = 0.0
    if not sep or value <= 0:
        raise ValueError(f"aspect ratio {ratio!r} is not of the form W:H")
    return value


@dataclass(frozen=True, slots=True)
class InputMapping:
    """How a gateway request becomes a model's ``input``. A field name set to None means the model has no
    such input and the request's value is not sent (the model's default applies)."""

    size_mode: Literal["width_height", "aspect_ratio", "none"] = "width_height"
    prompt_field: str = "prompt"
    width_field: str = "width"
    height_field: str = "height"
    aspect_ratio_field: str = "aspect_ratio"
    aspect_ratios: tuple[str, ...] = FLUX_ASPECT_RATIOS
    # FLUX schnell/dev take an approximate resolution instead of a size.
    megapixels_field: str | None = None
    megapixels_choices: tuple[str, ...] = ()
    n_field: str | None = "num_outputs"
    # More images than this are requested as several predictions (1 when ``n_field`` is None).
    max_outputs_per_call: int = 4
    negative_prompt_field: str | None = "negative_prompt"
    steps_field: str | None = "num_inference_steps"
    guidance_field: str | None = "guidance_scale"
    seed_field: str | None = "seed"
    output_format_field: str | None = None
    output_formats: Mapping[str, str] = field(default_factory=lambda: REPLICATE_FORMATS)
    # Sent as-is with every prediction (e.g. ``disable_safety_checker``, ``go_fast``).
    static: Mapping[str, Any] = field(default_factory=_frozen)

    def __post_init__(self) -> None:
        if self.max_outputs_per_call < 1:
            raise ValueError("max_outputs_per_call must be at least 1")
        if self.size_mode == "aspect_ratio":
            if not self.aspect_ratios:
                raise ValueError("size_mode aspect_ratio needs aspect_ratios")
            for ratio in self.aspect_ratios:
                _ratio_value(ratio)  # raises ValueError on a malformed entry
        for choice in self.megapixels_choices:
            try:
                if float(choice) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"megapixels_choices: {choice!r} is not a positive number") from None
        if self.megapixels_field and not self.megapixels_choices:
            raise ValueError("megapixels_field needs megapixels_choices")

    @property
    def per_call(self) -> int:
        return self.max_outputs_per_call if self.n_field else 1


_NO_EXTRAS: dict[str, Any] = {"negative_prompt_field": None, "steps_field": None, "guidance_field": None}
FAMILIES: Mapping[str, InputMapping] = MappingProxyType(
    {
        # stability-ai/sdxl and most SDXL fine-tunes (also what SDXL cog containers take).
        "sdxl": InputMapping(),
        # black-forest-labs/flux-schnell (official model): no width/height, 1..4 steps, no guidance.
        "flux_schnell": InputMapping(
            size_mode="aspect_ratio",
            megapixels_field="megapixels",
            megapixels_choices=("1", "0.25"),
            negative_prompt_field=None,
            guidance_field=None,
            output_format_field="output_format",
        ),
        # black-forest-labs/flux-dev: as schnell, plus ``guidance``.
        "flux_dev": InputMapping(
            size_mode="aspect_ratio",
            megapixels_field="megapixels",
            megapixels_choices=("1", "0.25"),
            negative_prompt_field=None,
            guidance_field="guidance",
            output_format_field="output_format",
        ),
        # black-forest-labs/flux-1.1-pro: one image per prediction (a single URL), no steps.
        "flux_pro": InputMapping(
            size_mode="aspect_ratio",
            aspect_ratios=FLUX_PRO_ASPECT_RATIOS,
            n_field=None,
            max_outputs_per_call=1,
            output_format_field="output_format",
            **_NO_EXTRAS,
        ),
        # Anything else: the prompt only; name the other fields in ``input:``.
        "custom": InputMapping(size_mode="none", n_field=None, max_outputs_per_call=1, seed_field=None, **_NO_EXTRAS),
    }
)
Family = Literal["sdxl", "flux_schnell", "flux_dev", "flux_pro", "custom"]


def resolve_mapping(family: str, overrides: Mapping[str, Any], extra_input: Mapping[str, Any]) -> InputMapping:
    """The family's preset with ``overrides`` (InputMapping field names) applied and ``extra_input`` added to
    the static inputs. Raises ``backends.settings.SettingsError`` (a ValueError) naming a bad key."""
    preset = FAMILIES[family]
    merged = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
    merged.update(overrides)
    mapping = build(InputMapping, merged, "input")
    if extra_input:
        mapping = dataclasses.replace(mapping, static=_frozen({**mapping.static, **extra_input}))
    return mapping


# -- request → input (pure) --------------------------------------------------------------------------------


def nearest_aspect_ratio(width: int, height: int, ratios: Sequence[str]) -> str:
    """The supported ratio closest to width/height, on a log scale (so 2:1 and 1:2 are equally far from 1:1).
    Ties go to the earlier entry."""
    target = math.log(width / height)
    return min(ratios, key=lambda r: abs(math.log(_ratio_value(r)) - target))


def nearest_megapixels(width: int, height: int, choices: Sequence[str]) -> str:
    target = math.log(width * height / 1_000_000)
    return min(choices, key=lambda c: abs(math.log(float(c)) - target))


def to_input(
    request: ImageRequest, mapping: InputMapping, *, count: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """One prediction's ``input`` for ``request``: ``count`` images (default: all of ``request.n``) and
    ``seed`` (default: the request's). Static inputs go first so the request's own values win, and
    ``request.options["input"]`` (per-route candidate options) goes last."""
    out: dict[str, Any] = dict(mapping.static)
    out[mapping.prompt_field] = request.prompt
    if mapping.size_mode == "width_height":
        out[mapping.width_field] = request.width
        out[mapping.height_field] = request.height
    elif mapping.size_mode == "aspect_ratio":
        out[mapping.aspect_ratio_field] = nearest_aspect_ratio(request.width, request.height, mapping.aspect_ratios)
        if mapping.megapixels_field:
            out[mapping.megapixels_field] = nearest_megapixels(
                request.width, request.height, mapping.megapixels_choices
            )
    count = request.n if count is None else count
    if mapping.n_field:
        out[mapping.n_field] = count
    elif count != 1:
        raise ValueError(f"this model makes one image per prediction, {count} asked")
    if mapping.negative_prompt_field and request.negative_prompt:
        out[mapping.negative_prompt_field] = request.negative_prompt
    if mapping.steps_field and request.steps is not None:
        out[mapping.steps_field] = request.steps
    if mapping.guidance_field and request.guidance_scale is not None:
        out[mapping.guidance_field] = request.guidance_scale
    seed = request.seed if seed is None else seed
    if mapping.seed_field and seed is not None:
        out[mapping.seed_field] = seed
    if mapping.output_format_field and request.output_format in mapping.output_formats:
        out[mapping.output_format_field] = mapping.output_formats[request.output_format]
    extra = request.options.get("input") if request.options else None
    if isinstance(extra, Mapping):
        out.update(extra)
    return out


def to_inputs(request: ImageRequest, mapping: InputMapping) -> list[dict[str, Any]]:
    """The inputs of every prediction needed for ``request.n`` images: ``ceil(n / per_call)`` of them.
    With a seed, call *i* gets ``seed + (images before it)``, so parallel calls do not repeat an image."""
    return [
        to_input(request, mapping, count=count, seed=seed)
        for count, seed in seeded_batches(request.n, mapping.per_call, request.seed)
    ]


# -- prediction → result (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """The parts of a Replicate/cog prediction object the backends act on."""

    id: str | None
    status: str
    outputs: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=_frozen)  # remote_queue / remote_predict, seconds
    error: str | None = None
    urls: Mapping[str, str] = field(default_factory=_frozen)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


_ISO = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$")


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 timestamps as Replicate (microseconds, ``Z``) and cog (nanoseconds, ``+00:00``) write them."""
    if not isinstance(value, str):
        return None
    match = _ISO.match(value.strip())
    if not match:
        return None
    base, fraction, zone = match.groups()
    text = base + "." + (fraction or "0")[:6].ljust(6, "0")
    if zone and zone != "Z":
        text += zone if ":" in zone else zone[:3] + ":" + zone[3:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _output_strings(output: Any, backend: str) -> tuple[str, ...]:
    if output is None:
        return ()
    if isinstance(output, str):
        return (output,)
    if isinstance(output, list) and all(isinstance(item, str) for item in output):
        return tuple(output)
    raise BackendProtocolError(f"{backend}: prediction output is not a URL or a list of URLs")


def from_prediction(payload: Any, *, backend: str = "replicate") -> Prediction:
    """Parse a prediction object. Raises ``BackendProtocolError`` when it is not one."""
    if not isinstance(payload, Mapping):
        raise BackendProtocolError(f"{backend}: prediction is not a JSON object")
    status = payload.get("status")
    if status not in STATUSES:
        raise BackendProtocolError(f"{backend}: unknown prediction status {str(status)[:40]!r}")
    timings: dict[str, float] = {}
    metrics = payload.get("metrics")
    if isinstance(metrics, Mapping):
        predict = metrics.get("predict_time")
        if isinstance(predict, (int, float)) and not isinstance(predict, bool) and predict >= 0:
            timings["remote_predict"] = float(predict)
    created, started = parse_time(payload.get("created_at")), parse_time(payload.get("started_at"))
    if created and started and started >= created:
        timings["remote_queue"] = (started - created).total_seconds()
    outputs = _output_strings(payload.get("output"), backend) if status == "succeeded" else ()
    error = payload.get("error")
    urls = payload.get("urls")
    return Prediction(
        id=payload["id"] if isinstance(payload.get("id"), str) else None,
        status=status,
        outputs=outputs,
        timings=_frozen(timings),
        error=None if error in (None, "") else str(error),
        urls=_frozen({k: v for k, v in urls.items() if isinstance(v, str)} if isinstance(urls, Mapping) else {}),
    )


# A failed prediction means the model ran and raised. Most such errors are about the input (NSFW filter,
# a prompt the model refuses, a value out of range) and would fail the same way elsewhere, so by default
# a failure is terminal (BackendRejected). These patterns mark failures of the *infrastructure* instead
# (out of memory, an interrupted worker, a timeout): another backend may well succeed, so fall back.
_INFRA_FAILURE = re.compile(
    r"(?i)out of memory|\bOOM\b|CUDA error|interrupted|please retry|try again|timed? ?out|timeout"
    r"|internal (server )?error|unavailable|preempt|no space left|connection (reset|refused|error)"
    r"|worker (died|crashed|exited)|killed|director|setup failed|E1000\b"
)


def classify_failure(error: str | None) -> type[BackendError]:
    """Which vocabulary error a ``failed`` prediction with this ``error`` text becomes."""
    if not error or _INFRA_FAILURE.search(error):
        return BackendFailed
    return BackendRejected


def raise_for_outcome(
    prediction: Prediction, request: ImageRequest, *, backend: str, secrets: tuple[str, ...] = ()
) -> None:
    """Raise the vocabulary error a finished prediction means; return quietly when it succeeded with output.

    ``failed``: see ``classify_failure``. ``canceled``: ``BackendTimeout`` when the request's deadline was
    (all but) reached, so our own cancel or Cancel-After did it; ``BackendFailed`` otherwise (someone else
    did). Any other status than ``succeeded`` here, or a success without output: ``BackendProtocolError``."""
    if prediction.status == "failed":
        error = scrub(prediction.error or "no error given", secrets)
        raise classify_failure(prediction.error)(f"{backend}: prediction failed: {error}")
    if prediction.status == "canceled":
        remaining = request.remaining()
        if remaining is not None and remaining <= 1.0:
            raise BackendTimeout(f"{backend}: prediction canceled at the deadline")
        raise BackendFailed(f"{backend}: prediction was canceled upstream")
    if prediction.status != "succeeded":
        raise BackendProtocolError(f"{backend}: prediction answered {prediction.status!r}, not a result")
    if not prediction.outputs:
        raise BackendProtocolError(f"{backend}: prediction succeeded without output")
