"""The backend contract: what the gateway hands a backend, and what it gets back.

A backend is one object with one working method::

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult

plus lifecycle (``start``/``aclose``), readiness and a load snapshot. Everything else (retries, fallback,
deadlines, pricing, rendering) is policy layered around it by the gateway, the way httpx layers
redirects and auth around ``transport.handle_async_request``.

Routing decisions belong to the router, which only sends a backend what its ``Capabilities`` accept, with
route options validated at config load. So a backend never refuses a planned request as the caller's
fault: it raises only ``BackendError`` subclasses of the ``backends.errors`` vocabulary (a defensive check
that trips is a ``BackendFailed``, which falls back); anything else is reported as a backend failure by
the dispatcher. To make that possible a backend *class* may declare, next to its ``Settings``:

``Options``
    a frozen dataclass for ``routes[].candidates[].options``, built at config load with
    ``backends.settings.build`` (unknown keys and wrong values are config errors). The request then
    carries the options as a mapping of the keys the route set, already validated.
``check_options(settings, options) -> None`` (static or class method)
    checks options against the backend's own settings at config load; raises ``ValueError`` or
    ``SettingsError`` (path relative to ``options``).
``capabilities_for(settings, declared) -> Capabilities`` (static or class method)
    narrows the capabilities declared in routes.yaml to what these settings can actually serve (e.g. only
    the compiled shapes), so the router skips the backend for anything else; raises ``ValueError`` or
    ``SettingsError`` (path relative to the backend's entry, e.g. ``settings.shapes``).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")
EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A parsed, validated image-generation request, independent of any wire format.

    ``options`` carries per-route backend options chosen by the router (e.g. ``{"decoder": "taesd"}`` for
    the local backend's preview path); a backend reads the keys it knows and ignores the others.
    ``deadline`` is a ``time.monotonic()`` instant after which nobody waits for the answer.
    ``max_cost_usd`` is the most the caller will pay: the router never plans a backend whose estimate is
    higher or unknown. It is part of what the caller asked, read by the router; backends ignore it.

    The dispatcher hands a backend the request as that backend should serve it: ``output_format`` is one
    of its ``Capabilities.output_formats``, and ``output_compression`` is None, because the gateway applies
    the client's compression itself, in one re-encode with the same meaning whatever the backend.
    """

    prompt: str
    n: int = 1
    width: int = 1024
    height: int = 1024
    model: str | None = None
    tier: str | None = None
    quality: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    output_format: str = "png"
    output_compression: int | None = None
    response_format: str = "b64_json"
    user: str | None = None
    request_id: str = ""
    deadline: float | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    max_cost_usd: float | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class Image:
    """One generated image. Exactly one of ``data`` (encoded bytes), ``b64`` (base64 text as received,
    kept to pass through without a decode/encode round trip) or ``url`` is set."""

    format: str = "png"
    data: bytes | None = None
    b64: str | None = None
    url: str | None = None
    revised_prompt: str | None = None

    def as_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.b64 is not None:
            return base64.b64decode(self.b64)
        raise ValueError("image has only a URL")

    def as_b64(self) -> str:
        if self.b64 is not None:
            return self.b64
        return base64.b64encode(self.as_bytes()).decode("ascii")


@dataclass(frozen=True, slots=True)
class Usage:
    """Inputs to the cost model, as the backend observed them (None = not known)."""

    images: int = 0
    megapixels: float = 0.0
    steps: int | None = None
    gpu_seconds: float | None = None
    predict_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ImageResult:
    images: tuple[Image, ...]
    usage: Usage = field(default_factory=Usage)


class StageClock:
    """Per-attempt timing sink, owned by the dispatcher, filled by the backend.

    ``backend_s`` is time spent *waiting on the backend*: on the wire (first request byte written to last
    response byte read), in poll sleeps, or for the local device worker. The gateway reports
    ``total - sum(backend_s)`` as its own overhead, so a backend must not count its own CPU work
    (JSON building, decoding) here. ``stages`` are backend-reported stage durations in seconds
    (``queue``, ``denoise``, ``remote_predict``...) shown in Server-Timing; they are informational and
    are not added to any total.
    """

    __slots__ = ("backend_s", "stages")

    def __init__(self) -> None:
        self.backend_s = 0.0
        self.stages: dict[str, float] = {}

    def add_wait(self, seconds: float) -> None:
        self.backend_s += seconds

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the enclosed block (an await on remote or device work) as backend time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.backend_s += time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 120.0
    total: float = 300.0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can serve (``capabilities:`` in routes.yaml); the router never sends a request
    outside these.

    ``sizes`` empty means any size within ``max_width``/``max_height`` whose sides are multiples of
    ``size_multiple``. ``max_n_per_size`` lowers ``max_n`` for the sizes it names (e.g. a local backend
    that serves only its compiled shapes: 1024x1024 up to 4 images, 768x1344 one).

    ``negative_prompt: false`` / ``seed: false``: the backend would drop that field, so a request that
    sets it is not sent there (an empty negative prompt asks for nothing and does not count).

    ``output_formats`` are the formats the backend *produces*, never a reason to skip it: the gateway
    converts formats itself. The dispatcher asks the backend for the client's format when it is listed
    and the client set no ``output_compression`` (the images then pass through untouched); otherwise for
    lossless PNG when listed (else the client's format when listed, else the first listed), which the
    gateway re-encodes once into what the client asked (``gateway.dispatch.asked_format``).
    """

    sizes: tuple[str, ...] = ()
    max_width: int = 2048
    max_height: int = 2048
    size_multiple: int = 8
    max_n: int = 4
    max_n_per_size: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    max_steps: int = 100
    output_formats: tuple[OutputFormat, ...] = OUTPUT_FORMATS
    negative_prompt: bool = True
    seed: bool = True

    def __post_init__(self) -> None:
        if not self.output_formats:
            raise ValueError("output_formats: list at least one format the backend produces")

    def refusal(self, request: ImageRequest) -> str | None:
        """Why this backend cannot serve ``request``, or None if it can. Pure; ``output_formats`` is not
        a reason (see the class docstring)."""
        if self.sizes and request.size not in self.sizes:
            return f"size {request.size} not in {', '.join(self.sizes)}"
        if not self.sizes:
            if request.width > self.max_width or request.height > self.max_height:
                return f"size {request.size} exceeds {self.max_width}x{self.max_height}"
            if request.width % self.size_multiple or request.height % self.size_multiple:
                return f"size {request.size} is not a multiple of {self.size_multiple}"
        if request.n > self.max_n:
            return f"n={request.n} exceeds max_n={self.max_n}"
        if self.max_n_per_size:
            limit = self.max_n_per_size.get(request.size)
            if limit is not None and request.n > limit:
                return f"n={request.n} exceeds max_n={limit} for {request.size}"
        if request.steps is not None and request.steps > self.max_steps:
            return f"steps={request.steps} exceeds max_steps={self.max_steps}"
        if request.negative_prompt and not self.negative_prompt:
            return "takes no negative_prompt"
        if request.seed is not None and not self.seed:
            return "takes no seed"
        return None


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What a backend is constructed from: its name, its typed ``settings`` (the dataclass declared by
    its module's ``Settings``), and the gateway-wide per-backend knobs it must honour."""

    name: str
    type: str
    settings: Any
    timeouts: Timeouts = field(default_factory=Timeouts)
    capabilities: Capabilities = field(default_factory=Capabilities)
    max_concurrency: int = 16


@dataclass(frozen=True, slots=True)
class Load:
    """A snapshot of a backend's load, read by the router (through the stats snapshot)."""

    in_flight: int = 0
    queue_depth: int = 0
    est_wait_s: float = 0.0


@runtime_checkable
class Backend(Protocol):
    """The contract every backend implements. See the module docstring."""

    spec: BackendSpec

    @property
    def Settings(self) -> type[Any]:
        """The frozen dataclass of the backend's ``settings:`` block, as a class attribute
        (``Settings = MySettings``). Read-only here, so that such an attribute satisfies the protocol."""

    async def start(self) -> None:
        """Open clients, load and warm models. The gateway is not ready until every required backend
        returned from ``start``."""

    async def aclose(self) -> None:
        """Release everything ``start`` acquired. Called once at shutdown."""

    def ready(self) -> bool:
        """Cheap readiness (no I/O): True once ``start`` finished and the backend can take work."""

    def load(self) -> Load:
        """Cheap load snapshot (no I/O)."""

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        """Produce ``request.n`` images or raise a ``backends.errors`` error. Cancellation (the client
        went away, the deadline passed) arrives as ``asyncio.CancelledError``: stop, and cancel any
        remote work already started, then re-raise."""


@dataclass
class LoadCounter:
    """Helper for backends: counts in-flight calls to compute a ``Load``."""

    in_flight: int = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def snapshot(self) -> Load:
        return Load(in_flight=self.in_flight)
