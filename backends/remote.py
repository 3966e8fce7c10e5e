"""What the remote backends (openai, replicate, cog, fal, triton) share beyond the HTTP plumbing of
``backends.http``: a base class that owns everything a remote backend has but its protocol, and the
functions their protocol flows use.

``RemoteBackend`` owns: the **clients** (an API client from ``make_client`` that holds no credential: ``send``
adds the credential headers to each API request; and, for protocols that answer with output URLs, an
``OutputFetcher`` of its own, which never carries one, used by ``fetch``); the **lifecycle**
(``start``/``aclose``/``ready``/``load``; ``client`` raises ``BackendUnavailable("not started")`` outside
them; with ``health_interval``, ``probe`` at start and then in the background); **load** counting
(``loads``); the **secrets** to scrub (``credentials`` of the configured key, headers and URLs); and the
**cancels** (``cancel_shielded``, ``cancel_later``: bounded, failures ignored, drained on ``aclose``). A
subclass declares ``Settings``, passes ``__init__`` what the base needs from them, and implements
``generate``: its protocol mapping and flow. ``tests/backends/example_backend.py`` is a complete one.

Why a base class rather than helpers each backend composes: the pieces share state whose lifecycle must
stay consistent (clients, poller and pending cancels are opened in ``start`` and closed together, in order,
in ``aclose``; ``ready()`` depends on both the client and the probe), and every remote backend needs all of
it. There is no template ``generate`` wrapped around the subclass's: the flows have nothing in common to
put there, and the OpenAI backend's request path is measured per request (a frame it does not need).

The functions: ``seeded_batches`` (``n`` images as calls of at most ``per_call``, each call's seed offset by
the images before it, so a seeded request gives distinct, reproducible images); ``fan_out`` (run those calls
side by side or one after another, each on its own ``StageClock``; the first failure cancels the siblings,
which cancel their remote work before it propagates; the attempt's clock is charged the *longest* wait and
stage, as parallel waits overlap); ``usage`` (one ``Usage`` from several calls); ``fetch_images`` (outputs
through an ``OutputFetcher``, concurrently); ``same_origin`` (whether a URL an API handed back is on the
configured origin: our credential goes with it); ``Background`` and ``best_effort`` (remote cancels that
outlive the task that starts them, usually being cancelled itself); ``stop_task`` (end a background loop).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import httpx
import structlog

from backends.base import EMPTY, BackendSpec, Image, ImageRequest, ImageResult, Load, LoadCounter, StageClock, Usage
from backends.errors import BackendUnavailable
from backends.http import OutputFetcher, credentials, fetch_output, json_body, make_client, raise_for_status, send

T = TypeVar("T")
SettingsT = TypeVar("SettingsT")


# -- the base ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outputs:
    """Where a backend's output URLs may be fetched from, and how much (see ``backends.http.fetch_output``)."""

    allowed_hosts: tuple[str, ...]
    max_bytes: int = 50 * 1024 * 1024
    timeout: float = 30.0


class RemoteBackend(abc.ABC, Generic[SettingsT]):
    """The base of the remote backends: clients, lifecycle, load, secrets and cancels (see the module
    docstring). Implements ``backends.base.Backend`` but for ``generate``.

    ``__init__`` takes what the base needs from the subclass's settings:

    ``base_url``      the API client's base URL (empty: the backend sends absolute URLs);
    ``key``           the API credential, sent as ``key_header: key_scheme + key`` with every API request;
    ``secret_headers`` configured headers, sent with every API request; every value counts as a secret;
    ``urls``          the other configured URLs (their userinfo is secret, as ``base_url``'s is);
    ``headers``       other default headers of the API client (not secret: ``User-Agent``);
    ``outputs``       where output URLs may be fetched from (None: images come back inline, no fetcher);
    ``cancel_timeout`` the bound of each remote cancel, and of draining them on close;
    ``health_interval`` seconds between ``probe`` calls (None: no polling, ready once started).
    """

    Settings: ClassVar[type]

    def __init__(
        self,
        spec: BackendSpec,
        *,
        base_url: str = "",
        key: str | None = None,
        key_header: str = "Authorization",
        key_scheme: str = "Bearer ",
        secret_headers: Mapping[str, str] = EMPTY,
        urls: Iterable[str] = (),
        headers: Mapping[str, str] = EMPTY,
        outputs: Outputs | None = None,
        cancel_timeout: float = 5.0,
        health_interval: float | None = None,
    ) -> None:
        self.spec = spec
        self.settings: SettingsT = spec.settings
        self.name = spec.name
        # For scrub: every message built from an upstream answer has these removed.
        self.secrets = credentials(key, headers=secret_headers, urls=(base_url, *urls))
        self.outputs = outputs
        self.cancel_timeout = cancel_timeout
        self.loads = LoadCounter()
        self._auth = httpx.Headers(secret_headers)
        if key:
            self._auth[key_header] = f"{key_scheme}{key}"
        self._base_url = base_url
        self._headers = headers
        self._health_interval = health_interval
        self._client: httpx.AsyncClient | None = None  # API requests only; the credential is added per request
        self._fetcher: OutputFetcher | None = None  # output URLs: no credential
        self._healthy = health_interval is None
        self._poller: asyncio.Task[None] | None = None
        self._background = Background()  # remote cancels that outlive the generate() that started them
        self._log = structlog.get_logger(f"imagegate.{spec.type}")

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = make_client(self.spec, self._base_url, headers=self._headers)
        if self.outputs is not None:
            self._fetcher = OutputFetcher(self.spec)
        if self._health_interval is not None:
            if not await self.check_health():
                self._log.warning(f"{self.spec.type}.not_ready_at_start", backend=self.name)
            self._poller = asyncio.create_task(
                self._poll_health(self._health_interval), name=f"{self.spec.type}-health:{self.name}"
            )

    async def aclose(self) -> None:
        await stop_task(self._poller)
        self._poller = None
        # Give in-flight remote cancels a moment to reach the upstream, then drop them.
        await self._background.drain(self.cancel_timeout)
        client, fetcher, self._client, self._fetcher = self._client, self._fetcher, None, None
        if client is not None:
            await client.aclose()
        if fetcher is not None:
            await fetcher.aclose()

    def ready(self) -> bool:
        return self._healthy and self._client is not None

    def load(self) -> Load:
        return self.loads.snapshot()

    @abc.abstractmethod
    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        """The protocol: see ``backends.base.Backend.generate``."""

    # -- readiness ----------------------------------------------------------------------------------

    async def probe(self) -> bool:
        """One readiness check against the upstream (override it along with ``health_interval``). Must not
        raise: a failure is False. The default is True (nothing to ask)."""
        return True

    async def check_health(self) -> bool:
        """Probe once now; ``ready()`` follows the answer."""
        self._healthy = await self.probe()
        return self._healthy

    def unreachable(self) -> None:
        """A call could not connect: not ready until a probe succeeds again. Without probing nothing would
        bring it back, so then this does nothing (the router's cooldown handles a flapping backend)."""
        if self._health_interval is not None:
            self._healthy = False

    async def _poll_health(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            was = self._healthy
            if await self.check_health() != was:
                self._log.info(f"{self.spec.type}.ready_changed", backend=self.name, ready=self._healthy)

    # -- API requests -------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        """The API client. Raises ``BackendUnavailable`` before ``start`` and after ``aclose``: no work can
        have started, so the dispatcher may fall back or retry."""
        client = self._client
        if client is None:
            raise BackendUnavailable(f"{self.name}: not started")
        return client

    def api_headers(self, headers: Mapping[str, str] | None = None) -> httpx.Headers:
        """The credential headers plus ``headers`` (case-insensitive: a request's own header replaces the
        credential's of the same name rather than doubling it). A backend on the hot path builds its
        constant part once and copies it per request."""
        merged = self._auth.copy()
        if headers:
            merged.update(headers)
        return merged

    async def send(
        self,
        method: str,
        url: str | httpx.URL,
        clock: StageClock,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Response:
        """One API request, credential added, through ``backends.http.send``: wire time on ``clock``,
        transport failures as vocabulary errors, HTTP error statuses returned as they are (see
        ``raise_for_status``). ``url``: a path under ``base_url``, or an absolute URL on the API's own
        origin (check one the API handed back with ``same_origin``: the credential goes with it).
        ``timeout``: None keeps the client's (from the backend's ``timeouts``)."""
        client = self.client
        request = client.build_request(
            method,
            url,
            headers=self.api_headers(headers) if headers else self._auth,
            json=json,
            content=content,
            params=params,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        return await send(client, request, clock, backend=self.name, secrets=self.secrets)

    def raise_for_status(self, response: httpx.Response) -> None:
        """``backends.http.raise_for_status`` with this backend's name and secrets."""
        raise_for_status(response, backend=self.name, secrets=self.secrets)

    def json_body(self, response: httpx.Response) -> Any:
        """The response's JSON (any JSON value), or ``BackendProtocolError``."""
        return json_body(response, backend=self.name)

    async def fetch(self, urls: Sequence[str], clock: StageClock) -> list[Image]:
        """Fetch output images (``data:`` URIs, or URLs on ``outputs.allowed_hosts``) concurrently, through
        the credential-free ``OutputFetcher``, in order, each in the format it came in."""
        fetcher, outputs = self._fetcher, self.outputs
        if outputs is None:
            raise TypeError(f"{type(self).__name__} declares no outputs to fetch")
        if fetcher is None:
            raise BackendUnavailable(f"{self.name}: not started")
        return await fetch_images(
            fetcher,
            urls,
            clock,
            backend=self.name,
            allowed_hosts=outputs.allowed_hosts,
            max_bytes=outputs.max_bytes,
            timeout=outputs.timeout,
        )

    # -- cancels ------------------------------------------------------------------------------------

    async def cancel_shielded(self, cancel: Awaitable[object]) -> None:
        """Await a remote cancel although our own task is being cancelled right now (a second cancellation
        ends the wait, not the cancel), for at most ``cancel_timeout``, ignoring how it ends. Call it from
        an ``except BaseException:`` that re-raises."""
        await self._background.shielded(best_effort(cancel, self.cancel_timeout))

    def cancel_later(self, cancel: Awaitable[object], timeout: float | None = None) -> None:
        """Start a remote cancel nobody waits for: at most ``timeout`` (default ``cancel_timeout``) seconds,
        ignoring how it ends, drained on ``aclose``."""
        self._background.spawn(best_effort(cancel, self.cancel_timeout if timeout is None else timeout))


def usage(
    request: ImageRequest, images: int, *, predict: Iterable[float | None] = (), megapixels: float | None = None
) -> Usage:
    """One request's ``Usage`` from the calls that made it: ``images``, their ``megapixels`` (the request's
    size each unless the backend measured them), the request's steps, and the calls' predict seconds summed
    (each call is billed for its own; None when no call reported any). Pure."""
    seconds = [s for s in predict if s is not None]
    return Usage(
        images=images,
        megapixels=request.megapixels * images if megapixels is None else megapixels,
        steps=request.steps,
        predict_seconds=sum(seconds) if seconds else None,
    )


# -- splitting n ------------------------------------------------------------------------------------


def seeded_batches(n: int, per_call: int, seed: int | None) -> list[tuple[int, int | None]]:
    """``(count, seed)`` for each call producing ``n`` images at most ``per_call`` at a time. Call *i*'s
    seed is ``seed`` plus the images of the calls before it (None stays None). Pure."""
    if per_call < 1:
        raise ValueError("per_call must be at least 1")
    return [(min(per_call, n - done), None if seed is None else seed + done) for done in range(0, n, per_call)]


# -- running calls ----------------------------------------------------------------------------------


async def fan_out(
    calls: Sequence[Callable[[StageClock], Awaitable[T]]],
    clock: StageClock,
    *,
    parallel: bool = True,
) -> list[T]:
    """Run ``calls`` (each given its own ``StageClock``) and return their results in order.

    ``parallel``: concurrently. The first failure cancels the others, and each runs its own cancellation
    clean-up (cancelling its remote work) before the failure propagates; the same happens when the caller
    is cancelled. ``clock`` is charged the longest of the calls' waits (always, also on failure) and, on
    success, the longest of each stage they reported. One after another (``parallel=False``, for a server
    with one slot), waits and stages add up instead.
    """
    clocks = [StageClock() for _ in calls]
    combine: Callable[[list[float]], float] = max if parallel else sum
    try:
        if parallel and len(calls) > 1:
            results = await _gather_or_cancel([call(k) for call, k in zip(calls, clocks, strict=True)])
        else:
            results = [await call(k) for call, k in zip(calls, clocks, strict=True)]
    finally:
        if clocks:
            clock.add_wait(combine([k.backend_s for k in clocks]))
    for name in dict.fromkeys(name for k in clocks for name in k.stages):  # ordered union of stage names
        clock.stage(name, combine([k.stages[name] for k in clocks if name in k.stages]))
    return results


async def _gather_or_cancel(aws: list[Awaitable[T]]) -> list[T]:
    # asyncio.TaskGroup (3.11) would wrap failures in an ExceptionGroup; callers want the vocabulary error.
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # A failure, or our own cancellation: nobody waits for the rest. No-op for the finished ones.
        for task in tasks:
            task.cancel()
        # Also retrieves every exception, so none is reported as never retrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # the first failure in call order among those that failed on their own
        failure = task.exception() if task in done else None
        if failure is not None:
            raise failure
    return [task.result() for task in tasks]


async def fetch_images(
    fetcher: OutputFetcher,
    urls: Sequence[str],
    clock: StageClock,
    *,
    backend: str,
    allowed_hosts: tuple[str, ...],
    max_bytes: int,
    timeout: float,
) -> list[Image]:
    """Fetch every output (``data:`` URIs or allow-listed URLs, see ``backends.http.fetch_output``)
    concurrently, in order, in the format each came in."""
    fetched = await fan_out(
        [
            partial(
                fetch_output,
                fetcher,
                url,
                backend=backend,
                allowed_hosts=allowed_hosts,
                max_bytes=max_bytes,
                timeout=timeout,
            )
            for url in urls
        ],
        clock,
    )
    return [Image(format=fmt, data=data) for data, fmt in fetched]


# -- origins --------------------------------------------------------------------------


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` has ``base``'s scheme, host and port (default ports folded, host case-insensitive).
    An unparseable URL is not."""
    try:
        a, b = httpx.URL(url), httpx.URL(base)
    except (httpx.InvalidURL, TypeError):
        return False
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


# -- background work --------------------------------------------------------------------------------


async def best_effort(aw: Awaitable[Any], timeout: float) -> None:
    """Await ``aw`` (a remote cancel) for at most ``timeout`` seconds and ignore how it ends: the work may
    be gone or done already, and a cancel that fails must never replace the error the caller is about
    to raise."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(aw, timeout)


class Background:
    """A backend's fire-and-forget tasks (remote cancels), kept referenced until done and drained on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shielded(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` and wait for it, shielded: our own task is usually being cancelled right now and
        the cancel must still go out. A second cancellation stops the wait, not ``coro``; it is swallowed
        because every caller re-raises the error it is handling (that error wins)."""
        task = self.spawn(coro)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def drain(self, timeout: float) -> None:
        """Give what is in flight up to ``timeout`` seconds to finish, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
