"""LocalSDXLBackend on CPU with the tiny preset: images, seeds, batching, timings, shapes, cancellation,
deadlines and device errors — the backend contract, without the gateway."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from backends.base import BackendSpec, Capabilities, StageClock
from backends.errors import BackendFailed, BackendQueueFull, BackendTimeout, BackendUnavailable, CallerError
from backends.local_sdxl import LocalSDXLBackend
from backends.local_sdxl.backend import STAGES

from .conftest import SIZE, Hook, make_settings, make_spec, request, start_backend, wait_for


def pixels(image) -> np.ndarray:
    with PILImage.open(io.BytesIO(image.as_bytes())) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("decoder", ["full", "taesd"])
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_both_decoders_return_valid_images(backend, decoder, fmt):
    result = await backend.generate(request(output_format=fmt, seed=3, options={"decoder": decoder}), StageClock())
    (image,) = result.images
    assert image.format == fmt
    with PILImage.open(io.BytesIO(image.as_bytes())) as img:
        assert img.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert img.size == (SIZE, SIZE)
        assert np.asarray(img).std() > 0  # an image, not a constant fill
    assert result.usage.images == 1 and result.usage.steps == 4
    assert result.usage.megapixels == pytest.approx(SIZE * SIZE / 1e6)
    assert result.usage.gpu_seconds and result.usage.gpu_seconds > 0


async def test_decoders_decode_differently(backend):
    full = await backend.generate(request(seed=5, options={"decoder": "full"}), StageClock())
    taesd = await backend.generate(request(seed=5, options={"decoder": "taesd"}), StageClock())
    assert np.abs(pixels(full.images[0]) - pixels(taesd.images[0])).max() > 0


async def test_an_unplanned_decoder_is_the_backends_failure_not_the_callers(backend):
    # Route options are checked at config load; a request that still names an unknown decoder was not
    # planned by the router, so it must not become a 400 for the client: it falls back instead.
    with pytest.raises(BackendFailed, match="decoder 'vqgan'") as info:
        await backend.generate(request(options={"decoder": "vqgan"}), StageClock())
    assert not isinstance(info.value, CallerError) and info.value.fallback


async def test_seed_gives_reproducible_images(backend):
    a = await backend.generate(request(seed=42), StageClock())
    b = await backend.generate(request(seed=42), StageClock())
    c = await backend.generate(request(seed=43), StageClock())
    assert a.images[0].as_bytes() == b.images[0].as_bytes()
    assert a.images[0].as_bytes() != c.images[0].as_bytes()
    # No seed: a fresh random seed per request.
    d = await backend.generate(request(), StageClock())
    e = await backend.generate(request(), StageClock())
    assert d.images[0].as_bytes() != e.images[0].as_bytes()


async def test_prompt_and_negative_prompt_change_the_image(backend):
    base = pixels((await backend.generate(request("a cat", seed=1), StageClock())).images[0])
    other = pixels((await backend.generate(request("a dog", seed=1), StageClock())).images[0])
    negative = pixels(
        (await backend.generate(request("a cat", seed=1, negative_prompt="blurry"), StageClock())).images[0]
    )
    assert np.abs(base - other).max() > 0
    assert np.abs(base - negative).max() > 0


async def test_n_images_are_one_batched_run(backend, hook):
    pipeline = backend.worker.pipeline
    before = pipeline.runs
    result = await backend.generate(request(n=3, seed=7), StageClock())
    assert pipeline.runs == before + 1
    assert len(hook.batches) == 1 and hook.batches[0].padded == 4 and len(hook.batches[0].seeds) == 3
    images = [pixels(i) for i in result.images]
    assert len(images) == 3 and all(i.shape == (SIZE, SIZE, 3) for i in images)
    assert np.abs(images[0] - images[1]).max() > 0
    assert result.usage.images == 3
    # Image i of a request with seed s is the image of seed s + i: reproducible one by one.
    solo = await backend.generate(request(seed=8), StageClock())
    assert np.abs(pixels(solo.images[0]) - images[1]).max() <= 2


async def test_concurrent_compatible_requests_are_batched(backend, hook):
    pipeline = backend.worker.pipeline
    blocker = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)
    prompts = [f"prompt number {i}" for i in range(4)]
    tasks = [
        asyncio.create_task(backend.generate(request(p, seed=100 + i, guidance_scale=4.0 + i), StageClock()))
        for i, p in enumerate(prompts)
    ]
    await wait_for(lambda: backend.worker.queue_depth() == 4)
    load = backend.load()
    assert load.queue_depth == 4 and load.in_flight == 5 and load.est_wait_s > 0
    runs = pipeline.runs
    hook.gate.set()
    results = await asyncio.gather(*tasks)
    await blocker
    assert pipeline.runs == runs + 2  # the blocker, then all four together
    assert [p for p, _ in hook.batches[1].prompts] == prompts
    images = [pixels(r.images[0]) for r in results]
    assert all(np.abs(images[0] - other).max() > 0 for other in images[1:])
    # Each client got its own image: the one it gets when it runs alone.
    for i, p in enumerate(prompts):
        alone = await backend.generate(request(p, seed=100 + i, guidance_scale=4.0 + i), StageClock())
        assert np.abs(pixels(alone.images[0]) - images[i]).max() <= 2


async def test_incompatible_requests_are_not_batched(backend, hook):
    blocker = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)
    a = asyncio.create_task(backend.generate(request("a", steps=3), StageClock()))
    b = asyncio.create_task(backend.generate(request("b", options={"decoder": "taesd"}), StageClock()))
    await wait_for(lambda: backend.worker.queue_depth() == 2)
    hook.gate.set()
    await asyncio.gather(a, b, blocker)
    assert [len(batch.prompts) for batch in hook.batches] == [1, 1, 1]


async def test_stage_timings_are_reported(backend):
    clock = StageClock()
    await backend.generate(request(seed=1), clock)
    assert set(clock.stages) == set(STAGES)
    assert all(v >= 0 for v in clock.stages.values())
    assert clock.stages["denoise"] > 0 and clock.stages["decode"] > 0 and clock.stages["encode"] > 0
    # Waiting on the worker is backend time; it spans the device stages.
    assert clock.backend_s >= clock.stages["denoise"] + clock.stages["decode"]


async def test_unlisted_shape_runs_eagerly(backend, hook):
    result = await backend.generate(request(width=48, height=32, seed=1), StageClock())
    with PILImage.open(io.BytesIO(result.images[0].as_bytes())) as img:
        assert img.size == (48, 32)
    assert hook.batches[-1].eager and hook.batches[-1].padded == 1
    # More images than the largest listed batch: eager as well, one run.
    result = await backend.generate(request(n=5, seed=1), StageClock())
    assert len(result.images) == 5 and hook.batches[-1].eager and hook.batches[-1].padded == 5


def test_refusing_unlisted_shapes_is_a_capability_the_router_sees():
    settings = make_settings(unlisted_shape="refuse", shapes=[{"width": SIZE, "height": SIZE, "batch": 2}])
    caps = LocalSDXLBackend.capabilities_for(settings, Capabilities(max_n=8))
    assert caps.refusal(request(width=48, height=32)) == f"size 48x32 not in {SIZE}x{SIZE}"
    assert caps.refusal(request(n=3)) == f"n=3 exceeds max_n=2 for {SIZE}x{SIZE}"
    assert caps.refusal(request(n=2)) is None
    eager = LocalSDXLBackend.capabilities_for(make_settings(), Capabilities(max_n=8))
    assert eager == Capabilities(max_n=8)


def test_a_refusing_backend_needs_the_narrowed_capabilities():
    """Capabilities are checked in one place, the router: a backend that refuses unlisted shapes must be
    built with the capabilities that say so (the config builds them that way), so that nothing unlisted can
    be planned for it and the backend never re-checks a request."""
    settings = make_settings(unlisted_shape="refuse", shapes=[{"width": SIZE, "height": SIZE, "batch": 2}])
    declared = Capabilities(max_n=8)
    with pytest.raises(ValueError, match="unlisted_shape: refuse"):
        LocalSDXLBackend(BackendSpec(name="strict", type="local_sdxl", settings=settings, capabilities=declared))
    narrowed = LocalSDXLBackend.capabilities_for(settings, declared)
    backend = LocalSDXLBackend(BackendSpec(name="strict", type="local_sdxl", settings=settings, capabilities=narrowed))
    assert backend.spec.capabilities.sizes == (f"{SIZE}x{SIZE}",)
    # Eager settings declare what routes.yaml says, unchanged.
    LocalSDXLBackend(make_spec())


async def test_listed_shapes_of_a_refusing_backend_are_served_padded():
    settings = make_settings(
        unlisted_shape="refuse", shapes=[{"width": SIZE, "height": SIZE, "batch": 2}], warmup_runs=0
    )
    spec = BackendSpec(
        name="strict",
        type="local_sdxl",
        settings=settings,
        capabilities=LocalSDXLBackend.capabilities_for(settings, Capabilities(max_n=8)),
    )
    backend = LocalSDXLBackend(spec)
    await backend.start()
    try:
        result = await backend.generate(request(n=2), StageClock())  # listed
        assert len(result.images) == 2
        result = await backend.generate(request(n=1), StageClock())  # padded to the listed batch of 2
        assert len(result.images) == 1
    finally:
        await backend.aclose()


async def test_cancelled_queued_request_never_runs(backend, hook):
    blocker = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)
    doomed = asyncio.create_task(backend.generate(request("client went away"), StageClock()))
    await wait_for(lambda: backend.worker.queue_depth() == 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert backend.worker.queue_depth() == 0  # cancelled jobs no longer count
    hook.gate.set()
    await blocker
    await backend.generate(request("after"), StageClock())
    assert "client went away" not in hook.prompts()
    assert hook.prompts() == ["blocker", "after"]


async def test_expired_queued_request_is_dropped(backend, hook):
    blocker = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)
    late = asyncio.create_task(backend.generate(request("too late", deadline=time.monotonic() + 0.2), StageClock()))
    await asyncio.sleep(0.3)
    hook.gate.set()
    with pytest.raises(BackendTimeout, match="never ran"):
        await late
    await blocker
    assert "too late" not in hook.prompts()


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("HIP error: out of memory"),
    ],
)
async def test_injected_oom_is_retryable_and_the_worker_keeps_serving(backend, hook, error):
    freed = []
    worker = backend.worker
    original = worker._free_device_memory

    def free() -> None:
        freed.append(1)
        original()

    worker._free_device_memory = free
    try:
        hook.fail["oom please"] = error
        with pytest.raises(BackendFailed, match="out of memory") as info:
            await backend.generate(request("oom please"), StageClock())
        assert info.value.fallback  # the router may try the next candidate
        assert freed == [1]
        assert backend.ready()
        result = await backend.generate(request("fine again", seed=2), StageClock())
        assert len(result.images) == 1
    finally:
        worker._free_device_memory = original


async def test_other_device_errors_fail_only_their_batch(backend, hook):
    hook.fail["bad luck"] = RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    with pytest.raises(BackendFailed, match="device error"):
        await backend.generate(request("bad luck"), StageClock())
    assert backend.ready()
    assert (await backend.generate(request("next"), StageClock())).images


async def test_fatal_device_error_marks_the_backend_unready(backend, hook):
    hook.fail["doom"] = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(BackendUnavailable):
        await backend.generate(request("doom"), StageClock())
    assert not backend.ready()
    with pytest.raises(BackendUnavailable):
        await backend.generate(request("after doom"), StageClock())
    # (the hook fixture clears the flag for the next tests)


async def test_full_queue_says_queue_full_to_fall_through_now(backend, hook):
    blocker = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)
    worker = backend.worker
    size, worker.queue_size = worker.queue_size, 1
    try:
        queued = asyncio.create_task(backend.generate(request("queued"), StageClock()))
        await wait_for(lambda: worker.queue_depth() == 1)
        with pytest.raises(BackendQueueFull) as info:
            await backend.generate(request("one too many"), StageClock())
        # Not "come back later": the next candidate is tried at once; the wait is only for Retry-After.
        assert not info.value.retry_same and info.value.fallback
        assert info.value.retry_after is not None and info.value.retry_after > 0
    finally:
        worker.queue_size = size
        hook.gate.set()
    await asyncio.gather(blocker, queued)


def test_description_says_images_are_noise(backend):
    assert "noise" in backend.description and "tiny" in backend.description
    assert backend.ready()


async def test_start_failure_is_reported():
    backend = LocalSDXLBackend(make_spec("broken", device="cuda:7"))
    with pytest.raises(RuntimeError, match=r"CUDA is not available|CUDA devices exist"):
        await backend.start()
    assert not backend.ready()
    await backend.aclose()


async def test_stop_that_times_out_still_answers_every_waiter():
    backend = await asyncio.to_thread(start_backend, "stopping", warmup_runs=0)
    worker = backend.worker
    assert worker is not None
    hook = Hook()
    worker.inject = hook
    running = asyncio.create_task(backend.generate(request("blocker"), StageClock()))
    await wait_for(lambda: len(hook.batches) == 1)  # on the device, held by the gate
    queued = asyncio.create_task(backend.generate(request("queued"), StageClock()))
    await wait_for(lambda: worker.queue_depth() == 1)
    await asyncio.to_thread(worker.stop, 0.05)  # times out: the batch is still held
    hook.gate.set()  # the batch finishes after stop() returned, into a closed encoder pool
    await asyncio.to_thread(worker._thread.join)
    done, _ = await asyncio.wait({running, queued}, timeout=10)
    assert done == {running, queued}, "a waiter was never answered"
    for task in (running, queued):
        with pytest.raises(BackendUnavailable, match="shutting down"):
            task.result()
    assert worker.broken is None  # the worker ended cleanly, it did not die on the closed pool
    await backend.aclose()
