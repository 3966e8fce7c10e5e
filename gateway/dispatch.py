"""Policy layered around ``backend.generate``, the way httpx layers redirects and auth around ``send``::

    dispatch ─► fallback chain (over the router's candidates)
             ─► retry on the same backend (only when no work can have started; Retry-After aware)
             ─► single attempt (concurrency limit, per-attempt timeout, wire timing, output check)
             ─► backend.generate

The output format is decided here, once per candidate (``asked_format``): the backend is asked for the client's
format when it produces it, else for one it does, and the gateway converts. The output check belongs to
the attempt: every image must be a decodable image of the format the client asked for (converted in a
thread when it is not, or when a compression was asked), so an unreadable answer is that backend's failure
(``BackendProtocolError``) and the request falls through to the next candidate. A queue that is full
(``BackendQueueFull``, this dispatcher's own ``max_concurrency`` included) falls through at once; only an
upstream that asked us to wait (``BackendOverloaded`` with Retry-After) is retried in place.

Everything happens within the request's deadline. The error class of a failure decides what happens next
(see ``backends.errors``). The dispatcher reads the request from the ``RequestContext`` and records there
what it decides (route, tier, attempts, timing, who served at what cost); the final error is raised as is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

from backends import imaging
from backends.base import Backend, Capabilities, ImageRequest, ImageResult, StageClock
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
    PolicyError,
    scrub,
)
from gateway import router
from gateway.config import Config
from gateway.context import RequestContext
from gateway.cost import settle
from gateway.logs import get_logger
from gateway.stats import StatsBook

_log = get_logger("imagegate.dispatch")
# Outcomes after which "every backend is busy, come back later" (503 + Retry-After) is the honest answer.
_OVERLOADED = frozenset(f"{c.family}.{c.code}" for c in (BackendOverloaded, BackendQueueFull))
# Called after every attempt:
# (backend, outcome label, seconds waited on the backend, backend-reported stage seconds)
AttemptHook = Callable[[str, str, float, Mapping[str, float]], None]


def asked_format(request: ImageRequest, capabilities: Capabilities) -> str:
    """The format to ask a backend for, decided once per candidate (see ``Capabilities``).

    The client's format when the backend produces it and no ``output_compression`` was asked: its images
    then pass through untouched. Otherwise the gateway re-encodes once, so it asks for lossless PNG where
    the backend produces it (no lossy generation before the client's own), else the client's format, else
    the backend's first. The gateway, not the backend, applies ``output_compression``: one meaning (JPEG and
    WebP quality 100 - compression, PNG zlib level) whatever the backend."""
    fmt, produced = request.output_format, capabilities.output_formats
    if request.output_compression is None and fmt in produced:
        return fmt
    if "png" in produced:
        return "png"
    return fmt if fmt in produced else produced[0]


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

    async def dispatch(self, ctx: RequestContext) -> ImageResult:
        """Serve ``ctx.request`` (already parsed) or raise the final ``ImagegateError``.

        Writes to ``ctx`` as it goes: ``route`` and ``tier`` once the router has planned (``route`` also
        when the plan is a policy error), each failed attempt in ``attempts``, the attempts' backend time
        in ``timing``, and on success ``backend``, ``result`` and ``cost_usd``."""
        request = ctx.request
        if request is None:
            raise ValueError("dispatch before the request was parsed")
        try:
            plan = router.plan(request, self.config, self.stats.snapshot(), time.monotonic())
        except PolicyError as exc:
            ctx.route = exc.route  # a route matched; none of its candidates may serve
            raise
        ctx.route = plan.route.name
        ctx.tier = plan.tier.name if plan.tier else None
        last: ImagegateError | None = None
        for cand in plan.candidates:
            try:
                result = await self._with_retries(ctx, request, self._request_for(request, cand), cand.backend)
            except ImagegateError as exc:
                last = exc
                if not exc.fallback:
                    raise
                remaining = request.remaining()
                if remaining is not None and remaining <= 0:
                    break
                continue
            ctx.backend, ctx.result = cand.backend, result
            ctx.cost_usd = settle(self.config.backends[cand.backend].cost, request, result.usage)
            return result
        raise self._exhausted(ctx.attempts, last, request)

    def _request_for(self, request: ImageRequest, cand: router.Candidate) -> ImageRequest:
        """``request`` as ``cand``'s backend should serve it: the route's options, the format to produce."""
        fmt = asked_format(request, self.config.backends[cand.backend].capabilities)
        if fmt == request.output_format and request.output_compression is None:
            # The common case: nothing to change but the options.
            return dataclasses.replace(request, options=cand.options) if cand.options else request
        return dataclasses.replace(request, options=cand.options, output_format=fmt, output_compression=None)

    async def _with_retries(
        self, ctx: RequestContext, client: ImageRequest, request: ImageRequest, name: str
    ) -> ImageResult:
        """Attempts on backend ``name``: ``client`` is what the client asked (``ctx.request``), ``request``
        what the backend is asked (``_request_for``)."""
        server = self.config.server
        tries = 0
        while True:
            try:
                return await self._attempt(ctx, client, request, name)
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
        self, ctx: RequestContext, client: ImageRequest, request: ImageRequest, name: str
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
                raise BackendQueueFull(
                    f"{name}: at max_concurrency={backend.spec.max_concurrency}", retry_after=wait if wait > 0 else None
                )
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
                        # Checked and converted against what the client asked, not what the backend was.
                        result = await _conform(result, client, name)
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
            ctx.attempts.append(AttemptRecord(name, exc.outcome, exc.message, exc.retry_after))
            raise
        except asyncio.CancelledError:
            outcome = "gateway.client_disconnected"
            raise
        except Exception as exc:  # noqa: BLE001 - a backend bug: contain it, report it as that backend's failure
            outcome = "backend.backend_failed"
            # The traceback is what makes the bug fixable; the log processor scrubs secrets from it.
            _log.error("backend_bug", backend=name, request_id=request.request_id, exc_info=exc)
            self.stats.record_failure(name)
            message = f"{name}: unexpected {type(exc).__name__}: {scrub(str(exc), self.config.secrets)}"
            ctx.attempts.append(AttemptRecord(name, outcome, message))
            raise BackendFailed(message) from None
        finally:
            ctx.timing.absorb(clock)
            if self.on_attempt is not None:
                self.on_attempt(name, outcome, clock.backend_s, clock.stages)

    @staticmethod
    def _exhausted(attempts: list[AttemptRecord], last: ImagegateError | None, request: ImageRequest) -> ImagegateError:
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
    """``result`` with every image a verified image of the format the client asked for, with its
    compression (see ``imaging.conform``): the one place output is converted.

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
    out = [
        img if img.url is not None or img.format == fmt else dataclasses.replace(img, format=fmt) for img in images
    ]  # well framed as ``fmt`` but labelled otherwise: the label was wrong

    async def one(i: int) -> None:
        try:
            out[i] = await asyncio.to_thread(imaging.conform, images[i], fmt, compression)
        except imaging.UnreadableImage as exc:
            raise BackendProtocolError(
                f"{name}: image {i + 1} of {len(images)} is not a readable image: {scrub(str(exc), limit=160)}"
            ) from None

    await asyncio.gather(*(one(i) for i in work))
    return dataclasses.replace(result, images=tuple(out))
