"""fal backend: the queue API (submit → status → result, cancel on abandonment) or the synchronous ``fal.run``.

Protocol (fal's Inference API):

* queue: ``POST {queue}/{app}[/{path}]`` → ``{request_id, status_url, response_url, cancel_url}``; poll
  ``status_url`` (202 ``IN_QUEUE`` with ``queue_position`` / ``IN_PROGRESS``, 200 ``COMPLETED``, which may still
  carry ``error``/``error_type``); ``GET response_url``; ``PUT cancel_url``. The returned URLs drop the app's
  sub-path, so we use them, but only on the configured queue origin: the key must never travel elsewhere.
* sync: ``POST {run}/{app}`` answers with the output. fal does not retry these; ``X-Fal-Needs-Retry: 1`` marks a
  transient failure, and dropping the connection cancels the work.
* ``X-Fal-Request-Timeout`` (the SDKs' ``start_timeout``) bounds the time before a runner starts; we send the
  smaller of the configured ``start_timeout`` and the time left before the request's deadline. When it expires
  fal answers 504 with ``X-Fal-Request-Timeout-Type: user``: if the deadline set it, nobody waits any more and
  the failure is terminal (``BackendRejected``); if our own ``start_timeout`` set it, another backend may still
  make it in time (``BackendTimeout``, which falls back but is not retried on fal).

Request/response translation (``to_inputs``/``to_input``/``image_size``/``from_output``/``error_for``) is pure.
Output images are fetched with ``backends.http.fetch_output`` from ``allowed_output_hosts`` only, without the
``Authorization`` header (it is set per API request, never on the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import httpx

from backends.base import EMPTY, BackendSpec, Image, ImageRequest, ImageResult, Load, LoadCounter, StageClock, Usage
from backends.http import fetch_output, json_body, make_client, raise_for_status, retry_after_seconds, send
from gateway.errors import (
    BackendError,
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    scrub,
)

T = TypeVar("T")

# fal's named image sizes (fast-sdxl, FLUX and most SDXL-family apps). Models with other presets override them.
PRESETS: Mapping[str, str] = MappingProxyType({
    "square_hd": "1024x1024", "square": "512x512", "portrait_4_3": "768x1024",
    "portrait_16_9": "576x1024", "landscape_4_3": "1024x768", "landscape_16_9": "1024x576",
})
# Infrastructure error types (body ``error_type`` / header ``X-Fal-Error-Type``).
TIMEOUT_TYPES = frozenset({"request_timeout", "startup_timeout"})
OVERLOAD_TYPES = frozenset({"runner_scheduling_failure", "runner_connection_timeout", "runner_disconnected",
                            "runner_connection_refused"})
MIN_START_TIMEOUT = 0.1  # fal refuses smaller X-Fal-Request-Timeout values
MAX_POLL_MISSES = 3  # consecutive transient status-poll failures tolerated while a request is queued/running


def _parse_size(text: str, where: str) -> tuple[int, int]:
    w, sep, h = text.partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"{where}: {text!r} is not WIDTHxHEIGHT")
    return int(w), int(h)


@dataclass(frozen=True, slots=True)
class InputMapping:
    """How a gateway request becomes this model's input. ``*_key: null`` = the model has no such input.

    ``image_size``: ``auto`` sends a preset name when the size is one and ``{width, height}`` otherwise;
    ``preset`` only names (other sizes are refused); ``dims`` always ``{width, height}``.
    ``formats``: the values the model's ``format_key`` accepts; other output formats are left to the gateway.
    """

    image_size: Literal["auto", "preset", "dims"] = "auto"
    presets: Mapping[str, str] | None = None
    image_size_key: str = "image_size"
    num_images_key: str | None = "num_images"
    max_images_per_call: int = 4
    steps_key: str | None = "num_inference_steps"
    guidance_key: str | None = "guidance_scale"
    seed_key: str | None = "seed"
    negative_prompt_key: str | None = "negative_prompt"
    format_key: str | None = "format"
    formats: tuple[str, ...] = ("jpeg", "png")
    sync_mode: bool = False
    enable_safety_checker: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        if self.max_images_per_call < 1:
            raise ValueError("max_images_per_call must be at least 1")
        for name, size in (self.presets or {}).items():
            _parse_size(size, f"presets.{name}")

    def preset_table(self) -> dict[str, tuple[int, int]]:
        table = PRESETS if self.presets is None else self.presets
        return {name: _parse_size(size, name) for name, size in table.items()}


@dataclass(frozen=True, slots=True)
class FalSettings:
    """The ``settings:`` block of a ``type: fal`` backend."""

    key: str
    app: str
    mode: Literal["queue", "sync"] = "queue"
    queue_base_url: str = "https://queue.fal.run"
    run_base_url: str = "https://fal.run"
    poll_interval: float = 0.25
    start_timeout: float | None = None
    allowed_output_hosts: tuple[str, ...] = ("fal.media", "*.fal.media")
    max_output_bytes: int = 50 * 1024 * 1024
    output_timeout: float = 30.0
    cancel_timeout: float = 5.0
    input: InputMapping = field(default_factory=InputMapping)

    def __post_init__(self) -> None:
        if not self.key.strip():
            raise ValueError("key is empty (set it from ${FAL_KEY})")
        parts = self.app.split("/")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"app must look like owner/name[/path], got {self.app!r}")
        for name in ("queue_base_url", "run_base_url"):
            if not getattr(self, name).startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        if self.poll_interval <= 0 or self.cancel_timeout <= 0 or self.output_timeout <= 0:
            raise ValueError("poll_interval, cancel_timeout and output_timeout must be positive")
        if self.start_timeout is not None and self.start_timeout <= MIN_START_TIMEOUT:
            raise ValueError(f"start_timeout must be more than {MIN_START_TIMEOUT}s")


# -- pure translation -------------------------------------------------------------------------------


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
        raise InvalidRequest(f"size {width}x{height} is not one of this model's sizes ({known})", param="size")
    return dims


def to_input(request: ImageRequest, mapping: InputMapping, n: int | None = None, seed: int | None = None) -> dict:
    """The input of one fal call producing ``n`` images (default ``request.n``) with ``seed``."""
    n = request.n if n is None else n
    payload: dict[str, Any] = {"prompt": request.prompt,
                               mapping.image_size_key: image_size(request.width, request.height, mapping)}
    if mapping.num_images_key:
        payload[mapping.num_images_key] = n
    optional = ((mapping.negative_prompt_key, request.negative_prompt), (mapping.steps_key, request.steps),
                (mapping.guidance_key, request.guidance_scale), (mapping.seed_key, seed))
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
    per_call = mapping.max_images_per_call if mapping.num_images_key else 1
    return [min(per_call, n - done) for done in range(0, n, per_call)]


def to_inputs(request: ImageRequest, mapping: InputMapping) -> list[dict]:
    """One input per fal call (see ``split_counts``), run in parallel. Each call's seed is offset by the
    images before it, so a seeded request gives distinct, reproducible images, not one image n times."""
    inputs, done = [], 0
    for n in split_counts(request.n, mapping):
        inputs.append(to_input(request, mapping, n, None if request.seed is None else request.seed + done))
        done += n
    return inputs


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
        refs.append(FalImageRef(item["url"], item.get("content_type"),
                                w if isinstance(w, int) else None, h if isinstance(h, int) else None))
    timings = payload.get("timings")
    predict = None
    if isinstance(timings, Mapping):
        numbers = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        predict = numbers.get("inference", sum(numbers.values()) if numbers else None)
    seed = payload.get("seed")
    nsfw = payload.get("has_nsfw_concepts")
    return FalOutput(tuple(refs), seed if isinstance(seed, int) else None, predict,
                     tuple(bool(x) for x in nsfw) if isinstance(nsfw, list) else ())


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


def error_for(response: httpx.Response, *, backend: str, secrets: tuple[str, ...] = (),
              deadline_bound: bool = True) -> BackendError | None:
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


def _same_origin(url: str, base: str) -> bool:
    try:
        a, b = httpx.URL(url), httpx.URL(base)
    except httpx.InvalidURL:
        return False
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


# -- the backend --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    output: FalOutput
    queue_s: float | None
    predict_s: float | None


async def _timed_gather(clock: StageClock, aws: list[Awaitable[T]], clocks: list[StageClock]) -> list[T]:
    """Run awaitables concurrently, each with its own clock; charge ``clock`` the longest wait, not the sum
    (parallel waits overlap). On failure, cancel the others (which cancels their remote work) and re-raise."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        clock.add_wait(max((c.backend_s for c in clocks), default=0.0))


class FalBackend:
    """``type: fal``. See the module docstring for the protocol and the error mapping."""

    Settings = FalSettings

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.settings: FalSettings = spec.settings
        self._client: httpx.AsyncClient | None = None
        self._load = LoadCounter()
        self._cancels: set[asyncio.Task] = set()  # shielded remote cancels still in flight
        self._secrets = (self.settings.key,)
        owner, alias = self.settings.app.split("/")[:2]
        self._requests_base = f"{self.settings.queue_base_url.rstrip('/')}/{owner}/{alias}/requests"

    async def start(self) -> None:
        self._client = make_client(self.spec)

    async def aclose(self) -> None:
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=self.settings.cancel_timeout)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def ready(self) -> bool:
        return self._client is not None

    def load(self) -> Load:
        return self._load.snapshot()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        if self._client is None:
            raise BackendUnavailable(f"{self.spec.name}: not started")
        inputs = to_inputs(request, self.settings.input)
        clocks = [StageClock() for _ in inputs]
        with self._load.track():
            calls = await _timed_gather(clock, [self._call(p, request, c) for p, c in zip(inputs, clocks)], clocks)
            counts = split_counts(request.n, self.settings.input)
            refs = [ref for call, n in zip(calls, counts) for ref in call.output.images[:n]]
            if len(refs) < request.n:
                raise BackendProtocolError(f"{self.spec.name}: asked for {request.n} images, got {len(refs)}")
            fetch_clocks = [StageClock() for _ in refs]
            fetched = await _timed_gather(clock, [self._fetch(r.url, c) for r, c in zip(refs, fetch_clocks)],
                                          fetch_clocks)
        queue = [c.queue_s for c in calls if c.queue_s is not None]
        predict = [c.predict_s for c in calls if c.predict_s is not None]
        if queue:
            clock.stage("remote_queue", max(queue))  # the calls ran side by side: wall time, not the sum
        if predict:
            clock.stage("remote_predict", max(predict))
        megapixels = sum((r.width or request.width) * (r.height or request.height) for r in refs) / 1e6
        usage = Usage(images=len(refs), megapixels=megapixels, steps=request.steps,
                      predict_seconds=sum(predict) if predict else None)
        return ImageResult(tuple(Image(format=fmt, data=data) for data, fmt in fetched), usage)

    # -- one fal call ---------------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.settings.key}"}

    def _start_headers(self, request: ImageRequest) -> tuple[dict[str, str], bool]:
        """Auth plus ``X-Fal-Request-Timeout``; also whether the deadline (not start_timeout) set it."""
        headers = self._auth()
        limit, remaining = self.settings.start_timeout, request.remaining()
        deadline_bound = remaining is not None and (limit is None or remaining <= limit)
        value = remaining if deadline_bound else limit
        if value is not None:
            if value <= MIN_START_TIMEOUT:
                raise BackendTimeout(f"{self.spec.name}: too little time left to start a fal request")
            headers["X-Fal-Request-Timeout"] = f"{value:.3f}"
        return headers, deadline_bound

    async def _api(self, method: str, url: str, clock: StageClock, *, deadline_bound: bool = True,
                   **kwargs: Any) -> Any:
        assert self._client is not None
        kwargs.setdefault("headers", self._auth())
        response = await send(self._client, self._client.build_request(method, url, **kwargs), clock,
                              backend=self.spec.name, secrets=self._secrets)
        error = error_for(response, backend=self.spec.name, secrets=self._secrets, deadline_bound=deadline_bound)
        if error is not None:
            raise error
        return json_body(response, backend=self.spec.name)

    async def _call(self, payload: dict, request: ImageRequest, clock: StageClock) -> _Call:
        headers, deadline_bound = self._start_headers(request)
        if self.settings.mode == "sync":
            url = f"{self.settings.run_base_url.rstrip('/')}/{self.settings.app}"
            body = await self._api("POST", url, clock, json=payload, headers=headers, deadline_bound=deadline_bound)
            output = from_output(body)
            return _Call(output, None, output.predict_seconds)
        url = f"{self.settings.queue_base_url.rstrip('/')}/{self.settings.app}"
        submitted = await self._api("POST", url, clock, json=payload, headers=headers,
                                    deadline_bound=deadline_bound)
        return await self._follow(submitted, request, clock, deadline_bound)

    def _urls(self, submitted: Any) -> tuple[str, str, str]:
        """status/response/cancel URLs from the submit answer, only if on the queue origin."""
        if not isinstance(submitted, Mapping) or not isinstance(submitted.get("request_id"), str):
            raise BackendProtocolError(f"{self.spec.name}: submit answer has no request_id")
        base = f"{self._requests_base}/{submitted['request_id']}"
        urls = (submitted.get("status_url") or f"{base}/status", submitted.get("response_url") or base,
                submitted.get("cancel_url") or f"{base}/cancel")
        for url in urls:
            if not isinstance(url, str) or not _same_origin(url, self.settings.queue_base_url):
                self._spawn_cancel(f"{base}/cancel")  # the request exists: don't leave it running
                raise BackendProtocolError(f"{self.spec.name}: queue URL outside {self.settings.queue_base_url}")
        return urls  # type: ignore[return-value]

    async def _follow(self, submitted: Any, request: ImageRequest, clock: StageClock, deadline_bound: bool) -> _Call:
        status_url, response_url, cancel_url = self._urls(submitted)
        started, queue_s, completed = time.monotonic(), None, False
        total_deadline = started + self.spec.timeouts.total
        deadline = min(total_deadline, request.deadline) if request.deadline is not None else total_deadline
        misses, state = 0, "IN_QUEUE"
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
                if state == "COMPLETED":
                    completed = True
                    break
                if state != "IN_QUEUE" and state != "IN_PROGRESS":
                    raise BackendProtocolError(f"{self.spec.name}: unknown queue status {scrub(str(state))!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendTimeout(f"{self.spec.name}: still {state} at the deadline")
                with clock.waiting():
                    await asyncio.sleep(min(self.settings.poll_interval, left))
            result = await self._result(status, response_url, clock, deadline_bound)
        except BaseException:
            if not completed:
                await self._cancel_shielded(cancel_url)
            raise
        metrics = status.get("metrics")
        predict = result.predict_seconds
        if predict is None and isinstance(metrics, Mapping) and isinstance(metrics.get("inference_time"), (int, float)):
            predict = float(metrics["inference_time"])
        return _Call(result, queue_s, predict)

    async def _result(self, status: Mapping, response_url: str, clock: StageClock, deadline_bound: bool) -> FalOutput:
        body = await self._api("GET", response_url, clock, deadline_bound=deadline_bound)
        error, error_type = status.get("error"), status.get("error_type")
        if error or error_type:  # COMPLETED with an error, yet the result URL answered 2xx
            text = f"{self.spec.name}: {error_type or 'error'}: {scrub(str(error or ''), self._secrets)}"
            if error_type in TIMEOUT_TYPES:
                raise BackendTimeout(text)
            if error_type in OVERLOAD_TYPES:
                raise BackendOverloaded(text)
            raise BackendFailed(text)
        return from_output(body)

    async def _fetch(self, url: str, clock: StageClock) -> tuple[bytes, str]:
        assert self._client is not None
        return await fetch_output(self._client, url, clock, backend=self.spec.name,
                                  allowed_hosts=self.settings.allowed_output_hosts,
                                  max_bytes=self.settings.max_output_bytes, timeout=self.settings.output_timeout)

    # -- cancellation ----------------------------------------------------------------------------------

    async def _put_cancel(self, url: str) -> None:
        if self._client is None:
            return
        with contextlib.suppress(Exception):  # best effort: the request may be gone or already done
            await asyncio.wait_for(
                self._client.put(url, headers=self._auth(), timeout=self.settings.cancel_timeout),
                self.settings.cancel_timeout,
            )

    def _spawn_cancel(self, url: str) -> asyncio.Task:
        task = asyncio.ensure_future(self._put_cancel(url))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        return task

    async def _cancel_shielded(self, url: str) -> None:
        """Cancel remote work nobody waits for. Shielded: our own task is usually being cancelled right now,
        and the PUT must still go out; a second cancellation stops the wait, not the PUT."""
        await asyncio.shield(self._spawn_cancel(url))


