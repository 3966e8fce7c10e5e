"""``type: cog`` — a self-hosted Replicate model container (cog's HTTP server).

Protocol (cog ``docs/http.md``, checked against cog 0.23's server): ``PUT /predictions/{id}`` with
``{"id", "input"}`` holds the request open and answers 200 with the prediction (``status``, ``output`` as
``data:`` URIs, ``metrics.predict_time``, ``error``); a model exception is a 200 with ``status: failed``;
input validation errors are 422; a container whose prediction slots are all taken answers **409**, which
is overload (try later or elsewhere), not failure. There is no GET polling. ``POST /predictions/{id}/cancel``
stops a running prediction. ``GET /health-check`` reports ``STARTING | READY | BUSY | SETUP_FAILED | DEFUNCT``.

Why ``PUT`` with an id we generate rather than ``POST /predictions``: the id is ours before the request is
sent, so (1) a create that failed to connect can be re-sent safely (a PUT of a running id answers its
state instead of starting a second prediction), and (2) when the client goes away mid-request we can cancel
the prediction without ever having seen the server's answer.

Readiness comes from a background task polling ``/health-check`` every ``health_interval`` seconds;
``ready()`` returns the last answer (READY or BUSY: reachable and set up).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import httpx

from backends.base import (
    BackendSpec,
    Image,
    ImageRequest,
    ImageResult,
    Load,
    LoadCounter,
    StageClock,
    Usage,
)
from backends.errors import (
    BackendFailed,
    BackendQueueFull,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    scrub,
)
from backends.http import (
    OutputFetcher,
    credentials,
    json_body,
    make_client,
    raise_for_status,
    send,
)
from backends.predictions import (
    Family,
    InputMapping,
    classify_failure,
    from_prediction,
    resolve_mapping,
    to_inputs,
)
from backends.remote import Background, best_effort, fan_out, fetch_images, stop_task

READY_STATES = frozenset({"READY", "BUSY"})


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``settings:`` block of a ``type: cog`` backend."""

    base_url: str
    # Input schema preset (see backends.predictions.FAMILIES) and per-field overrides of it.
    family: Family = "sdxl"
    input: Mapping[str, Any] = field(default_factory=_empty)
    extra_input: Mapping[str, Any] = field(default_factory=_empty)
    # Bearer token for an authenticating proxy in front of the container (cog itself has no auth).
    api_token: str | None = None
    health_interval: float = 5.0
    # cog answers data: URIs; list hosts only if the container was started with --upload-url.
    allowed_output_hosts: tuple[str, ...] = ()
    max_output_bytes: int = 50 * 1024 * 1024
    output_timeout: float = 30.0
    cancel_timeout: float = 2.0
    # Re-sends of a create that could not connect (safe: the id is ours, see the module docstring).
    connect_retries: int = 2
    # How long a create that met 409 "busy" is re-sent before the gateway is told the container is
    # overloaded. cog frees its slot a moment after answering, so back-to-back predictions (``n`` split into
    # several calls, or two requests in a row) can meet a 409 that lasts only milliseconds.
    busy_wait_s: float = 0.5
    # One prediction at a time by default: a cog container has one slot unless built with more, and a
    # second concurrent request would only meet a 409.
    parallel: bool = False
    mapping: InputMapping = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError("base_url must be an http(s) URL")
        if self.health_interval <= 0 or self.cancel_timeout <= 0 or self.output_timeout <= 0:
            raise ValueError("health_interval, cancel_timeout and output_timeout must be positive")
        if self.connect_retries < 0:
            raise ValueError("connect_retries must be >= 0")
        object.__setattr__(self, "mapping", resolve_mapping(self.family, self.input, self.extra_input))


class CogBackend:
    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.settings: Settings = spec.settings
        self._client: httpx.AsyncClient | None = None  # the container's API only: it carries the token
        self._fetcher: OutputFetcher | None = None  # --upload-url outputs: no credential
        self._loads = LoadCounter()
        self._secrets = credentials(self.settings.api_token, urls=(self.settings.base_url,))
        self._ready = False
        self.health: str | None = None  # last /health-check status, for logs and tests
        self._health_task: asyncio.Task[None] | None = None
        self._background = Background()  # cancels that outlive the generate() that started them

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"User-Agent": "imagegate"}
        if self.settings.api_token:
            headers["Authorization"] = f"Bearer {self.settings.api_token}"
        self._client = make_client(self.spec, self.settings.base_url.rstrip("/"), headers=headers)
        self._fetcher = OutputFetcher(self.spec)
        await self.check_health()
        self._health_task = asyncio.ensure_future(self._health_loop())

    async def aclose(self) -> None:
        await stop_task(self._health_task)
        self._health_task = None
        await self._background.drain(self.settings.cancel_timeout)
        client, fetcher, self._client, self._fetcher = self._client, self._fetcher, None, None
        if client is not None:
            await client.aclose()
        if fetcher is not None:
            await fetcher.aclose()
        self._ready = False

    def ready(self) -> bool:
        return self._ready

    def load(self) -> Load:
        return self._loads.snapshot()

    async def check_health(self) -> bool:
        """One ``GET /health-check``; updates ``ready()``."""
        status = None
        if self._client is not None:
            try:
                response = await self._client.get("/health-check", timeout=min(5.0, self.settings.health_interval))
                body = response.json() if response.status_code == 200 else None
                status = body.get("status") if isinstance(body, Mapping) else None
            except (httpx.HTTPError, ValueError):
                status = None
        self.health = status if isinstance(status, str) else None
        self._ready = self.health in READY_STATES
        return self._ready

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self.check_health()

    # -- generate -------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        if self._client is None:
            raise BackendUnavailable(f"{self.spec.name}: not started")
        inputs = to_inputs(request, self.settings.mapping)
        with self._loads.track():
            # In parallel the clock gets the slowest prediction's wait and predict time; one after another, the sum.
            outcomes = await fan_out([lambda k, body=body: self._predict(request, body, k) for body in inputs],
                                     clock, parallel=self.settings.parallel)
        predict = [seconds for _, seconds in outcomes if seconds is not None]  # billed: the sum
        images = tuple(image for batch, _ in outcomes for image in batch)
        return ImageResult(images=images, usage=Usage(
            images=len(images), megapixels=request.megapixels * len(images), steps=request.steps,
            predict_seconds=sum(predict) if predict else None,
        ))

    async def _predict(self, request: ImageRequest, model_input: dict[str, Any],
                       clock: StageClock) -> tuple[list[Image], float | None]:
        assert self._client is not None
        name = self.spec.name
        prediction_id = uuid.uuid4().hex
        busy_until = time.monotonic() + self.settings.busy_wait_s
        if request.deadline is not None:
            busy_until = min(busy_until, request.deadline)
        pause = 0.02
        while True:
            try:
                response = await self._put(request, prediction_id, model_input, clock)
            except BackendUnavailable:
                self._ready = False  # the health loop brings it back
                raise
            except BaseException:
                # Cancelled, timed out or broken mid-answer: the prediction may be running; nobody will read it.
                await self._cancel_shielded(prediction_id)
                raise
            if response.status_code != 409:
                break
            if time.monotonic() + pause > busy_until:
                raise BackendQueueFull(f"{name}: busy (409): every prediction slot is taken")
            # Re-sending the same id is safe: a 409 means the container did not take this prediction.
            with clock.waiting():
                await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        raise_for_status(response, backend=name, secrets=self._secrets)
        if response.status_code == 202:
            # Only a prediction with this id already running answers 202; we cannot read its result.
            await self._cancel_shielded(prediction_id)
            raise BackendProtocolError(f"{name}: prediction {prediction_id} was already running")
        prediction = from_prediction(json_body(response, backend=name), backend=name)
        if prediction.status == "failed":
            error = scrub(prediction.error or "no error given", self._secrets)
            raise classify_failure(prediction.error)(f"{name}: prediction failed: {error}")
        if prediction.status == "canceled":
            remaining = request.remaining()
            if remaining is not None and remaining <= 1.0:
                raise BackendTimeout(f"{name}: prediction canceled at the deadline")
            raise BackendFailed(f"{name}: prediction was canceled")
        if prediction.status != "succeeded":
            raise BackendProtocolError(f"{name}: synchronous prediction answered {prediction.status!r}")
        if not prediction.outputs:
            raise BackendProtocolError(f"{name}: prediction succeeded without output")
        predict = prediction.timings.get("remote_predict")
        if predict is not None:
            clock.stage("remote_predict", predict)
        s = self.settings
        if self._fetcher is None:
            raise BackendUnavailable(f"{name}: not started")
        images = await fetch_images(self._fetcher, prediction.outputs, clock, backend=name,
                                    allowed_hosts=s.allowed_output_hosts, max_bytes=s.max_output_bytes,
                                    timeout=s.output_timeout)
        return images, predict

    async def _put(self, request: ImageRequest, prediction_id: str, model_input: dict[str, Any],
                   clock: StageClock) -> httpx.Response:
        assert self._client is not None
        t = self.spec.timeouts
        attempt = 0
        while True:
            http_request = self._client.build_request(
                "PUT", f"/predictions/{prediction_id}", json={"id": prediction_id, "input": model_input},
                timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.connect),
            )
            try:
                return await send(self._client, http_request, clock, backend=self.spec.name, secrets=self._secrets)
            except BackendUnavailable:
                attempt += 1
                backoff = 0.1 * 2**attempt
                remaining = request.remaining()
                if attempt > self.settings.connect_retries or (remaining is not None and remaining <= backoff):
                    raise
                with clock.waiting():
                    await asyncio.sleep(backoff)

    # -- cancellation ---------------------------------------------------------------------------------------

    async def _cancel_shielded(self, prediction_id: str) -> None:
        await self._background.shielded(self.cancel(prediction_id))

    async def cancel(self, prediction_id: str) -> None:
        """Cancel a prediction by id; best effort, within ``cancel_timeout``. A 404 may mean our PUT has not
        been read yet: try again once, briefly.

        cog 0.23 also cancels a synchronous prediction by itself when its connection drops; this matters
        when something between us and the container (a proxy, a load balancer) keeps that connection open,
        and for servers that do not."""
        if self._client is None:
            return
        client = self._client

        async def attempt() -> None:
            for retry in range(2):
                response = await send(client, client.build_request("POST", f"/predictions/{prediction_id}/cancel"),
                                      StageClock(), backend=self.spec.name, secrets=self._secrets)
                if response.status_code != 404 or retry:
                    return
                await asyncio.sleep(0.2)

        await best_effort(attempt(), self.settings.cancel_timeout)
