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
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx

from backends.base import EMPTY, BackendSpec, Image, ImageRequest, ImageResult, StageClock
from backends.errors import BackendError, BackendProtocolError, BackendQueueFull, BackendUnavailable
from backends.predictions import Family, InputMapping, from_prediction, raise_for_outcome, resolve_mapping, to_inputs
from backends.remote import Outputs, RemoteBackend, best_effort, fan_out, usage

READY_STATES = frozenset({"READY", "BUSY"})


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``settings:`` block of a ``type: cog`` backend."""

    base_url: str
    # Input schema preset (see backends.predictions.FAMILIES) and per-field overrides of it.
    family: Family = "sdxl"
    input: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    extra_input: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
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


class CogBackend(RemoteBackend[Settings]):
    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        s: Settings = spec.settings
        self.health: str | None = None  # last /health-check status, for logs and tests
        # api_token: for an authenticating proxy in front of the container (cog itself has no auth).
        super().__init__(
            spec,
            base_url=s.base_url.rstrip("/"),
            key=s.api_token,
            headers={"User-Agent": "imagegate"},
            outputs=Outputs(s.allowed_output_hosts, s.max_output_bytes, s.output_timeout),
            cancel_timeout=s.cancel_timeout,
            health_interval=s.health_interval,
        )

    async def probe(self) -> bool:
        """One ``GET /health-check``: READY or BUSY (reachable and set up) is ready."""
        status = None
        try:
            response = await self.send(
                "GET", "/health-check", StageClock(), timeout=min(5.0, self.settings.health_interval)
            )
            body = response.json() if response.status_code == 200 else None
            status = body.get("status") if isinstance(body, Mapping) else None
        except (BackendError, httpx.HTTPError, ValueError):
            status = None
        self.health = status if isinstance(status, str) else None
        return self.health in READY_STATES

    # -- generate -------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        inputs = to_inputs(request, self.settings.mapping)
        with self.loads.track():
            # In parallel the clock gets the slowest prediction's wait and predict time; one after another, the sum.
            outcomes = await fan_out(
                [partial(self._predict, request, body) for body in inputs], clock, parallel=self.settings.parallel
            )
        images = tuple(image for batch, _ in outcomes for image in batch)
        return ImageResult(images, usage(request, len(images), predict=(seconds for _, seconds in outcomes)))

    async def _predict(
        self, request: ImageRequest, model_input: dict[str, Any], clock: StageClock
    ) -> tuple[list[Image], float | None]:
        prediction_id = uuid.uuid4().hex
        busy_until = time.monotonic() + self.settings.busy_wait_s
        if request.deadline is not None:
            busy_until = min(busy_until, request.deadline)
        pause = 0.02
        while True:
            try:
                response = await self._put(request, prediction_id, model_input, clock)
            except BackendUnavailable:
                self.unreachable()  # the health loop brings it back
                raise
            except BaseException:
                # Cancelled, timed out or broken mid-answer: the prediction may be running; nobody will read it.
                await self.cancel_shielded(self._cancel(prediction_id))
                raise
            if response.status_code != 409:
                break
            if time.monotonic() + pause > busy_until:
                raise BackendQueueFull(f"{self.name}: busy (409): every prediction slot is taken")
            # Re-sending the same id is safe: a 409 means the container did not take this prediction.
            with clock.waiting():
                await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        self.raise_for_status(response)
        if response.status_code == 202:
            # Only a prediction with this id already running answers 202; we cannot read its result.
            await self.cancel_shielded(self._cancel(prediction_id))
            raise BackendProtocolError(f"{self.name}: prediction {prediction_id} was already running")
        prediction = from_prediction(self.json_body(response), backend=self.name)
        raise_for_outcome(prediction, request, backend=self.name, secrets=self.secrets)
        predict = prediction.timings.get("remote_predict")
        if predict is not None:
            clock.stage("remote_predict", predict)
        return await self.fetch(prediction.outputs, clock), predict

    async def _put(
        self, request: ImageRequest, prediction_id: str, model_input: dict[str, Any], clock: StageClock
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self.send(
                    "PUT", f"/predictions/{prediction_id}", clock, json={"id": prediction_id, "input": model_input}
                )
            except BackendUnavailable:
                attempt += 1
                backoff = 0.1 * 2**attempt
                remaining = request.remaining()
                if attempt > self.settings.connect_retries or (remaining is not None and remaining <= backoff):
                    raise
                with clock.waiting():
                    await asyncio.sleep(backoff)

    # -- cancellation ---------------------------------------------------------------------------------------

    async def cancel(self, prediction_id: str) -> None:
        """Cancel a prediction by id; best effort, within ``cancel_timeout``.

        cog 0.23 also cancels a synchronous prediction by itself when its connection drops; this matters
        when something between us and the container (a proxy, a load balancer) keeps that connection open,
        and for servers that do not."""
        await best_effort(self._cancel(prediction_id), self.cancel_timeout)

    async def _cancel(self, prediction_id: str) -> None:
        """``POST /predictions/{id}/cancel`` (callers bound it and ignore its failures). A 404 may mean our
        PUT has not been read yet: try again once, briefly."""
        for retry in range(2):
            response = await self.send("POST", f"/predictions/{prediction_id}/cancel", StageClock())
            if response.status_code != 404 or retry:
                return
            await asyncio.sleep(0.2)
