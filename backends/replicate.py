"""``type: replicate`` — Replicate's hosted predictions API (an official model, a deployment or a version).

One prediction per ``input`` (several, concurrently, when ``n`` exceeds what the model makes per call):

1. create with ``Prefer: wait=N`` (the API holds the request open until the prediction finishes or N s
   pass) and ``Cancel-After`` set from the request deadline, so a prediction we lose track of (a create
   that timed out on our side) is still stopped by Replicate;
2. if the answer is not terminal, poll ``urls.get`` every ``poll_interval`` until it is (``urls.get`` and
   ``urls.cancel`` are followed only on the API's own origin: the token goes with them);
3. fetch the outputs (``data:`` URIs or delivery URLs, only from ``allowed_output_hosts``).

When nobody waits any more (client gone, deadline, a sibling call failed) the prediction is cancelled:
at once if we know its id, or, if the create is still in flight, as soon as its answer tells us the id.

Error mapping (see ``backends.errors``): 429/503 on create → ``BackendOverloaded`` (Retry-After kept),
other 5xx → ``BackendFailed``, 4xx validation → ``BackendRejected``; a ``failed`` prediction →
``BackendRejected`` (the model ran and refused this input: terminal) unless its error reads like an
infrastructure fault (OOM, interrupted, timeout: ``BackendFailed``, falls back) — see
``predictions.classify_failure``; ``aborted`` (never started before Cancel-After) and ``canceled`` after
our deadline → ``BackendTimeout``; ``canceled`` by someone else → ``BackendFailed``. The create is never
retried here: the dispatcher retries only errors that mean it cannot have started (connect errors, 429).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx

from backends.base import EMPTY, BackendSpec, Image, ImageRequest, ImageResult, StageClock
from backends.errors import BackendError, BackendProtocolError, BackendTimeout
from backends.http import retry_after_seconds
from backends.predictions import (
    Family,
    InputMapping,
    Prediction,
    from_prediction,
    raise_for_outcome,
    resolve_mapping,
    to_inputs,
)
from backends.remote import Outputs, RemoteBackend, best_effort, fan_out, same_origin, usage

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VERSION = re.compile(r"^[0-9a-f]{64}$")
# A poll that meets a 429/5xx is retried this many times in a row before we give up on the prediction.
_POLL_ERRORS = 3
# Cancel-After below this is refused or meaningless upstream; our own cancel covers the rest.
_MIN_CANCEL_AFTER_S = 5


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``settings:`` block of a ``type: replicate`` backend. Exactly one of ``model`` (an official
    model, ``owner/name``), ``deployment`` (``owner/name``) or ``version`` (64 hex digits)."""

    api_token: str
    model: str | None = None
    deployment: str | None = None
    version: str | None = None
    base_url: str = "https://api.replicate.com"
    # Input schema preset (see backends.predictions.FAMILIES) and per-field overrides of it.
    family: Family = "sdxl"
    input: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    # Static inputs sent with every prediction.
    extra_input: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    # How long Replicate may hold the create open (1..60 s). Longer saves poll round trips for slow
    # models, but while the create is held we do not know the prediction's id, so a client that goes
    # away is only cancelled upstream once the create answers: up to this many seconds later.
    prefer_wait: int = 10
    poll_interval: float = 1.0
    allowed_output_hosts: tuple[str, ...] = ("replicate.delivery", "*.replicate.delivery")
    max_output_bytes: int = 50 * 1024 * 1024
    output_timeout: float = 30.0
    cancel_timeout: float = 3.0
    mapping: InputMapping = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.api_token.strip():
            raise ValueError("api_token is empty (is REPLICATE_API_TOKEN set?)")
        targets = [n for n in ("model", "deployment", "version") if getattr(self, n) is not None]
        if len(targets) != 1:
            raise ValueError("set exactly one of model, deployment, version")
        for name in ("model", "deployment"):
            value = getattr(self, name)
            if value is not None and not _NAME.match(value):
                raise ValueError(f"{name} must be owner/name, got {value!r}")
        if self.version is not None and not _VERSION.match(self.version):
            raise ValueError("version must be 64 lowercase hex digits")
        if not 1 <= self.prefer_wait <= 60:
            raise ValueError("prefer_wait must be 1..60 seconds")
        if self.poll_interval <= 0 or self.cancel_timeout <= 0 or self.output_timeout <= 0:
            raise ValueError("poll_interval, cancel_timeout and output_timeout must be positive")
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError("base_url must be an http(s) URL")
        object.__setattr__(self, "mapping", resolve_mapping(self.family, self.input, self.extra_input))

    @property
    def create_path(self) -> str:
        if self.model:
            return f"/v1/models/{self.model}/predictions"
        if self.deployment:
            return f"/v1/deployments/{self.deployment}/predictions"
        return "/v1/predictions"


@dataclass(slots=True)
class _Outcome:
    images: list[Image]
    predict_s: float | None


class ReplicateBackend(RemoteBackend[Settings]):
    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        s: Settings = spec.settings
        # The token goes with every API request, and only to the API's own origin (see _api_url).
        super().__init__(
            spec,
            base_url=s.base_url.rstrip("/"),
            key=s.api_token,
            headers={"User-Agent": "imagegate"},
            outputs=Outputs(s.allowed_output_hosts, s.max_output_bytes, s.output_timeout),
            cancel_timeout=s.cancel_timeout,
        )

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        inputs = to_inputs(request, self.settings.mapping)
        with self.loads.track():
            # Concurrent predictions overlap: the clock gets the slowest one's wait and stages.
            outcomes = await fan_out([partial(self._predict, request, body) for body in inputs], clock)
        images = tuple(image for o in outcomes for image in o.images)
        return ImageResult(images, usage(request, len(images), predict=(o.predict_s for o in outcomes)))

    async def _predict(self, request: ImageRequest, model_input: dict[str, Any], clock: StageClock) -> _Outcome:
        create = asyncio.ensure_future(self._create(request, model_input, clock))
        try:
            # Shielded: if we are cancelled while Replicate holds the create open, the create itself
            # goes on so that its answer (the prediction id) lets us cancel the prediction.
            prediction = await asyncio.shield(create)
        except asyncio.CancelledError:
            self.cancel_later(self._cancel_when_created(create), timeout=self._create_wait() + self.cancel_timeout)
            raise
        try:
            prediction = await self._wait_terminal(request, prediction, clock)
        except BaseException:
            # Nobody waits for this prediction any more (cancelled, deadline, unreadable poll answer).
            await self.cancel_shielded(self._cancel(prediction))
            raise
        return await self._finish(request, prediction, clock)

    async def _create(self, request: ImageRequest, model_input: dict[str, Any], clock: StageClock) -> Prediction:
        s = self.settings
        body: dict[str, Any] = {"input": model_input}
        if s.version:
            body["version"] = s.version
        headers: dict[str, str] = {}
        wait = s.prefer_wait
        remaining = request.remaining()
        if remaining is not None:
            wait = max(1, min(wait, int(remaining)))
            headers["Cancel-After"] = f"{max(_MIN_CANCEL_AFTER_S, math.ceil(remaining))}s"
        headers["Prefer"] = f"wait={wait}"
        t = self.spec.timeouts
        timeout = httpx.Timeout(connect=t.connect, read=max(t.read, wait + 5.0), write=t.read, pool=t.connect)
        response = await self.send("POST", s.create_path, clock, json=body, headers=headers, timeout=timeout)
        self.raise_for_status(response)
        prediction = from_prediction(self.json_body(response), backend=self.name)
        if prediction.id is None and not prediction.terminal:
            raise BackendProtocolError(f"{self.name}: prediction without an id")
        return prediction

    async def _wait_terminal(self, request: ImageRequest, prediction: Prediction, clock: StageClock) -> Prediction:
        s = self.settings
        url = self._api_url(prediction.urls.get("get"), f"/v1/predictions/{prediction.id}")
        errors = 0
        delay = s.poll_interval
        while not prediction.terminal:
            remaining = request.remaining()
            if remaining is not None and remaining <= 0:
                raise BackendTimeout(f"{self.name}: prediction still {prediction.status} at the deadline")
            with clock.waiting():
                await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = s.poll_interval
            response = await self.send("GET", url, clock)
            if response.status_code == 429 or response.status_code >= 500:
                # A GET is safe to repeat: a throttled or failing poll says nothing about the prediction.
                errors += 1
                if errors > _POLL_ERRORS:
                    self.raise_for_status(response)
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
                delay = s.poll_interval * 2**errors if retry_after is None else retry_after
                continue
            errors = 0
            self.raise_for_status(response)
            prediction = from_prediction(self.json_body(response), backend=self.name)
        return prediction

    async def _finish(self, request: ImageRequest, prediction: Prediction, clock: StageClock) -> _Outcome:
        if prediction.status == "aborted":
            raise BackendTimeout(f"{self.name}: prediction aborted before it started (Cancel-After passed)")
        raise_for_outcome(prediction, request, backend=self.name, secrets=self.secrets)
        for stage, seconds in prediction.timings.items():  # remote_queue / remote_predict
            clock.stage(stage, seconds)
        images = await self.fetch(prediction.outputs, clock)
        return _Outcome(images=images, predict_s=prediction.timings.get("remote_predict"))

    # -- cancellation ---------------------------------------------------------------------------------------

    def _create_wait(self) -> float:
        """The longest a create can be held open by the API, plus margin."""
        return self.settings.prefer_wait + 10.0

    async def _cancel_when_created(self, create: asyncio.Future[Prediction]) -> None:
        try:
            prediction = await asyncio.wait_for(create, timeout=self._create_wait())
        except (TimeoutError, BackendError):
            return  # no prediction was made, or we will never learn its id (Cancel-After still stops it)
        await best_effort(self._cancel(prediction), self.cancel_timeout)

    async def _cancel(self, prediction: Prediction) -> None:
        """One POST to the prediction's cancel URL (callers bound it and ignore its failures)."""
        if prediction.terminal or prediction.id is None:
            return
        url = self._api_url(prediction.urls.get("cancel"), f"/v1/predictions/{prediction.id}/cancel")
        await self.send("POST", url, StageClock())

    # -- helpers --------------------------------------------------------------------------------------------

    def _api_url(self, url: str | None, fallback: str) -> str:
        """Use the URL the API gave only if it is on the API's own origin: we send the token there."""
        if url and same_origin(url, self.settings.base_url):
            return url
        return fallback
