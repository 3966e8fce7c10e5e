"""One device worker: a thread that owns the pipeline, a bounded queue, batching, and error recovery.

GPU work never runs on the event loop. ``generate`` (event loop) puts a :class:`Job` in the queue and awaits
an asyncio future; the worker thread takes the oldest live job plus every queued job it can batch with it
(same size, steps, decoder and eager/compiled path; per-image seeds and guidance may differ), runs them as
one device call, and resolves each future with ``loop.call_soon_threadsafe``. Image encoding (Pillow) runs
on a small separate pool so the device can start the next batch meanwhile.

A job whose caller went away (future cancelled) or whose deadline passed is dropped before it reaches the
device. Device errors — CUDA out-of-memory above all — fail only the batch that met them, as retryable
backend errors; the worker frees the allocator's cache and keeps serving.

This module does not import torch at import time (only the thread does), so the backend module stays
importable by ``imagegate check``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from backends import imaging
from backends.base import Image
from backends.errors import BackendFailed, BackendQueueFull, BackendTimeout, BackendUnavailable, ImagegateError, scrub

log = structlog.get_logger("imagegate.local_sdxl")

# CUDA errors after which the context is unusable: the backend marks itself not ready instead of failing
# every later request in a confusing way.
_FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ecc",
    "context is destroyed",
)


@dataclass(eq=False)
class Job:
    """One request waiting for the device. ``key`` decides which jobs may share a run."""

    prompt: str
    negative: str | None
    n: int
    seeds: tuple[int, ...]
    guidance: float
    width: int
    height: int
    steps: int
    decoder: str
    eager: bool
    output_format: str
    compression: int | None
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.width, self.height, self.steps, self.decoder, self.eager)

    def cancel(self) -> None:
        """Called on the event loop when the caller stops waiting; the worker skips the job."""
        self.cancelled = True

    def dead(self, now: float) -> bool:
        return self.cancelled or self.future.cancelled() or (self.deadline is not None and now >= self.deadline)


@dataclass(frozen=True, slots=True)
class JobResult:
    images: tuple[Image, ...]
    stages: dict[str, float]  # queue, text_encode, denoise, decode, encode (seconds)
    gpu_seconds: float


class Worker:
    """Runs ``factory()`` (load + compile + warm, on this thread) then serves jobs until ``stop()``.

    ``inject`` is a test hook: called on the worker thread with each :class:`~.pipeline.Batch` just before
    the device run; raising from it behaves exactly like the device raising (e.g. an injected OOM).
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], Any],
        *,
        padded_batch: Callable[[int, int, int], int | None],
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        encode_threads: int = 2,
    ) -> None:
        self.name = name
        self.factory = factory
        self.padded_batch = padded_batch
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.pipeline: Any = None
        self.inject: Callable[[Any], None] | None = None
        self.broken: str | None = None
        self.ewma_run_s = 0.0
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._run_started = 0.0
        self._cond = threading.Condition()
        self._stopping = False
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name=f"sdxl-worker:{name}", daemon=True)
        self._encoders = concurrent.futures.ThreadPoolExecutor(encode_threads, thread_name_prefix=f"sdxl-encode:{name}")

    # -- event-loop side --------------------------------------------------------------------------------

    def start(self) -> concurrent.futures.Future:
        """Start the thread; the returned future resolves once the pipeline is loaded and warm."""
        self._thread.start()
        return self._ready

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or self.broken:
                raise BackendUnavailable(f"{self.name}: {self.broken or 'shutting down'}")
            if len(self._pending) >= self.queue_size:
                # Full: the router's next candidate should take it now (not wait here); the estimate is
                # only for the client's Retry-After if every candidate is full.
                raise BackendQueueFull(
                    f"{self.name}: queue full ({len(self._pending)} requests queued)",
                    retry_after=self._estimate_locked(),
                )
            self._pending.append(job)
            self._cond.notify()

    def queue_depth(self) -> int:
        with self._cond:
            return sum(1 for j in self._pending if not j.cancelled)

    def est_wait_s(self) -> float:
        with self._cond:
            return self._estimate_locked()

    def _estimate_locked(self) -> float:
        """Seconds a new request would wait before its run starts: queued runs (images over the batch
        size) plus the rest of the current run, from the EWMA of run times."""
        images = sum(j.n for j in self._pending if not j.cancelled)
        wait = math.ceil(images / self.max_batch) * self.ewma_run_s
        if self._running:
            wait += max(0.0, self.ewma_run_s - (time.monotonic() - self._run_started))
        return wait

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail the queued jobs, give the running batch ``timeout`` seconds to finish.

        Every waiter gets an answer: a batch still on the device after ``timeout`` is answered with
        ``BackendUnavailable`` (shutting down) now, and whatever it produces later is dropped."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            self._resolve(job, error=BackendUnavailable(f"{self.name}: shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            abandoned = list(self._running)
        for job in abandoned:
            self._resolve(
                job,
                error=BackendUnavailable(
                    f"{self.name}: shutting down; the running batch did not finish within {timeout:g}s"
                ),
            )
        self._encoders.shutdown(wait=True)

    # -- worker thread ----------------------------------------------------------------------------------

    def _main(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self.pipeline = self.factory()
                self.ewma_run_s = getattr(self.pipeline, "warm_run_s", 0.0)
                self._ready.set_result(self.pipeline)
                self._serve()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                self.broken = f"worker died: {exc}"
                log.exception("local_sdxl.worker_died", backend=self.name)

    def _serve(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            self._run(jobs)

    def _next_batch(self) -> list[Job] | None:
        """Block until there is work; return the oldest live job plus its batch partners."""
        with self._cond:
            while True:
                self._drop_dead_locked()
                if self._stopping:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                # The batching window runs from the job's arrival, not from now: a job that already
                # waited behind a busy device has had its chance to find partners.
                wait_until = first.enqueued + self.max_wait_s
                chosen, full = self._collect_locked(first)
                while not full and not self._stopping and (left := wait_until - time.monotonic()) > 0:
                    self._cond.wait(left)
                    self._drop_dead_locked()
                    if not self._pending or self._pending[0] is not first:
                        break  # the first job went away: choose again
                    chosen, full = self._collect_locked(first)
                else:
                    if self._stopping or not self._pending or self._pending[0] is not first:
                        continue
                    for job in chosen:
                        self._pending.remove(job)
                    self._running = chosen
                    self._run_started = time.monotonic()
                    return chosen

    def _collect_locked(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` plus queued jobs with its key, in order, while the images fit one run; and whether
        the run is full (no further image could join it, so waiting for partners is pointless)."""
        limit = max(self.max_batch, first.n)
        chosen, total = [first], first.n
        for job in list(self._pending)[1:]:
            if job.key != first.key or job.dead(time.monotonic()) or total + job.n > limit:
                continue
            if not first.eager and self.padded_batch(first.width, first.height, total + job.n) is None:
                continue
            chosen.append(job)
            total += job.n
        # A compiled run is also full when no listed batch of its size holds one more image.
        full = total >= limit or (not first.eager and self.padded_batch(first.width, first.height, total + 1) is None)
        return chosen, full

    def _drop_dead_locked(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._pending if j.dead(now)]:
            self._pending.remove(job)
            if not (job.cancelled or job.future.cancelled()):
                self._resolve(job, error=BackendTimeout(f"{self.name}: deadline passed while queued; never ran"))
            log.info("local_sdxl.dropped", backend=self.name, reason="cancelled" if job.cancelled else "deadline")

    def _run(self, jobs: list[Job]) -> None:
        from .pipeline import Batch

        first, start = jobs[0], time.monotonic()
        total = sum(j.n for j in jobs)
        padded = total if first.eager else (self.padded_batch(first.width, first.height, total) or total)
        batch = Batch(
            width=first.width,
            height=first.height,
            steps=first.steps,
            decoder=first.decoder,
            prompts=tuple((j.prompt, j.negative) for j in jobs for _ in range(j.n)),
            seeds=tuple(s for j in jobs for s in j.seeds),
            guidance=tuple(j.guidance for j in jobs for _ in range(j.n)),
            padded=padded,
            eager=first.eager,
        )
        failure: ImagegateError | None = None
        try:
            if self.inject is not None:
                self.inject(batch)
            out = self.pipeline.run(batch)
        except Exception as exc:  # noqa: BLE001 - every device error is reported, the worker survives
            failure = self._classify(exc, batch)
        with self._cond:
            self._running = []
        if failure is not None:
            # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
            self._free_device_memory()
            for job in jobs:
                self._resolve(job, error=failure)
            return
        run_s = time.monotonic() - start
        self.ewma_run_s = run_s if self.ewma_run_s == 0 else 0.8 * self.ewma_run_s + 0.2 * run_s
        offset = 0
        for job in jobs:
            arrays = out.images[offset : offset + job.n]
            offset += job.n
            stages = {"queue": start - job.enqueued, **out.stages}
            try:
                self._encoders.submit(self._finish, job, arrays, stages, out.device_seconds * job.n / total)
            except RuntimeError:  # stop() timed out and shut the encoder pool: the job was answered there
                self._resolve(job, error=BackendUnavailable(f"{self.name}: shutting down"))

    def _finish(self, job: Job, arrays: list[Any], stages: dict[str, float], gpu_s: float) -> None:
        """Encode on the encoder pool, then hand the result to the event loop."""
        if job.cancelled or job.future.cancelled():
            return
        try:
            from PIL import Image as PILImage

            t0 = time.perf_counter()
            images = tuple(
                Image(
                    format=job.output_format,
                    data=imaging.encode(PILImage.fromarray(a), job.output_format, job.compression),
                )
                for a in arrays
            )
            stages["encode"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - any encoding failure is this job's, the worker survives
            self._resolve(job, error=BackendFailed(f"{self.name}: image encoding failed: {scrub(str(exc))}"))
            return
        self._resolve(job, result=JobResult(images, stages, gpu_s))

    def _classify(self, exc: Exception, batch: Any) -> ImagegateError:
        message = str(exc)
        where = f"{batch.padded}x{batch.width}x{batch.height}, {batch.steps} steps"
        if _is_oom(exc):
            log.warning("local_sdxl.oom", backend=self.name, batch=where)
            return BackendFailed(f"{self.name}: device out of memory ({where}); cache freed, retry elsewhere")
        log.error("local_sdxl.device_error", backend=self.name, batch=where, error=scrub(message))
        if any(marker in message.lower() for marker in _FATAL_MARKERS):
            self.broken = f"device unusable: {scrub(message, limit=120)}"
            return BackendUnavailable(f"{self.name}: {self.broken}")
        if isinstance(exc, ImagegateError):
            return exc
        return BackendFailed(f"{self.name}: device error: {scrub(message)}")

    def _free_device_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            try:
                torch.cuda.empty_cache()
            except RuntimeError as exc:  # a broken context cannot even free
                log.error("local_sdxl.empty_cache_failed", backend=self.name, error=str(exc))

    def _resolve(self, job: Job, *, result: JobResult | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            job.loop.call_soon_threadsafe(settle)


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "out of memory" in str(exc).lower()
