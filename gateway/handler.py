"""``POST /v1/images/generations`` as a raw ASGI handler: the gateway's hot path.

Raw ASGI rather than a Starlette endpoint because every microsecond here is overhead the gateway adds to
every request (request/response object construction, middleware stacks). The path, one way:

    receive body (size-capped) → parse (api) → dispatch (router + policy + backend, output checked and
    converted inside the attempt), watching for the client going away → render (api) → headers (timing
    closed here) → send → one log line + metrics

One ``RequestContext`` carries the request through all of it: created here on arrival, filled in by the
dispatcher, read back here for the headers, the log line and the metrics.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from backends.base import Image, ImageRequest, ImageResult
from backends.errors import (
    ClientDisconnected,
    ImagegateError,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway import api
from gateway.config import ServerConfig
from gateway.context import RequestContext
from gateway.dispatch import Dispatcher
from gateway.images import ImageStore
from gateway.metrics import Metrics
from gateway.server import READ_TIMED_OUT, RECEIVED_AT
from gateway.timing import RequestTiming

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_JSON = (b"content-type", b"application/json")


WATCH_AFTER_S = 0.05


class _Disconnected(Exception):
    pass


class _Watch:
    """Cancels ``task`` when the client disconnects; started lazily by ``_dispatch_watching``."""

    __slots__ = ("gone", "receive", "task", "watcher")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.receive = receive
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                # This task only runs while the dispatch awaits, so the cancel lands inside the dispatch.
                self.gone = True
                self.task.cancel()
                return

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


class GenerationsHandler:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        metrics: Metrics,
        images: ImageStore,
        log: FilteringBoundLogger,
        base_url: Callable[[Scope], str],
    ) -> None:
        self.dispatcher = dispatcher
        self.config = dispatcher.config
        self.metrics = metrics
        self.images = images
        self.log = log
        self.base_url = base_url
        tao = self.config.server.timing_allow_origin
        self._static_headers = [_JSON] + ([(b"timing-allow-origin", tao.encode("latin-1"))] if tao else [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions")
        received_at = extensions.get(RECEIVED_AT) if extensions else None
        timing = RequestTiming(received_at)  # first: the clock covers everything the gateway does
        server = self.config.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming_id = headers.get("x-request-id")
        # 128 random bits as 32 hex digits (what uuid4().hex gives, without building a UUID object).
        request_id = incoming_id if incoming_id and _REQUEST_ID.match(incoming_id) else os.urandom(16).hex()
        ctx = RequestContext(request_id, timing)
        error: ImagegateError | None = None
        try:
            if received_at is not None:
                # Under ``GatewayHttpProtocol`` (it stamps the arrival): the protocol enforces the read
                # deadlines itself, at no cost to a request that arrives whole.
                body = await self._read_body(headers, receive, server.max_body_bytes)
            else:
                body = await self._read_body_within(headers, receive, server)
            ctx.request = request = api.parse_generation(
                body,
                headers,
                default_size=server.default_size,
                request_id=request_id,
                deadline=time.monotonic() + server.default_deadline_s,
            )
            result = await self._dispatch_watching(ctx, receive)
            payload = self._render(result, request, scope)
            status = 200
        except _Disconnected:
            if extensions and extensions.get(READ_TIMED_OUT):  # the protocol already answered 408
                error = RequestTimeout(f"request body not received within {server.body_timeout_s:g} s")
            else:
                error = ClientDisconnected("the client went away before the answer was ready")
            self._finish(ctx, error)
            return
        except ImagegateError as exc:
            error = exc
        except Exception:  # never a traceback in a response; the log line says what happened
            self.log.exception("unhandled_error", request_id=request_id)
            error = InternalError("internal error; see the gateway log for request id " + request_id)
        if error is not None:
            status, payload = error.status, api.render_error(error)

        out = list(self._static_headers)
        out.append((b"x-request-id", request_id.encode("latin-1")))
        out.append((b"x-route", (ctx.route or "none").encode()))
        out.append((b"x-backend", (ctx.last_backend or "none").encode()))
        out.append((b"x-attempts", str(ctx.attempt_count).encode()))
        if ctx.result is not None:
            out.append((b"x-cost-usd", b"unknown" if ctx.cost_usd is None else f"{ctx.cost_usd:.6f}".encode()))
            if ctx.tier:
                out.append((b"x-tier", ctx.tier.encode()))
        else:
            out.append((b"x-cost-usd", b"unknown" if ctx.attempts else b"0"))
        if error is not None and error.retry_after is not None:
            out.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
        out.append((b"content-length", str(len(payload)).encode()))
        timing.close()  # everything from here on is the server's own send
        out.append((b"server-timing", timing.server_timing().encode()))
        out.append((b"x-gateway-overhead-ms", f"{timing.gateway_s * 1e3:.3f}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})
        self._finish(ctx, error)

    async def _read_body(self, headers: dict[str, str], receive: Receive, limit: int) -> bytes:
        ctype = headers.get("content-type")
        if ctype is not None and ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype[:60]!r}")
        declared = headers.get("content-length")
        if declared is not None:
            # Servers check it before us, but the ASGI contract does not say so: ASCII digits only
            # ("²".isdigit() is true and int("²") raises), and no int() of a thousand digits.
            if not (declared.isascii() and declared.isdigit()):
                raise InvalidRequest("invalid Content-Length")
            if len(declared) > 18 or int(declared) > limit:
                raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        message = await receive()
        body: bytes = message.get("body", b"")
        size = len(body)
        # Capped by bytes received, whatever the framing: a chunked body (no Content-Length) that arrived
        # before the app first asked is handed over whole, in this one message.
        if size > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        if not message.get("more_body"):
            if message["type"] == "http.disconnect":
                raise _Disconnected
            return body
        chunks = [body]
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_body_within(self, headers: dict[str, str], receive: Receive, server: ServerConfig) -> bytes:
        """``_read_body`` under a server that sets no read deadline (stock uvicorn, other ASGI servers)."""
        try:
            async with asyncio.timeout(server.body_timeout_s):
                return await self._read_body(headers, receive, server.max_body_bytes)
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {server.body_timeout_s:g} s") from None

    async def _dispatch_watching(self, ctx: RequestContext, receive: Receive) -> ImageResult:
        """Run the dispatch; if the client disconnects meanwhile, cancel it (which cancels remote work).

        The dispatch runs in this task; a watcher task (waiting for ``http.disconnect``) is started only
        once the dispatch has taken ``WATCH_AFTER_S``: a fast answer never pays for a second task, and a
        slow one (image generation takes seconds) learns of a disconnect at most that much later."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - an ASGI app is always called from a task
            raise RuntimeError("the generations handler must run in an asyncio task")
        watch = _Watch(task, receive)
        handle = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch.start)
        try:
            return await self.dispatcher.dispatch(ctx)
        except asyncio.CancelledError:
            if watch.gone:
                watch.task.uncancel()
                raise _Disconnected from None
            raise
        finally:
            handle.cancel()
            watch.stop()

    def _render(self, result: ImageResult, request: ImageRequest, scope: Scope) -> bytes:
        # Only renders: the dispatcher verified (and, where needed, converted) every image inside the
        # attempt, so an unreadable answer already fell through to the next backend.
        images = result.images
        if request.response_format != "url":
            return api.render_images(images, "b64_json", _no_url)
        base = self.base_url(scope)
        return api.render_images(images, "url", lambda img: self._url_for(img, base))

    def _url_for(self, image: Image, base: str) -> str:
        if image.url is not None:
            return image.url
        return f"{base}/v1/images/files/{self.images.put(image.as_bytes(), image.format)}"

    def _finish(self, ctx: RequestContext, error: ImagegateError | None) -> None:
        """Metrics and the access log line, from the context alone."""
        timing, request, result = ctx.timing, ctx.request, ctx.result
        outcome = "ok" if error is None else error.outcome
        images = len(result.images) if result is not None else 0
        route = ctx.route
        self.metrics.observe_request(
            route or "none",
            ctx.backend or "none",
            outcome,
            timing.total_s,
            timing.gateway_s,
            ctx.cost_usd,
            images,
            result is not None and bool(ctx.attempts),
        )
        if not self.config.server.access_log:
            return
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "route": route,
            "backend": ctx.backend,
            "outcome": outcome,
            "status": 200 if error is None else error.status,
            "attempts": ctx.attempt_count,
            "total_ms": round(timing.total_s * 1e3, 3),
            "gateway_ms": round(timing.gateway_s * 1e3, 3),
            "backend_ms": round(timing.backend_s * 1e3, 3),
            "cost_usd": ctx.cost_usd,
            "images": images,
        }
        if request is not None:
            # The tier the router resolved, once it did; before that, the one asked for.
            fields.update(size=request.size, n=request.n, tier=ctx.tier or request.tier)
            if self.config.server.log_prompts:
                fields["prompt"] = request.prompt
        if error is not None:
            fields["error"] = error.message
        self.log.info("request", **fields)


def _no_url(image: Image) -> str:  # pragma: no cover - only called for response_format=url
    raise AssertionError("url rendering without a store")
