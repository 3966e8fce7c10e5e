"""OpenAI Images API ⇄ ``ImageRequest`` / ``ImageResult``. Pure functions, no I/O.

``parse_generation`` validates a request body (plus ``X-Imagegate-*`` headers for the extension fields, so
an unmodified SDK call can set them) and raises ``CallerError`` with the offending ``param``;
``render_images`` / ``render_error`` produce the response bodies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from backends.base import OUTPUT_FORMATS, Image, ImageRequest
from backends.errors import ImagegateError, InvalidRequest

MAX_PROMPT_CHARS = 32_000
MAX_SIDE = 4096
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_QUALITIES = ("auto", "low", "medium", "high", "standard", "hd")
# OpenAI fields we accept; those the gateway has no use for are accepted and ignored so SDK calls work.
_IGNORED = ("background", "style", "moderation", "partial_images")
_EXTENSIONS = ("tier", "seed", "steps", "guidance_scale", "negative_prompt", "max_cost_usd")
_KNOWN = frozenset(
    ("prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
     "user", "stream", *_IGNORED, *_EXTENSIONS)
)
# X-Imagegate-<Name> header → body field, for the extension fields.
HEADER_FIELDS = {f"x-imagegate-{name.replace('_', '-')}": name for name in _EXTENSIONS}


@dataclass(frozen=True, slots=True)
class Parsed:
    request: ImageRequest
    max_cost_usd: float | None


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # header values arrive as text
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{key}' must be an integer", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def _float(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidRequest(f"'{key}' must be a number", param=key) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidRequest(f"'{key}' must be a number", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return float(value)


def _str(body: Mapping[str, Any], key: str, choices: Sequence[str] | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{key}' must be a string", param=key)
    if choices is not None and value not in choices:
        raise InvalidRequest(f"'{key}' must be one of {', '.join(choices)}, got {value[:40]!r}", param=key)
    return value


def parse_size(value: str | None, default: str) -> tuple[int, int]:
    if value is None or value == "auto":
        value = default
    m = _SIZE.match(value)
    if not m:
        raise InvalidRequest(f"'size' must be WIDTHxHEIGHT (e.g. 1024x1024) or 'auto', got {value[:40]!r}",
                             param="size")
    width, height = int(m.group(1)), int(m.group(2))
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise InvalidRequest(f"'size' sides must be between 1 and {MAX_SIDE}, got {value}", param="size")
    return width, height


def parse_generation(
    body_bytes: bytes,
    headers: Mapping[str, str],
    *,
    default_size: str,
    request_id: str,
    deadline: float | None,
) -> Parsed:
    """Validate an ``images/generations`` body. ``headers`` keys are lower-case."""
    try:
        body = orjson.loads(body_bytes)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = [k for k in body if k not in _KNOWN]
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0][:60]!r}", param=unknown[0][:60])
    for header, name in HEADER_FIELDS.items():
        if name not in body and header in headers:
            body[name] = headers[header]

    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' is required and must be a string", param="prompt")
    if not prompt.strip():
        raise InvalidRequest("'prompt' must not be empty", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    if body.get("stream"):
        raise InvalidRequest("streaming ('stream': true) is not supported by this gateway yet", param="stream")

    width, height = parse_size(_str(body, "size"), default_size)
    output_format = _str(body, "output_format", (*OUTPUT_FORMATS, "jpg")) or "png"
    request = ImageRequest(
        prompt=prompt,
        n=_int(body, "n", 1, 10) or 1,
        width=width,
        height=height,
        model=_str(body, "model"),
        tier=_str(body, "tier"),
        quality=_str(body, "quality", _QUALITIES),
        negative_prompt=_str(body, "negative_prompt"),
        seed=_int(body, "seed", 0, 2**63 - 1),
        steps=_int(body, "steps", 1, 500),
        guidance_scale=_float(body, "guidance_scale", 0.0, 100.0),
        output_format="jpeg" if output_format == "jpg" else output_format,
        output_compression=_int(body, "output_compression", 0, 100),
        response_format=_str(body, "response_format", ("url", "b64_json")) or "b64_json",
        user=_str(body, "user"),
        request_id=request_id,
        deadline=deadline,
    )
    return Parsed(request, _float(body, "max_cost_usd", 0.0, 1e6))


def render_images(
    images: Sequence[Image],
    response_format: str,
    url_for: Callable[[Image], str],
    created: int | None = None,
) -> bytes:
    """The OpenAI response body. Base64 payloads received as text are passed through as they came."""
    data = []
    for image in images:
        item: dict[str, Any] = {"url": url_for(image)} if response_format == "url" else {"b64_json": image.as_b64()}
        if image.revised_prompt is not None:
            item["revised_prompt"] = image.revised_prompt
        data.append(item)
    return orjson.dumps({"created": int(time.time()) if created is None else created, "data": data})


def render_error(error: ImagegateError) -> bytes:
    return orjson.dumps(error.to_body())
