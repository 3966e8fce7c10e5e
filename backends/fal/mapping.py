"""Pure request/response translation for fal: plain values in, plain values (or vocabulary errors) out.

``to_inputs``/``to_input``/``image_size``/``split_counts``: a gateway request → the input of each fal call.
``from_output``: a fal output → image references and timings. ``error_for``: an API response → the
vocabulary error it means (see the package docstring for the mapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from backends.base import ImageRequest
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    scrub,
)
from backends.fal.config import InputMapping
from backends.http import raise_for_status, retry_after_seconds
from backends.remote import seeded_batches

# Infrastructure error types (body ``error_type`` / header ``X-Fal-Error-Type``).
TIMEOUT_TYPES = frozenset({"request_timeout", "startup_timeout"})
OVERLOAD_TYPES = frozenset(
    {"runner_scheduling_failure", "runner_connection_timeout", "runner_disconnected", "runner_connection_refused"}
)


# -- request → input --------------------------------------------------------------------------------


def image_size(width: int, height: int, mapping: InputMapping) -> str | dict[str, int]:
    """The model's ``image_size`` value for a ``width``x``height`` request."""
    dims = {"width": width, "height": height}
    if mapping.image_size == "dims":
        return dims
    table = mapping.preset_table()
    for name, size in table.items():
        if size == (width, height):
            return name
    if mapping.image_size == "preset":
        known = ", ".join(f"{w}x{h}" for w, h in table.values())
        # The router never plans this (capabilities_for declares the preset sizes): a backend fault, not the caller's.
        raise BackendFailed(f"size {width}x{height} is not one of this model's sizes ({known})")
    return dims


def to_input(
    request: ImageRequest, mapping: InputMapping, n: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The input of one fal call producing ``n`` images (default ``request.n``) with ``seed``."""
    n = request.n if n is None else n
    payload: dict[str, Any] = {
        "prompt": request.prompt,
        mapping.image_size_key: image_size(request.width, request.height, mapping),
    }
    if mapping.num_images_key:
        payload[mapping.num_images_key] = n
    optional = (
        (mapping.negative_prompt_key, request.negative_prompt),
        (mapping.steps_key, request.steps),
        (mapping.guidance_key, request.guidance_scale),
        (mapping.seed_key, seed),
    )
    for key, value in optional:
        if key and value is not None:
            payload[key] = value
    if mapping.format_key and request.output_format in mapping.formats:
        payload[mapping.format_key] = request.output_format
    if mapping.sync_mode:
        payload["sync_mode"] = True
    if mapping.enable_safety_checker is not None:
        payload["enable_safety_checker"] = mapping.enable_safety_checker
    payload.update(mapping.extra)
    payload.update(request.options.get("fal_input") or {})  # per-route overrides
    return payload


def split_counts(n: int, mapping: InputMapping) -> list[int]:
    """Images per fal call: ``n`` in calls of at most ``max_images_per_call`` (1 without ``num_images``)."""
    return [count for count, _ in seeded_batches(n, mapping.per_call, None)]


def to_inputs(request: ImageRequest, mapping: InputMapping) -> list[dict[str, Any]]:
    """One input per fal call (see ``split_counts``), run in parallel. Each call's seed is offset by the
    images before it, so a seeded request gives distinct, reproducible images, not one image n times."""
    return [
        to_input(request, mapping, n, seed) for n, seed in seeded_batches(request.n, mapping.per_call, request.seed)
    ]


# -- output → result --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FalImageRef:
    url: str
    content_type: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class FalOutput:
    images: tuple[FalImageRef, ...]
    seed: int | None = None
    predict_seconds: float | None = None
    has_nsfw_concepts: tuple[bool, ...] = ()


def from_output(payload: Any) -> FalOutput:
    """Read ``{"images": [{"url", "width", "height", "content_type"}], "timings", "seed", ...}``."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("images"), list):
        raise BackendProtocolError("fal: output has no 'images' list")
    refs = []
    for item in payload["images"]:
        if not isinstance(item, Mapping) or not isinstance(item.get("url"), str):
            raise BackendProtocolError("fal: output image without a 'url'")
        w, h = item.get("width"), item.get("height")
        refs.append(
            FalImageRef(
                item["url"],
                item.get("content_type"),
                w if isinstance(w, int) else None,
                h if isinstance(h, int) else None,
            )
        )
    timings = payload.get("timings")
    predict = None
    if isinstance(timings, Mapping):
        numbers = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        predict = numbers.get("inference", sum(numbers.values()) if numbers else None)
    seed = payload.get("seed")
    nsfw = payload.get("has_nsfw_concepts")
    return FalOutput(
        tuple(refs),
        seed if isinstance(seed, int) else None,
        predict,
        tuple(bool(x) for x in nsfw) if isinstance(nsfw, list) else (),
    )


# -- errors -----------------------------------------------------------------------------------------


def validation_message(detail: Any) -> str:
    """FastAPI-style ``[{"loc": [...], "msg": ...}]`` → ``"image_size: msg; num_images: msg"``."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if isinstance(item, Mapping):
            loc = [str(p) for p in item.get("loc") or () if p != "body"]
            parts.append(f"{'.'.join(loc) or 'input'}: {item.get('msg', 'invalid')}")
        else:
            parts.append(str(item))
    return "; ".join(parts)


def error_for(
    response: httpx.Response, *, backend: str, secrets: tuple[str, ...] = (), deadline_bound: bool = True
) -> BackendError | None:
    """The vocabulary error an API response means, or None for a success. ``deadline_bound``: the
    ``X-Fal-Request-Timeout`` we sent came from the request deadline (not from ``start_timeout``)."""
    status, headers = response.status_code, response.headers
    needs_retry = headers.get("x-fal-needs-retry", "").lower() in ("1", "true", "yes")
    if status < 400 and not needs_retry:
        return None
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, Mapping) else {}
    detail = body.get("detail")
    text = scrub(detail if isinstance(detail, str) else response.text or response.reason_phrase, secrets)
    where = f"{backend}: HTTP {status}"
    if status == 504 and headers.get("x-fal-request-timeout-type", "").lower() == "user":
        if deadline_bound:
            return BackendRejected(f"{where}: the request's deadline passed before a fal runner started it")
        return BackendTimeout(f"{where}: no fal runner started within start_timeout")
    error_type = headers.get("x-fal-error-type") or body.get("error_type")
    retry_after = retry_after_seconds(headers.get("retry-after"))
    if needs_retry:
        return BackendOverloaded(f"{where} (transient, X-Fal-Needs-Retry): {text}", retry_after=retry_after)
    if error_type in TIMEOUT_TYPES:
        return BackendTimeout(f"{where} {error_type}: {text}")
    if error_type in OVERLOAD_TYPES:
        return BackendOverloaded(f"{where} {error_type}: {text}", retry_after=retry_after)
    if status == 422:
        return BackendRejected(f"{where}: invalid input: {scrub(validation_message(detail), secrets)}")
    try:
        raise_for_status(response, backend=backend, secrets=secrets)
    except BackendError as exc:
        return exc
    return BackendFailed(f"{where}: {text}")  # pragma: no cover - raise_for_status raises for >= 400


def completed_error(status: Mapping[str, Any], *, backend: str, secrets: tuple[str, ...] = ()) -> BackendError | None:
    """The error a ``COMPLETED`` queue status carries (``error``/``error_type``), or None."""
    error, error_type = status.get("error"), status.get("error_type")
    if not (error or error_type):
        return None
    text = f"{backend}: {error_type or 'error'}: {scrub(str(error or ''), secrets)}"
    if error_type in TIMEOUT_TYPES:
        return BackendTimeout(text)
    if error_type in OVERLOAD_TYPES:
        return BackendOverloaded(text)
    return BackendFailed(text)
