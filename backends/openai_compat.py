"""``type: openai`` — any OpenAI-compatible images endpoint (OpenAI itself, another gateway, a self-hosted
server). ``to_body`` and ``from_body`` are the pure translation; ``OpenAIBackend`` is the thin client.

Base64 images are passed through as the text they arrived in: no decode/encode round trip unless the
client asked for another output format (then the gateway transcodes).

Output URLs: with ``response_format: url`` an upstream link is handed to the client as it is only when
``backends.http.passable_link`` allows it (an allow-listed host, not a private/loopback/link-local
address); a ``data:`` URI or an allow-listed private address is fetched and re-hosted by the gateway, and
any other URL is this backend's failure (``OutputNotAllowed``, the request falls back). Fetches go through
the backend's ``OutputFetcher``, never through the API client that carries the key and ``extra_headers``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from backends.base import EMPTY, BackendSpec, Image, ImageRequest, ImageResult, StageClock, Usage
from backends.errors import BackendProtocolError
from backends.http import passable_link, send, sniff_format
from backends.remote import Outputs, RemoteBackend


@dataclass(frozen=True, slots=True)
class Settings:
    base_url: str  # up to and including /v1, e.g. https://api.openai.com/v1
    api_key: str | None = None  # usually "${OPENAI_API_KEY}"
    model: str | None = None  # upstream model name; None forwards the client's model field
    path: str = "/images/generations"
    # OpenAI's own API rejects fields it does not know; forward the imagegate extensions (seed, steps,
    # guidance_scale, negative_prompt) only to upstreams that understand them (another imagegate).
    forward_extensions: bool = False
    # gpt-image models always answer b64_json and refuse the response_format field.
    send_response_format: bool = True
    send_output_format: bool = False
    extra_body: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    extra_headers: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    allowed_output_hosts: tuple[str, ...] = ("oaidalleapiprodscus.blob.core.windows.net",)
    max_output_bytes: int = 50 * 1024 * 1024


def to_body(request: ImageRequest, settings: Settings) -> dict[str, Any]:
    """The upstream request body for ``request``. Pure."""
    body: dict[str, Any] = {"prompt": request.prompt, "n": request.n, "size": request.size}
    model = settings.model or request.model
    if model:
        body["model"] = model
    if request.quality:
        body["quality"] = request.quality
    if settings.send_response_format:
        # Ask for what the client wants when we can hand a URL straight through; b64 otherwise.
        body["response_format"] = "url" if request.response_format == "url" else "b64_json"
    if settings.send_output_format:
        body["output_format"] = request.output_format
        if request.output_compression is not None:
            body["output_compression"] = request.output_compression
    if request.user:
        body["user"] = request.user
    if settings.forward_extensions:
        for key in ("seed", "steps", "guidance_scale", "negative_prompt"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
    body.update(settings.extra_body)
    return body


def _b64_format(b64: str) -> str:
    try:
        head = base64.b64decode(b64[:24], validate=True)
    except (binascii.Error, ValueError):
        return "png"
    return sniff_format(head)


_B64_KEY = b'"b64_json"'
_JSON_WS = frozenset(b" \t\r\n")
_SPLICE_MIN = 16 * 1024  # below this, orjson.loads on the whole body is as fast as anything


def parse_body(raw: bytes) -> Any:
    """``orjson.loads(raw)``, faster for bodies carrying large base64 images (benchmarks/README.md). Pure.

    Base64 text never contains a quote, a backslash or a non-ASCII byte, so each ``"b64_json": "..."``
    string ends at the next quote: the strings are cut out (``bytes.find`` runs at memory speed), the
    small remainder is parsed by orjson, and the strings are put back into the ``data`` items they came
    from. Anything unusual — an escape or a non-ASCII byte inside the string, a ``b64_json`` key outside
    ``data`` items, a non-string value — falls back to parsing the whole body, so the result (and any
    ``orjson.JSONDecodeError``) is always the same as ``orjson.loads(raw)``'s.
    """
    if len(raw) < _SPLICE_MIN:
        return orjson.loads(raw)
    pieces: list[bytes] = []
    values: list[str] = []
    pos = 0
    find = raw.find
    view = memoryview(raw)  # str(view[a:b], "ascii") decodes without first copying the slice
    try:
        while (key := find(_B64_KEY, pos)) >= 0:
            i = key + len(_B64_KEY)
            while raw[i] in _JSON_WS:
                i += 1
            if raw[i] != 0x3A:  # ':' — the text was a value, not a key
                return orjson.loads(raw)
            i += 1
            while raw[i] in _JSON_WS:
                i += 1
            if raw[i] != 0x22:  # '"' — not a string value
                return orjson.loads(raw)
            start = i + 1
            end = find(b'"', start)
            if end < 0 or find(b"\\", start, end) >= 0:
                return orjson.loads(raw)
            values.append(str(view[start:end], "ascii"))
            pieces.append(raw[pos:start])
            pos = end
    except (IndexError, UnicodeDecodeError):
        return orjson.loads(raw)
    if not values:
        return orjson.loads(raw)
    pieces.append(raw[pos:])
    skeleton = orjson.loads(b"".join(pieces))  # every b64_json string is now ""
    data = skeleton.get("data") if isinstance(skeleton, dict) else None
    slots = (
        [item for item in data if isinstance(item, dict) and item.get("b64_json") == ""]
        if isinstance(data, list)
        else []
    )
    if len(slots) != len(values):  # a b64_json somewhere else, or a duplicate key: play safe
        return orjson.loads(raw)
    for item, value in zip(slots, values, strict=True):
        item["b64_json"] = value
    return skeleton


def from_body(payload: Any, fallback_format: str = "png") -> list[Image]:
    """Images from an upstream response body (b64 passed through as text; URLs kept for the caller to
    fetch or pass on). Raises ``ValueError`` on a body that is not an images response. Pure."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise ValueError("response has no 'data' list")
    declared = payload.get("output_format")
    images = []
    for item in payload["data"]:
        if not isinstance(item, Mapping):
            raise ValueError("'data' item is not an object")
        revised = item.get("revised_prompt")
        if isinstance(item.get("b64_json"), str):
            b64 = item["b64_json"]
            fmt = declared if declared in ("png", "jpeg", "webp") else _b64_format(b64)
            images.append(Image(format=fmt, b64=b64, revised_prompt=revised))
        elif isinstance(item.get("url"), str):
            images.append(Image(format=fallback_format, url=item["url"], revised_prompt=revised))
        else:
            raise ValueError("'data' item has neither b64_json nor url")
    return images


class OpenAIBackend(RemoteBackend[Settings]):
    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        s: Settings = spec.settings
        # Every call goes to this URL, parsed once (so the client has no base URL): httpx would otherwise parse
        # (and validate, and percent-encode) the URL text per request.
        self._url = httpx.URL(s.base_url.rstrip("/") + s.path)
        super().__init__(
            spec,
            key=s.api_key,
            secret_headers=s.extra_headers,
            urls=(s.base_url,),
            outputs=Outputs(s.allowed_output_hosts, s.max_output_bytes),
        )
        # The constant headers of every call, credential included, built once: a copy per request costs
        # no more than httpx merging client default headers would.
        self._headers_json = self.api_headers({"content-type": "application/json"})

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        # The request path is measured per request: ``backends.http.send`` directly, no wrapper frame.
        client = self.client
        headers = self._headers_json.copy()
        headers["x-request-id"] = request.request_id
        with self.loads.track():
            http_request = client.build_request(
                "POST",
                self._url,
                content=orjson.dumps(to_body(request, self.settings)),
                headers=headers,
            )
            response = await send(client, http_request, clock, backend=self.name, secrets=self.secrets)
            self.raise_for_status(response)
            try:
                images = from_body(parse_body(response.content), request.output_format)
            except (orjson.JSONDecodeError, ValueError) as exc:
                raise BackendProtocolError(f"{self.name}: unreadable images response: {exc}") from None
            if any(img.url for img in images):
                images = await self._fetched(images, request, clock)
        return ImageResult(tuple(images), Usage(images=len(images), megapixels=request.megapixels * len(images)))

    async def _fetched(self, images: list[Image], request: ImageRequest, clock: StageClock) -> list[Image]:
        """``images`` with each URL the client may not get as it is (see the module docstring) fetched."""
        keep = request.response_format == "url"
        allowed = self.settings.allowed_output_hosts
        targets = [
            (i, img.url)
            for i, img in enumerate(images)
            if img.url is not None and not (keep and passable_link(img.url, allowed))
        ]
        fetched = await self.fetch([url for _, url in targets], clock)
        out = list(images)
        for (i, _), image in zip(targets, fetched, strict=True):
            out[i] = Image(format=image.format, data=image.data, revised_prompt=images[i].revised_prompt)
        return out
