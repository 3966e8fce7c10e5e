"""``type: triton``: a model served over the KServe V2 HTTP protocol (Triton, MLServer, KServe).

Readiness comes from ``GET /v2/models/{m}[/versions/{v}]/ready`` (``probe``): checked in ``start`` and then
polled in the background by ``backends.remote.RemoteBackend``, which logs changes (``triton.ready_changed``,
``triton.not_ready_at_start``), and dropped at once when a call cannot connect. V2 has no cancel over HTTP:
when the client goes away we only drop the connection (httpx closes it when the request task is
cancelled). Images come back in the response itself: there are no output URLs and no output fetcher.
"""

from __future__ import annotations

import asyncio
import io
from functools import partial

import httpx
import numpy as np
from PIL import Image as PILImage

from backends.base import OUTPUT_FORMATS, BackendSpec, Image, ImageRequest, ImageResult, StageClock
from backends.errors import BackendError, BackendProtocolError, BackendQueueFull, BackendUnavailable
from backends.http import error_detail
from backends.remote import RemoteBackend, fan_out, usage
from backends.triton.codec import (
    CodecError,
    decode_response,
    encode_array,
    encode_request,
    infer_path,
    ready_path,
    split_calls,
)
from backends.triton.config import Settings


def output_format(request: ImageRequest) -> str:
    """The format to encode a raw tensor into. The client's format directly when the gateway would keep
    it as is (saves it a decode/encode round trip); lossless PNG when the client set
    ``output_compression``, because the gateway then re-encodes once with that compression itself."""
    if request.output_compression is None and request.output_format in OUTPUT_FORMATS:
        return request.output_format
    return "png"


def _decode_and_encode(headers: httpx.Headers, body: bytes, settings: Settings, fmt: str) -> list[tuple[Image, int]]:
    """Worker-thread half of a call: tensor → encoded images, with each image's pixel count. CPU-bound:
    parsing a JSON array of a megapixel image and encoding it each take tens of milliseconds."""
    out: list[tuple[Image, int]] = []
    for item in decode_response(headers, body, settings):
        if isinstance(item, Image):
            out.append((item, _pixels_of(item)))  # already encoded by the model: passed through as is
        else:
            assert isinstance(item, np.ndarray)
            out.append((Image(format=fmt, data=encode_array(item, fmt)), item.shape[0] * item.shape[1]))
    return out


def _pixels_of(image: Image) -> int:
    """Pixel count of an encoded image (reads only the header)."""
    try:
        with PILImage.open(io.BytesIO(image.as_bytes())) as pil:
            return pil.width * pil.height
    except (OSError, ValueError):  # PIL.UnidentifiedImageError is an OSError
        raise CodecError("a BYTES output element is not an image") from None


class TritonBackend(RemoteBackend[Settings]):
    """Generates images with one KServe V2 model. See ``backends.triton.config.Settings``."""

    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        s: Settings = spec.settings
        self._infer_path = infer_path(s)
        self._ready_path = ready_path(s)
        super().__init__(
            spec,
            base_url=s.base_url,
            key=s.api_key,
            key_header=s.api_key_header,
            key_scheme=s.api_key_prefix,
            secret_headers=s.headers,
            health_interval=s.ready_interval_s,
        )

    async def probe(self) -> bool:
        try:
            response = await self.send("GET", self._ready_path, StageClock(), timeout=self.spec.timeouts.connect)
        except (BackendError, httpx.HTTPError):
            return False
        return response.status_code == 200

    # -- work -------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        calls = split_calls(request, self.settings)
        with self.loads.track():
            # Side by side; the first failure (or our own cancellation) cancels the others, and the clock
            # gets the longest wait, not the sum (see backends.remote.fan_out).
            results = await fan_out([partial(self._call, c) for c in calls], clock)
        produced = [item for result in results for item in result]
        if len(produced) < request.n:
            raise BackendProtocolError(f"{self.name}: model returned {len(produced)} image(s), {request.n} requested")
        produced = produced[: request.n]
        megapixels = sum(pixels for _, pixels in produced) / 1_000_000  # as decoded, whatever was asked
        return ImageResult(tuple(image for image, _ in produced), usage(request, len(produced), megapixels=megapixels))

    async def _call(self, request: ImageRequest, clock: StageClock) -> list[tuple[Image, int]]:
        headers, body = encode_request(request, self.settings)
        try:
            response = await self.send("POST", self._infer_path, clock, headers=headers, content=body)
        except BackendUnavailable:
            self.unreachable()  # the poller brings it back once the server answers again
            raise
        # Triton: 400 bad input, 404 unknown model, 500 model exception / unparseable request,
        # 503 queue full (no Retry-After). MLServer: 422 for a body it cannot validate.
        if response.status_code == 503:
            # This server's queue is full (or it is not serving yet): it asked for no wait, and waiting here
            # would only queue us behind it, so the request moves to the next candidate now.
            raise BackendQueueFull(f"{self.name}: HTTP 503: {error_detail(response, self.secrets)}")
        self.raise_for_status(response)
        try:
            return await asyncio.to_thread(
                _decode_and_encode, response.headers, response.content, self.settings, output_format(request)
            )
        except CodecError as exc:
            raise BackendProtocolError(f"{self.name}: {exc}") from None
