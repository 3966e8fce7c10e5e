"""The worker's batching window (``max_wait_ms > 0``): a lone job is held for batch partners, at most for
the window counted from its arrival, and never when no partner could join its run. Batch sizes are
observed through the worker's ``inject`` hook."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from backends.base import StageClock
from backends.local_sdxl import LocalSDXLBackend

from .conftest import SIZE, Hook, request, start_backend

WINDOW_MS = 60_000  # far longer than any test waits: a job that is held for it makes the test time out


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalSDXLBackend]:
    # Listed batches 1 and 2 of one size, max_batch 4: two single images can share a run, three cannot.
    b = start_backend(
        "batching",
        max_wait_ms=WINDOW_MS,
        max_batch=4,
        warmup_runs=0,
        shapes=[{"width": SIZE, "height": SIZE, "batch": 1}, {"width": SIZE, "height": SIZE, "batch": 2}],
    )
    try:
        yield b
    finally:
        asyncio.run(b.aclose())


def batch_prompts(hook: Hook) -> list[list[str]]:
    return [[p for p, _ in b.prompts] for b in hook.batches]


async def test_jobs_arriving_within_the_window_share_one_run(backend, hook):
    first = asyncio.create_task(backend.generate(request("first", seed=1), StageClock()))
    await asyncio.sleep(0.05)  # the worker holds "first" now; without a window it would already be running
    second = asyncio.create_task(backend.generate(request("second", seed=2), StageClock()))
    # Two images fill the largest listed batch of this size: the run starts without waiting out the window.
    results = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert batch_prompts(hook) == [["first", "second"]]
    assert hook.batches[0].padded == 2
    assert all(len(r.images) == 1 for r in results)


async def test_a_lone_job_runs_when_the_window_ends(backend, hook):
    worker = backend.worker
    window, worker.max_wait_s = worker.max_wait_s, 0.2
    clock = StageClock()
    try:
        result = await asyncio.wait_for(backend.generate(request("alone", seed=3), clock), timeout=30)
    finally:
        worker.max_wait_s = window
    assert len(result.images) == 1
    assert batch_prompts(hook) == [["alone"]] and hook.batches[0].padded == 1
    assert clock.stages["queue"] >= 0.2  # it was held for partners for the whole window first


async def test_a_job_that_already_waited_out_its_window_runs_at_once(backend, hook):
    # A job that queued behind a busy device for longer than the window has had its chance to find
    # partners: holding it again once the device frees up only adds latency.
    loop = asyncio.get_running_loop()
    job = backend.make_job(request("waited long", seed=4), loop)
    job.enqueued = time.monotonic() - 2 * WINDOW_MS / 1000
    backend.worker.submit(job)
    result = await asyncio.wait_for(job.future, timeout=30)
    assert len(result.images) == 1 and batch_prompts(hook) == [["waited long"]]


async def test_a_run_no_partner_could_join_does_not_wait(backend, hook):
    # Two images already fill the largest listed batch of this size (max_batch 4 notwithstanding).
    result = await asyncio.wait_for(backend.generate(request("pair", n=2, seed=5), StageClock()), timeout=30)
    assert len(result.images) == 2 and batch_prompts(hook) == [["pair", "pair"]]
