"""OpenAI Images API ⇄ ``ImageRequest`` / ``ImageResult``. Pure functions, no I/O.

``parse_generation`` validates a request body (plus ``X-Imagegate-*`` headers for the extension fields, so
an unmodified SDK call can set them) and raises ``CallerError`` with the offending ``param``;
``render_images`` / ``render_error`` produce the response bodies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

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
    (
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "response_format",
        "output_format",
        "output_compression",
        "user",
        "stream",
        *_IGNORED,
        *_EXTENSIONS,
    )
)
# X-Imagegate-<Name> header → body field, for the extension fields.
HEADER_FIELDS = {f"x-imagegate-{name.replace('_', '-')}": name for name in _EXTENSIONS}


class HeaderText(str):
    """A value that arrived as ``X-Imagegate-*`` header text, not as a JSON value.

    Only such values may be read from text (``"42"`` → 42): in a JSON body a number must be a JSON number,
    a boolean a JSON boolean, as in OpenAI's API. The subclass marks the origin at zero cost to the body path.
    """

    __slots__ = ()


# The strict text forms of header values (after trimming spaces and tabs). ``[0-9]`` is ASCII only (unlike
# ``\d`` or ``str.isdigit``, which accept "²" and "٣" that ``int()`` then rejects or reads); the digit
# counts cap the length before ``int()`` / ``float()`` ever run, so no header can make them work hard.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?")
_BOOL_TEXT = {"true": True, "false": False}
MAX_TEXT_CHARS = 64  # what a rejected value's echo and the matchers above ever look at


@overload
def number(value: object, key: str, lo: float, hi: float, *, integer: Literal[True]) -> int: ...
@overload
def number(value: object, key: str, lo: float, hi: float, *, integer: Literal[False]) -> float: ...


def number(value: object, key: str, lo: float, hi: float, *, integer: bool) -> int | float:
    """The one number reader, for body values and header text alike.

    Accepts a JSON number (an ``int`` that is not a ``bool``; a ``float`` too unless ``integer``) or
    ``HeaderText`` in the strict forms above, and checks ``lo <= value <= hi`` (which also refuses NaN and
    ±inf, e.g. from ``"1e400"``). Anything else is an ``InvalidRequest`` naming ``key``: never a
    ``ValueError`` escaping as a 500.
    """
    got: int | float
    # ``type(...) is``, not isinstance: bool is an int subclass and must not pass as a number.
    if type(value) is int or (type(value) is float and not integer):
        got = value
    elif type(value) is HeaderText:
        text = value.strip(" \t")
        pattern = _INT_TEXT if integer else _FLOAT_TEXT
        if len(text) > MAX_TEXT_CHARS or pattern.fullmatch(text) is None:
            raise InvalidRequest(
                f"'{key}' must be {'an integer' if integer else 'a number'} (ASCII digits), "
                f"got {text[:MAX_TEXT_CHARS]!r}",
                param=key,
            )
        got = int(text) if integer else float(text)
    else:
        raise InvalidRequest(f"'{key}' must be {'an integer' if integer else 'a number'}", param=key)
    if not lo <= got <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {got}", param=key)
    return got


def flag(value: object, key: str) -> bool:
    """The one boolean reader: JSON ``true`` / ``false``, or header text exactly ``true`` / ``false``.

    ``0``, ``""``, ``[]``, ``{}``, ``"no"`` are refused rather than read as false: a client that sends them
    means something, and guessing what is how a request silently does the wrong thing."""
    if value is True or value is False:
        return value
    if type(value) is HeaderText:
        got = _BOOL_TEXT.get(value.strip(" \t"))
        if got is not None:
            return got
    raise InvalidRequest(f"'{key}' must be true or false", param=key)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    return None if value is None else number(value, key, lo, hi, integer=True)


def _float(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    return None if value is None else float(number(value, key, lo, hi, integer=False))


def _str(body: Mapping[str, Any], key: str, choices: Sequence[str] | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{key}' must be a string", param=key)
    if choices is not None and value not in choices:
        raise InvalidRequest(f"'{key}' must be one of {', '.join(choices)}, got {value[:40]!r}", param=key)
    return value if type(value) is str else str(value)  # header text leaves as a plain str


def parse_size(value: str | None, default: str) -> tuple[int, int]:
    if value is None or value == "auto":
        value = default
    m = _SIZE.match(value)
    if not m:
        raise InvalidRequest(
            f"'size' must be WIDTHxHEIGHT (e.g. 1024x1024) or 'auto', got {value[:40]!r}", param="size"
        )
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
) -> ImageRequest:
    """Validate an ``images/generations`` body into the request the rest of the gateway reads, extension
    fields (``max_cost_usd`` included) and all. ``headers`` keys are lower-case. The output format is
    decided here, once: OpenAI's ``jpg`` is ``jpeg``, unset is ``png``."""
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
            body[name] = HeaderText(headers[header])

    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' is required and must be a string", param="prompt")
    if not prompt.strip():
        raise InvalidRequest("'prompt' must not be empty", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    stream = body.get("stream")
    if stream is not None and flag(stream, "stream"):
        raise InvalidRequest("streaming ('stream': true) is not supported by this gateway yet", param="stream")

    width, height = parse_size(_str(body, "size"), default_size)
    output_format = _str(body, "output_format", (*OUTPUT_FORMATS, "jpg")) or "png"
    return ImageRequest(
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
        max_cost_usd=_float(body, "max_cost_usd", 0.0, 1e6),
    )


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
