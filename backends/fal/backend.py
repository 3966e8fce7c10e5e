"""``FalBackend``: the client/queue side of fal (submit → poll → result, cancel on abandonment; or ``fal.run``).

The protocol and the error mapping are described in the package docstring (``backends.fal``); the pure
translation lives in ``backends.fal.mapping``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from backends.base import BackendSpec, Capabilities, ImageRequest, ImageResult, StageClock
from backends.errors import BackendOverloaded, BackendProtocolError, BackendTimeout, BackendUnavailable, scrub
from backends.fal.config import MIN_START_TIMEOUT, FalSettings
from backends.fal.mapping import FalOutput, completed_error, error_for, from_output, split_counts, to_inputs
from backends.remote import Outputs, RemoteBackend, fan_out, same_origin, usage

MAX_POLL_MISSES = 3  # consecutive transient status-poll failures tolerated while a request is queued/running


@dataclass(slots=True)
class _Call:
    output: FalOutput
    predict_s: float | None


class FalBackend(RemoteBackend[FalSettings]):
    """``type: fal``. See the package docstring for the protocol and the error mapping."""

    Settings = FalSettings

    @staticmethod
    def capabilities_for(settings: FalSettings, declared: Capabilities) -> Capabilities:
        """A model that takes only preset size names (``image_size: preset``) can serve only those sizes:
        declare them, so the router skips this backend for any other size instead of asking it."""
        if settings.input.image_size != "preset":
            return declared
        sizes = tuple(f"{w}x{h}" for w, h in settings.input.preset_table().values())
        if declared.sizes:
            sizes = tuple(s for s in sizes if s in declared.sizes)
        return dataclasses.replace(declared, sizes=sizes)

    def __init__(self, spec: BackendSpec) -> None:
        s: FalSettings = spec.settings
        owner, alias = s.app.split("/")[:2]
        self._requests_base = f"{s.queue_base_url.rstrip('/')}/{owner}/{alias}/requests"
        # No base URL: the API spans two origins (queue and run), and the queue answers with absolute URLs.
        super().__init__(
            spec,
            key=s.key,
            key_scheme="Key ",
            urls=(s.queue_base_url, s.run_base_url),
            outputs=Outputs(s.allowed_output_hosts, s.max_output_bytes, s.output_timeout),
            cancel_timeout=s.cancel_timeout,
        )

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        s = self.settings
        inputs = to_inputs(request, s.input)
        with self.loads.track():
            # Side by side: the clock gets the slowest call's wait and stages, not their sum.
            calls = await fan_out([partial(self._call, p, request) for p in inputs], clock)
            counts = split_counts(request.n, s.input)
            refs = [ref for call, n in zip(calls, counts, strict=True) for ref in call.output.images[:n]]
            if len(refs) < request.n:
                raise BackendProtocolError(f"{self.name}: asked for {request.n} images, got {len(refs)}")
            images = await self.fetch([r.url for r in refs], clock)
        megapixels = sum((r.width or request.width) * (r.height or request.height) for r in refs) / 1e6
        return ImageResult(
            tuple(images), usage(request, len(refs), megapixels=megapixels, predict=(c.predict_s for c in calls))
        )

    # -- one fal call ---------------------------------------------------------------------------------

    def _start_headers(self, request: ImageRequest) -> tuple[dict[str, str], bool]:
        """``X-Fal-Request-Timeout``, and whether the deadline (not start_timeout) set it."""
        headers: dict[str, str] = {}
        limit, remaining = self.settings.start_timeout, request.remaining()
        deadline_bound = remaining is not None and (limit is None or remaining <= limit)
        value = remaining if deadline_bound else limit
        if value is not None:
            if value <= MIN_START_TIMEOUT:
                raise BackendTimeout(f"{self.name}: too little time left to start a fal request")
            headers["X-Fal-Request-Timeout"] = f"{value:.3f}"
        return headers, deadline_bound

    async def _api(
        self,
        method: str,
        url: str,
        clock: StageClock,
        *,
        deadline_bound: bool = True,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call whose answer is JSON; fal's errors mapped (see ``mapping.error_for``)."""
        response = await self.send(method, url, clock, headers=headers, json=json, params=params)
        error = error_for(response, backend=self.name, secrets=self.secrets, deadline_bound=deadline_bound)
        if error is not None:
            raise error
        return self.json_body(response)

    async def _call(self, payload: dict[str, Any], request: ImageRequest, clock: StageClock) -> _Call:
        """One fal call; reports ``remote_queue``/``remote_predict`` on ``clock`` (this call's own)."""
        headers, deadline_bound = self._start_headers(request)
        if self.settings.mode == "sync":
            url = f"{self.settings.run_base_url.rstrip('/')}/{self.settings.app}"
            body = await self._api("POST", url, clock, json=payload, headers=headers, deadline_bound=deadline_bound)
            output = from_output(body)
            call = _Call(output, output.predict_seconds)
        else:
            url = f"{self.settings.queue_base_url.rstrip('/')}/{self.settings.app}"
            submitted = await self._api(
                "POST", url, clock, json=payload, headers=headers, deadline_bound=deadline_bound
            )
            call = await self._follow(submitted, request, clock, deadline_bound)
        if call.predict_s is not None:
            clock.stage("remote_predict", call.predict_s)
        return call

    def _urls(self, submitted: Any) -> tuple[str, str, str]:
        """status/response/cancel URLs from the submit answer, only if on the queue origin."""
        if not isinstance(submitted, Mapping) or not isinstance(submitted.get("request_id"), str):
            raise BackendProtocolError(f"{self.name}: submit answer has no request_id")
        base = f"{self._requests_base}/{submitted['request_id']}"
        urls = [
            submitted.get("status_url") or f"{base}/status",
            submitted.get("response_url") or base,
            submitted.get("cancel_url") or f"{base}/cancel",
        ]
        checked = [url for url in urls if isinstance(url, str) and same_origin(url, self.settings.queue_base_url)]
        if len(checked) != len(urls):
            self.cancel_later(self._cancel(f"{base}/cancel"))  # the request exists: don't leave it
            raise BackendProtocolError(f"{self.name}: queue URL outside {self.settings.queue_base_url}")
        status_url, response_url, cancel_url = checked
        return status_url, response_url, cancel_url

    async def _follow(self, submitted: Any, request: ImageRequest, clock: StageClock, deadline_bound: bool) -> _Call:
        status_url, response_url, cancel_url = self._urls(submitted)
        started, queue_s, completed = time.monotonic(), None, False
        total_deadline = started + self.spec.timeouts.total
        deadline = min(total_deadline, request.deadline) if request.deadline is not None else total_deadline
        misses = 0
        state: object = "IN_QUEUE"  # the last status read, whatever it was (checked below)
        try:
            while True:
                try:
                    status = await self._api("GET", status_url, clock, params={"logs": "0"})
                    state, misses = status.get("status") if isinstance(status, Mapping) else None, 0
                except (BackendUnavailable, BackendOverloaded, BackendProtocolError):
                    # A status blip must not throw away work that is queued or running: poll again.
                    misses += 1
                    if misses > MAX_POLL_MISSES:
                        raise
                if state in ("IN_PROGRESS", "COMPLETED") and queue_s is None:
                    queue_s = time.monotonic() - started
                    clock.stage("remote_queue", queue_s)
                if state == "COMPLETED":
                    completed = True
                    break
                if state != "IN_QUEUE" and state != "IN_PROGRESS":
                    raise BackendProtocolError(f"{self.name}: unknown queue status {scrub(str(state))!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendTimeout(f"{self.name}: still {state} at the deadline")
                with clock.waiting():
                    await asyncio.sleep(min(self.settings.poll_interval, left))
            result = await self._result(status, response_url, clock, deadline_bound)
        except BaseException:
            if not completed:
                await self.cancel_shielded(self._cancel(cancel_url))
            raise
        metrics = status.get("metrics")
        predict = result.predict_seconds
        if predict is None and isinstance(metrics, Mapping) and isinstance(metrics.get("inference_time"), (int, float)):
            predict = float(metrics["inference_time"])
        return _Call(result, predict)

    async def _result(
        self, status: Mapping[str, Any], response_url: str, clock: StageClock, deadline_bound: bool
    ) -> FalOutput:
        body = await self._api("GET", response_url, clock, deadline_bound=deadline_bound)
        # COMPLETED with an error, yet the result URL answered 2xx.
        error = completed_error(status, backend=self.name, secrets=self.secrets)
        if error is not None:
            raise error
        return from_output(body)

    async def _cancel(self, url: str) -> None:
        """``PUT`` the cancel URL of a queued/running request (callers bound it and ignore its failures)."""
        await self.send("PUT", url, StageClock())
