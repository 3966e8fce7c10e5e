"""backends.remote: the machinery the remote backends share (the base class, splitting n, fan-out, usage,
origins, cancels)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from backends.base import BackendSpec, ImageRequest, ImageResult, StageClock, Timeouts
from backends.errors import BackendFailed, BackendTimeout, BackendUnavailable
from backends.remote import (
    Background,
    Outputs,
    RemoteBackend,
    best_effort,
    fan_out,
    same_origin,
    seeded_batches,
    stop_task,
    usage,
)
from tests.fakes.output_host import OutputHost
from tests.servers import serve_app

# -- RemoteBackend -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    pass


class _Backend(RemoteBackend[_Settings]):
    """A remote backend with no protocol: only what the base gives, and a probe the test controls."""

    Settings = _Settings

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            BackendSpec(name="b", type="kind", settings=_Settings(), timeouts=Timeouts(2, 5, 10)), **kwargs
        )
        self.up = True

    async def probe(self) -> bool:
        return self.up

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        raise NotImplementedError


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_the_api_client_holds_no_credential_each_api_request_carries_it() -> None:
    host = OutputHost()  # records every header as received, repeats kept
    with serve_app(host) as base:
        backend = _Backend(
            base_url=base,
            key="sk-remote-key-1234",
            secret_headers={"X-Tenant": "tenant-secret-99"},
            urls=("http://user:pw-in-url@other.example",),
        )
        await backend.start()
        try:
            assert not {"authorization", "x-tenant"} & set(backend.client.headers)
            await backend.send("GET", "/a", StageClock())
            await backend.send("GET", "/b", StageClock(), headers={"x-tenant": "per-request"})
        finally:
            await backend.aclose()
    sent = [sorted((k, v) for k, v in r.headers if k in ("authorization", "x-tenant")) for r in host.requests]
    # A request's own header replaces the configured one of the same name, never doubles it.
    assert sent == [
        [("authorization", "Bearer sk-remote-key-1234"), ("x-tenant", "tenant-secret-99")],
        [("authorization", "Bearer sk-remote-key-1234"), ("x-tenant", "per-request")],
    ]
    assert set(backend.secrets) >= {"sk-remote-key-1234", "tenant-secret-99", "pw-in-url"}


async def test_outside_start_and_aclose_nothing_is_sent_and_nothing_is_ready() -> None:
    backend = _Backend(outputs=Outputs(allowed_hosts=()))
    for _ in range(2):  # before start, then after aclose
        assert not backend.ready()
        with pytest.raises(BackendUnavailable, match="b: not started"):
            await backend.send("GET", "http://127.0.0.1:9/", StageClock())
        with pytest.raises(BackendUnavailable, match="b: not started"):
            await backend.fetch(["data:image/png;base64,AAAA"], StageClock())
        await backend.start()
        assert backend.ready()
        await backend.aclose()


async def test_readiness_follows_the_probe_and_its_changes_are_logged() -> None:
    backend = _Backend(health_interval=0.01)
    backend.up = False
    with capture_logs() as logs:
        await backend.start()
        try:
            assert not backend.ready()
            backend.up = True
            await _until(backend.ready)
            backend.unreachable()  # a call could not connect: not ready until the next probe says so
            assert not backend.ready()
            await _until(backend.ready)
        finally:
            await backend.aclose()
    assert not backend.ready()
    events = [(e["event"], e.get("ready")) for e in logs]
    assert events[:2] == [("kind.not_ready_at_start", None), ("kind.ready_changed", True)]
    assert all(e["backend"] == "b" for e in logs)


async def test_without_probing_a_started_backend_stays_ready() -> None:
    backend = _Backend()  # nothing would bring readiness back, so a failed connect does not drop it
    backend.up = False  # never asked
    await backend.start()
    try:
        backend.unreachable()
        assert backend.ready()
    finally:
        await backend.aclose()


def test_usage_sums_what_the_calls_report() -> None:
    request = ImageRequest(prompt="p", width=1000, height=500, steps=20)
    assert usage(request, 3, predict=[1.5, None, 2.0]) == usage(request, 3, predict=[3.5]) != usage(request, 3)
    summed = usage(request, 3, predict=[1.5, None, 2.0])
    assert (summed.images, summed.megapixels, summed.steps, summed.predict_seconds) == (3, 1.5, 20, 3.5)
    assert usage(request, 2, predict=[None], megapixels=0.25).predict_seconds is None
    assert usage(request, 2, megapixels=0.25).megapixels == 0.25


# -- seeded_batches ------------------------------------------------------------------------------------


def test_seeded_batches_offsets_each_call_by_the_images_before_it() -> None:
    assert seeded_batches(5, 2, 10) == [(2, 10), (2, 12), (1, 14)]
    assert seeded_batches(3, 1, 0) == [(1, 0), (1, 1), (1, 2)]
    assert seeded_batches(3, 4, 7) == [(3, 7)]
    assert seeded_batches(4, 2, None) == [(2, None), (2, None)]


def test_seeded_batches_refuses_an_empty_call() -> None:
    with pytest.raises(ValueError, match="per_call"):
        seeded_batches(2, 0, None)


# -- fan_out -------------------------------------------------------------------------------------------


def _call(wait: float, stages: dict[str, float], result: object):
    async def call(clock: StageClock) -> object:
        await asyncio.sleep(0)
        clock.add_wait(wait)
        for name, seconds in stages.items():
            clock.stage(name, seconds)
        return result

    return call


async def test_parallel_calls_charge_the_longest_wait_and_stage() -> None:
    clock = StageClock()
    results = await fan_out(
        [_call(1.0, {"remote_predict": 2.0, "remote_queue": 0.5}, "a"), _call(3.0, {"remote_predict": 1.0}, "b")], clock
    )
    assert results == ["a", "b"]
    assert clock.backend_s == 3.0
    assert clock.stages == {"remote_predict": 2.0, "remote_queue": 0.5}


async def test_sequential_calls_add_up() -> None:
    clock = StageClock()
    results = await fan_out(
        [_call(1.0, {"remote_predict": 2.0}, 1), _call(3.0, {"remote_predict": 1.0}, 2)], clock, parallel=False
    )
    assert results == [1, 2]
    assert clock.backend_s == 4.0 and clock.stages == {"remote_predict": 3.0}


async def test_calls_run_side_by_side() -> None:
    started: list[int] = []
    both = asyncio.Event()

    def call(i: int):
        async def run(clock: StageClock) -> int:
            started.append(i)
            if len(started) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 2)  # deadlocks (times out) if run one after another
            return i

        return run

    assert await fan_out([call(0), call(1)], StageClock()) == [0, 1]


async def test_first_failure_cancels_the_siblings_after_their_cleanup() -> None:
    cleaned: list[str] = []
    clock = StageClock()

    async def slow(k: StageClock) -> None:
        k.add_wait(0.25)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # a remote cancel takes a round trip
            cleaned.append("slow")
            raise

    async def failing(k: StageClock) -> None:
        k.add_wait(0.5)
        k.stage("remote_predict", 1.0)
        await asyncio.sleep(0.01)
        raise BackendFailed("boom")

    with pytest.raises(BackendFailed, match="boom"):  # the vocabulary error itself, no ExceptionGroup
        await asyncio.wait_for(fan_out([slow, failing], clock), 5)
    assert cleaned == ["slow"]
    assert clock.backend_s == 0.5  # waits are charged on failure too
    assert clock.stages == {}  # stages only for a complete result


async def test_caller_cancellation_cancels_every_call() -> None:
    cancelled: list[int] = []
    running = asyncio.Event()

    def call(i: int):
        async def run(clock: StageClock) -> None:
            running.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(i)
                raise

        return run

    task = asyncio.create_task(fan_out([call(0), call(1)], StageClock()))
    await running.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == [0, 1]


async def test_a_single_call_runs_inline_and_its_error_propagates() -> None:
    async def failing(k: StageClock) -> None:
        k.add_wait(2.0)
        raise BackendTimeout("late")

    clock = StageClock()
    with pytest.raises(BackendTimeout):
        await fan_out([failing], clock)
    assert clock.backend_s == 2.0


# -- same_origin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://queue.fal.run/a/b/requests/1/status", True),
        ("https://QUEUE.fal.run:443/x", True),  # host case and the default port fold
        ("http://queue.fal.run/x", False),  # another scheme
        ("https://queue.fal.run:8443/x", False),  # another port
        ("https://queue.fal.run.evil.example/x", False),
        ("https://evil.example/?u=https://queue.fal.run", False),
        ("/relative/path", False),
        ("https://[::1/x", False),  # unparseable
    ],
)
def test_same_origin(url: str, expected: bool) -> None:
    assert same_origin(url, "https://queue.fal.run") is expected


# -- background cancels --------------------------------------------------------------------------------


async def test_shielded_cancel_goes_out_although_the_caller_is_cancelled() -> None:
    background = Background()
    sent = asyncio.Event()
    entered = asyncio.Event()

    async def remote_cancel() -> None:
        entered.set()
        await asyncio.sleep(0.05)
        sent.set()

    async def caller() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await background.shielded(remote_cancel())
            raise

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    await entered.wait()
    task.cancel()  # a second cancellation stops the wait, not the remote cancel
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not sent.is_set() and len(background) == 1
    await background.drain(timeout=2)
    assert sent.is_set() and len(background) == 0


async def test_drain_cancels_what_does_not_finish_in_time() -> None:
    background = Background()
    stopped = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise

    background.spawn(stuck())
    await background.drain(timeout=0.05)
    assert stopped.is_set() and len(background) == 0


async def test_best_effort_ignores_failures_and_gives_up_in_time() -> None:
    async def fails() -> None:
        raise RuntimeError("upstream gone")

    await best_effort(fails(), 1.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await best_effort(asyncio.sleep(30), 0.05)
    assert loop.time() - start < 1.0


async def test_stop_task_waits_for_the_loop_to_end() -> None:
    ticks = 0

    async def loop() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    await stop_task(task)
    assert task.cancelled() and ticks > 0
    await stop_task(None)
