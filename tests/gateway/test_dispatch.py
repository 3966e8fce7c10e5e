"""The dispatch policy with in-process backends (no HTTP): retries, fallbacks, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.base import BackendSpec, Image, ImageRequest, ImageResult, Load, StageClock, Usage
from backends.errors import BackendOverloaded, BackendRejected, BackendUnavailable
from gateway.config import load_config_text
from gateway.dispatch import Dispatcher, DispatchFailed
from gateway.stats import StatsBook
from gateway.timing import RequestTiming

CONFIG = """
server: {max_retries: 2, retry_backoff_s: 0.01, max_retry_after_s: 1, cooldown_failures: 0}
backends:
  a: {type: openai, cost: {per_image: 0.5}, timeouts: {total: 0.3}, max_concurrency: 1,
      settings: {base_url: "http://127.0.0.1:9/v1"}}
  b: {type: openai, cost: {per_gpu_second: 2.0}, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - name: r
    candidates: [{backend: a, options: {decoder: taesd}}, {backend: b}]
"""


class Scripted:
    """A backend whose behaviour per call comes from a list of actions."""

    Settings = object

    def __init__(self, spec: BackendSpec, actions: list) -> None:
        self.spec, self.actions, self.calls = spec, actions, []

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool: return True
    def load(self) -> Load: return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        self.calls.append(request)
        action = self.actions.pop(0) if self.actions else "ok"
        if isinstance(action, Exception):
            clock.add_wait(0.001)
            raise action
        if action == "hang":
            with clock.waiting():
                await asyncio.sleep(10)
        if action == "bug":
            raise KeyError("oops")
        with clock.waiting():
            await asyncio.sleep(0.01)
        clock.stage("denoise", 0.008)
        return ImageResult((Image(data=b"x"),) * request.n, Usage(images=request.n, gpu_seconds=0.25))


def make(a_actions, b_actions):
    cfg = load_config_text(CONFIG, "t")
    backends = {"a": Scripted(cfg.backends["a"].spec, a_actions), "b": Scripted(cfg.backends["b"].spec, b_actions)}
    seen = []
    stats = StatsBook(backends, 0, 1)
    return Dispatcher(cfg, backends, stats, on_attempt=lambda *a: seen.append(a)), backends, seen


def req(deadline_s: float = 5.0) -> ImageRequest:
    return ImageRequest(prompt="p", deadline=time.monotonic() + deadline_s)


async def test_success_carries_options_stages_and_settled_cost():
    d, backends, seen = make([], [])
    timing = RequestTiming()
    served = await d.dispatch(req(), timing, None)
    assert served.backend == "a" and served.cost_usd == 0.5
    assert backends["a"].calls[0].options == {"decoder": "taesd"}
    assert timing.attempts == 1 and timing.stages == {"denoise": 0.008}
    assert timing.backend_s >= 0.01
    assert seen == [("a", "ok", pytest.approx(timing.backend_s), {"denoise": 0.008})]


async def test_retry_same_backend_only_when_no_work_started():
    d, backends, _ = make([BackendUnavailable("refused"), BackendOverloaded("busy", retry_after=0.01)], [])
    served = await d.dispatch(req(), RequestTiming(), None)
    assert served.backend == "a" and len(backends["a"].calls) == 3 and len(served.attempts) == 2


async def test_retry_after_beyond_the_limit_falls_back_immediately():
    d, backends, _ = make([BackendOverloaded("busy", retry_after=30)], [])
    served = await d.dispatch(req(), RequestTiming(), None)
    assert served.backend == "b" and len(backends["a"].calls) == 1
    # b is priced per GPU second from the backend's report: 0.25 s x $2
    assert served.cost_usd == 0.5


async def test_terminal_rejection_does_not_fall_back():
    d, backends, _ = make([BackendRejected("bad prompt")], [])
    with pytest.raises(DispatchFailed) as err:
        await d.dispatch(req(), RequestTiming(), None)
    assert err.value.error.code == "backend_rejected" and not backends["b"].calls


async def test_per_attempt_timeout_then_fallback():
    d, backends, _ = make(["hang"], [])
    timing = RequestTiming()
    served = await d.dispatch(req(), timing, None)
    assert served.backend == "b" and served.attempts[0].outcome == "backend.backend_timeout"
    assert timing.backend_s >= 0.3  # the hang counted as backend time, not gateway time


async def test_deadline_exceeded_is_504():
    d, _, _ = make(["hang"], ["hang"])
    with pytest.raises(DispatchFailed) as err:
        await d.dispatch(req(deadline_s=0.2), RequestTiming(), None)
    assert err.value.error.status == 504


async def test_backend_bug_is_contained_as_backend_failure():
    d, _, seen = make(["bug"], [])
    served = await d.dispatch(req(), RequestTiming(), None)
    assert served.backend == "b" and "unexpected KeyError" in served.attempts[0].message
    assert seen[0][1] == "backend.backend_failed"


async def test_concurrency_limit_spills_to_next_candidate():
    d, backends, _ = make(["hang"], [])
    first = asyncio.create_task(d.dispatch(req(), RequestTiming(), None))
    await asyncio.sleep(0.05)
    served = await d.dispatch(req(), RequestTiming(), None)  # a is busy (max_concurrency 1)
    assert served.backend == "b" and served.attempts[0].outcome == "backend.backend_overloaded"
    first.cancel()


async def test_cancellation_reaches_the_backend():
    d, backends, seen = make(["hang"], [])
    task = asyncio.create_task(d.dispatch(req(), RequestTiming(), None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 1 and seen[0][:2] == ("a", "gateway.client_disconnected")
    assert seen[0][2] >= 0.04  # the time spent waiting before the cancel is still backend time
    assert not backends["b"].calls


async def test_time_priced_estimates_learn_billed_seconds_not_latency():
    d, _, _ = make([], [])
    await d.dispatch(req(), RequestTiming(), None)
    stats = d.stats.snapshot()["a"]
    # The backend reported 0.25 GPU-seconds for an attempt that took ~0.01 s of wall time.
    assert stats.ewma_seconds_per_image == 0.25
    assert stats.ewma_latency_s < 0.25
