"""Policy layered around ``backend.generate``, the way httpx layers redirects and auth around ``send``::

    dispatch ─► fallback chain (over the router's candidates)
             ─► retry on the same backend (only when no work can have started; Retry-After aware)
             ─► single attempt (concurrency limit, per-attempt timeout, wire timing, output check)
             ─► backend.generate

The output check belongs to the attempt: every image must be a decodable image of the format the client
asked for (transcoded in a thread when it is not), so an unreadable answer is that backend's failure
(``BackendProtocolError``) and the request falls through to the next candidate. A queue that is full
(``BackendQueueFull``, this dispatcher's own ``max_concurrency`` included) falls through at once; only an
upstream that asked us to wait (``BackendOverloaded`` with Retry-After) is retried in place.

Everything happens within the request's deadline. The error class of a failure decides what happens next
(see ``backends.errors``); the result or the final error carries the list of attempts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from backends import imaging
from backends.base import Backend, ImageRequest, ImageResult, StageClock
from backends.errors import (
    AllCandidatesFailed,
    AllCandidatesOverloaded,
    AttemptRecord,
    BackendError,
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendQueueFull,
    BackendTimeout,
    CallerError,
    DeadlineExceeded,
    ImagegateError,
    scrub,
)
from gateway import router
from gateway.config import Config
from gateway.cost import settle
from gateway.logs import get_logger
from gateway.stats import StatsBook
from gateway.timing import RequestTiming

# Outcomes after which "every backend is busy, come back later" (503 + Retry-After) is the honest answer.
_log = get_logger("imagegate.dispatch")
_OVERLOADED = frozenset(f"{c.family}.{c.code}" for c in (BackendOverloaded, BackendQueueFull))
# Called after every attempt:
# (backend, outcome label, seconds waited on the backend, backend-reported stage seconds)
AttemptHook = Callable[[str, str, float, Mapping[str, float]], None]


@dataclass(frozen=True, slots=True)
class Served:
    result: ImageResult
    backend: str
    route: str
    tier: str | None
    cost_usd: float | None
    attempts: tuple[AttemptRecord, ...]


class DispatchFailed(Exception):
    """Carries the final vocabulary error plus what was known about routing when it happened."""

    def __init__(self, error: ImagegateError, route: str | None, attempts: tuple[AttemptRecord, ...]) -> None:
        super().__init__(error.message)
        self.error, self.route, self.attempts = error, route, attempts


class Dispatcher:
    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        stats: StatsBook,
        on_attempt: AttemptHook | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.stats = stats
        self.on_attempt = on_attempt
        self._limits = {name: asyncio.Semaphore(b.spec.max_concurrency) for name, b in config.backends.items()}

    async def dispatch(self, request: ImageRequest, timing: RequestTiming, max_cost_usd: float | None) -> Served:
        """Serve ``request`` or raise ``DispatchFailed``."""
        route_name = None
        attempts: list[AttemptRecord] = []
        try:
            tier = router.resolve_tier(request, self.config)
            route = router.select_route(request, tier, self.config)
            route_name = route.name  # known even when no candidate survives ranking
            plan = router.rank(request, route, tier, self.config, self.stats.snapshot(), time.monotonic(),
                               max_cost_usd)
            return await self._fallback_chain(request, plan, timing, attempts)
        except ImagegateError as exc:
            raise DispatchFailed(exc, route_name, tuple(attempts)) from None

    async def _fallback_chain(
        self, request: ImageRequest, plan: router.Plan, timing: RequestTiming, attempts: list[AttemptRecord]
    ) -> Served:
        last: ImagegateError | None = None
        for cand in plan.candidates:
            req = dataclasses.replace(request, options=cand.options) if cand.options else request
            try:
                result = await self._with_retries(req, cand.backend, timing, attempts)
            except ImagegateError as exc:
                last = exc
                if not exc.fallback:
                    raise
                if request.remaining() is not None and request.remaining() <= 0:
                    break
                continue
            cost = settle(self.config.backends[cand.backend].cost, req, result.usage)
            tier = plan.tier.name if plan.tier else None
            return Served(result, cand.backend, plan.route.name, tier, cost, tuple(attempts))
        raise self._exhausted(attempts, last, request)

    async def _with_retries(
        self, request: ImageRequest, name: str, timing: RequestTiming, attempts: list[AttemptRecord]
    ) -> ImageResult:
        server = self.config.server
        tries = 0
        while True:
            try:
                return await self._attempt(request, name, timing, attempts)
            except BackendError as exc:
                tries += 1
                if not exc.retry_same or tries > server.max_retries:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else server.retry_backoff_s * tries
                remaining = request.remaining()
                # Honour Retry-After only when it fits: otherwise fall back now rather than sleep past the deadline.
                if wait > server.max_retry_after_s or (remaining is not None and wait >= remaining):
                    raise
                await asyncio.sleep(wait)

    async def _attempt(
        self, request: ImageRequest, name: str, timing: RequestTiming, attempts: list[AttemptRecord]
    ) -> ImageResult:
        backend = self.backends[name]
        limit = self._limits[name]
        clock = StageClock()
        started = time.perf_counter()
        outcome = "ok"
        try:
            if limit.locked():
                # Our own limit: waiting for a slot would only queue here, so fall through now.
                wait = backend.load().est_wait_s
                raise BackendQueueFull(f"{name}: at max_concurrency={backend.spec.max_concurrency}",
                                       retry_after=wait if wait > 0 else None)
            timeout = backend.spec.timeouts.total
            remaining = request.remaining()
            if remaining is not None:
                if remaining <= 0:
                    raise DeadlineExceeded("the request deadline passed before this attempt")
                timeout = min(timeout, remaining)
            async with limit:
                try:
                    async with asyncio.timeout(timeout):
                        result = await backend.generate(request, clock)
                        if len(result.images) != request.n:
                            raise BackendFailed(f"{name}: returned {len(result.images)} images, {request.n} asked")
                        result = await _conform(result, request, name)
                except TimeoutError:
                    raise BackendTimeout(f"{name}: no answer within {timeout:.1f}s") from None
            usage = result.usage
            billed = usage.gpu_seconds if usage.gpu_seconds is not None else usage.predict_seconds
            self.stats.record_success(name, time.perf_counter() - started, request.n, billed)
            return result
        except ImagegateError as exc:
            outcome = exc.outcome
            # A full queue is load, not ill health: the router already demotes by estimated wait.
            if isinstance(exc, BackendError) and exc.fallback and not isinstance(exc, BackendQueueFull):
                self.stats.record_failure(name)
            attempts.append(AttemptRecord(name, exc.outcome, exc.message, exc.retry_after))
            raise
        except asyncio.CancelledError:
            outcome = "gateway.client_disconnected"
            raise
        except Exception as exc:  # a backend bug: contain it, report it as that backend's failure
            outcome = "backend.backend_failed"
            # The traceback is what makes the bug fixable; the log processor scrubs secrets from it.
            _log.error("backend_bug", backend=name, request_id=request.request_id, exc_info=exc)
            self.stats.record_failure(name)
            message = f"{name}: unexpected {type(exc).__name__}: {scrub(str(exc), self.config.secrets)}"
            attempts.append(AttemptRecord(name, outcome, message))
            raise BackendFailed(message) from None
        finally:
            timing.absorb(clock)
            if self.on_attempt is not None:
                self.on_attempt(name, outcome, clock.backend_s, clock.stages)

    def _exhausted(
        self, attempts: list[AttemptRecord], last: ImagegateError | None, request: ImageRequest
    ) -> ImagegateError:
        if isinstance(last, CallerError):
            return last
        tried = "; ".join(f"{a.backend}: {a.message}" for a in attempts) or "no attempt was made"
        remaining = request.remaining()
        if remaining is not None and remaining <= 0:
            return DeadlineExceeded(f"deadline exceeded after {len(attempts)} attempt(s): {tried}")
        if attempts and all(a.outcome in _OVERLOADED for a in attempts):
            # The soonest any of them expects to have room (asked for, or its own queue estimate).
            waits = [a.retry_after for a in attempts if a.retry_after is not None]
            return AllCandidatesOverloaded(f"every backend is busy: {tried}", retry_after=min(waits, default=None))
        return AllCandidatesFailed(f"every backend failed: {tried}")


async def _conform(result: ImageResult, request: ImageRequest, name: str) -> ImageResult:
    """``result`` with every image a verified image of the requested format (see ``imaging.conform``).

    The common case (already that format, no compression asked) costs a constant-time framing check per
    image on the event loop and passes the bytes or base64 text on untouched; anything else is decoded
    and, when needed, re-encoded in a thread. Raises ``BackendProtocolError`` naming the bad image."""
    fmt, compression = request.output_format, request.output_compression
    images = result.images
    if request.response_format != "url" and any(img.url is not None for img in images):
        raise BackendProtocolError(f"{name}: answered with an image URL where image data was needed")
    work = [i for i, img in enumerate(images) if imaging.needs_work(img, fmt, compression)]
    if not work and all(img.url is not None or img.format == fmt for img in images):
        return result  # the hot path: nothing to copy, nothing to decode
    out = [img if img.url is not None or img.format == fmt else dataclasses.replace(img, format=fmt)
           for img in images]  # well framed as ``fmt`` but labelled otherwise: the label was wrong

    async def one(i: int) -> None:
        try:
            out[i] = await asyncio.to_thread(imaging.conform, images[i], fmt, compression)
        except imaging.UnreadableImage as exc:
            raise BackendProtocolError(
                f"{name}: image {i + 1} of {len(images)} is not a readable image: {scrub(str(exc), limit=160)}"
            ) from None

    await asyncio.gather(*(one(i) for i in work))
    return dataclasses.replace(result, images=tuple(out))
