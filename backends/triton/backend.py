"""``type: triton``: a model served over the KServe V2 HTTP protocol (Triton, MLServer, KServe).

Readiness comes from ``GET /v2/models/{m}[/versions/{v}]/ready``: checked in ``start`` and then polled in
the background, and dropped at once when a call cannot connect. V2 has no cancel over HTTP: when the
client goes away we only drop the connection (httpx closes it when the request task is cancelled).
"""

from __future__ import annotations

import asyncio
import io
import logging

import httpx
import numpy as np
from PIL import Image as PILImage

from backends.base import (
    OUTPUT_FORMATS,
    BackendSpec,
    Image,
    ImageRequest,
    ImageResult,
    Load,
    LoadCounter,
    StageClock,
    Usage,
)
from backends.errors import BackendProtocolError, BackendQueueFull, BackendUnavailable
from backends.http import credentials, error_detail, make_client, raise_for_status, send
from backends.remote import fan_out, stop_task
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

log = logging.getLogger(__name__)


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


class TritonBackend:
    """Generates images with one KServe V2 model. See ``backends.triton.config.Settings``."""

    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.settings: Settings = spec.settings
        self._client: httpx.AsyncClient | None = None
        self._ready = False
        self._poller: asyncio.Task[None] | None = None
        self._load = LoadCounter()
        s = self.settings
        self._secrets = credentials(s.api_key, headers=s.headers, urls=(s.base_url,))
        self._infer_path = infer_path(s)
        self._ready_path = ready_path(s)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        headers = dict(s.headers)
        if s.api_key:
            headers[s.api_key_header] = f"{s.api_key_prefix}{s.api_key}"
        self._client = make_client(self.spec, s.base_url, headers)
        self._ready = await self._check_ready()
        if not self._ready:
            log.warning("triton backend %s: model %s not ready at start", self.spec.name, s.model)
        self._poller = asyncio.create_task(self._poll_ready(), name=f"triton-ready:{self.spec.name}")

    async def aclose(self) -> None:
        await stop_task(self._poller)
        self._poller = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._ready = False

    def ready(self) -> bool:
        return self._ready

    def load(self) -> Load:
        return self._load.snapshot()

    async def _check_ready(self) -> bool:
        assert self._client is not None
        try:
            response = await self._client.get(self._ready_path, timeout=self.spec.timeouts.connect)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _poll_ready(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ready_interval_s)
            ready = await self._check_ready()
            if ready != self._ready:
                log.info("triton backend %s: ready=%s", self.spec.name, ready)
            self._ready = ready

    # -- work -------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        calls = split_calls(request, self.settings)
        with self._load.track():
            # Side by side; the first failure (or our own cancellation) cancels the others, and the clock
            # gets the longest wait, not the sum (see backends.remote.fan_out).
            results = await fan_out([lambda k, c=c: self._call(c, k) for c in calls], clock)
        produced = [item for result in results for item in result]
        if len(produced) < request.n:
            raise BackendProtocolError(
                f"{self.spec.name}: model returned {len(produced)} image(s), {request.n} requested"
            )
        produced = produced[: request.n]
        return ImageResult(
            images=tuple(image for image, _ in produced),
            usage=Usage(
                images=len(produced),
                megapixels=sum(pixels for _, pixels in produced) / 1_000_000,
                steps=request.steps,
            ),
        )

    async def _call(self, request: ImageRequest, clock: StageClock) -> list[tuple[Image, int]]:
        if self._client is None:
            raise BackendUnavailable(f"{self.spec.name}: not started")
        headers, body = encode_request(request, self.settings)
        http_request = self._client.build_request("POST", self._infer_path, headers=headers, content=body)
        try:
            response = await send(self._client, http_request, clock, backend=self.spec.name, secrets=self._secrets)
        except BackendUnavailable:
            self._ready = False  # the poller brings it back once the server answers again
            raise
        # Triton: 400 bad input, 404 unknown model, 500 model exception / unparseable request,
        # 503 queue full (no Retry-After). MLServer: 422 for a body it cannot validate.
        if response.status_code == 503:
            # This server's queue is full (or it is not serving yet): it asked for no wait, and waiting here
            # would only queue us behind it, so the request moves to the next candidate now.
            raise BackendQueueFull(f"{self.spec.name}: HTTP 503: {error_detail(response, self._secrets)}")
        raise_for_status(response, backend=self.spec.name, secrets=self._secrets)
        try:
            return await asyncio.to_thread(
                _decode_and_encode, response.headers, response.content, self.settings, output_format(request)
            )
        except CodecError as exc:
            raise BackendProtocolError(f"{self.spec.name}: {exc}") from None
