"""What the remote backends (fal, Replicate, cog, Triton) share beyond the HTTP plumbing of ``backends.http``.

* ``seeded_batches``: ``n`` images as calls of at most ``per_call`` images, each call's seed offset by the
  images before it, so a seeded request gives distinct, reproducible images rather than one image n times.
* ``fan_out``: run those calls side by side (or one after another), each timing itself on its own
  ``StageClock``. The first failure cancels the siblings, which cancel their remote work before the
  failure propagates. The attempt's clock is charged the *longest* wait and the longest of each stage:
  parallel waits overlap, and their sum would count the same wall time several times over.
* ``fetch_images``: fetch output URLs / ``data:`` URIs concurrently through ``fan_out``, with the backend's
  ``OutputFetcher`` (never its API client: see ``backends.http``).
* ``same_origin``: whether a URL an API handed back is on the configured origin (our credential goes
  with it, so it must never be followed anywhere else). It would sit well in ``backends.http`` next to
  ``host_allowed``; it lives here while that module is being changed by others.
* ``Background`` and ``best_effort``: remote cancels that must outlive the task that starts them (that task
  is usually being cancelled right now), bounded by a short timeout, drained when the backend closes.
* ``stop_task``: cancel a background loop (health/readiness polling) and wait for it to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from backends.base import Image, StageClock
from backends.http import OutputFetcher, fetch_output

T = TypeVar("T")


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
            results = await _gather_or_cancel([call(k) for call, k in zip(calls, clocks)])
        else:
            results = [await call(k) for call, k in zip(calls, clocks)]
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
        if task in done and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
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
        [lambda k, url=url: fetch_output(fetcher, url, k, backend=backend, allowed_hosts=allowed_hosts,
                                         max_bytes=max_bytes, timeout=timeout)
         for url in urls],
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
