"""The dispatch policy with in-process backends (no HTTP): retries, fallbacks, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
from PIL import Image as PILImage

from backends.base import BackendSpec, Image, ImageRequest, ImageResult, Load, StageClock, Usage
from backends.errors import BackendOverloaded, BackendQueueFull, BackendRejected, BackendUnavailable
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


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()


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
        image = action if isinstance(action, Image) else Image(data=PNG)
        return ImageResult((image,) * request.n, Usage(images=request.n, gpu_seconds=0.25))


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
    assert served.backend == "b" and served.attempts[0].outcome == "backend.backend_queue_full"
    # Our own limit is a full queue: fall through at once, never sleep and retry the same backend.
    assert [a.backend for a in served.attempts] == ["a"] and len(backends["a"].calls) == 1
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


async def test_a_full_queue_falls_through_at_once():
    d, backends, seen = make([BackendQueueFull("a: 9 requests queued", retry_after=0.01)], [])
    served = await d.dispatch(req(), RequestTiming(), None)
    # Not retried in place even though the wait would fit: the next candidate serves now.
    assert served.backend == "b" and len(backends["a"].calls) == 1
    assert [(a.backend, a.outcome) for a in served.attempts] == [("a", "backend.backend_queue_full")]
    assert d.stats._live["a"].consecutive_failures == 0  # load, not ill health: no cooldown


@pytest.mark.parametrize(("b_error", "retry_after"), [
    (BackendQueueFull("b: full", retry_after=2.0), 2.0),
    (BackendOverloaded("b: 429", retry_after=30), 4.0),  # beyond max_retry_after_s: not slept on
    (BackendQueueFull("b: full"), 4.0),  # no estimate from b: a's
])
async def test_everything_busy_is_503_with_the_soonest_wait(b_error, retry_after):
    d, backends, _ = make([BackendQueueFull("a: full", retry_after=4.0)], [b_error])
    with pytest.raises(DispatchFailed) as err:
        await d.dispatch(req(), RequestTiming(), None)
    assert err.value.error.status == 503 and err.value.error.code == "all_backends_overloaded"
    assert err.value.error.retry_after == retry_after
    assert len(backends["a"].calls) == 1 and len(backends["b"].calls) == 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_OUTPUTS = {
    "garbage base64": Image(format="png", b64=_b64(b"<html>502 Bad Gateway</html>")),
    "not base64 at all": Image(format="png", b64="this is not base64, is it?"),
    "truncated png": Image(format="png", b64=_b64(png(64, 64)[:-40])),
    "truncated png as bytes": Image(format="png", data=png(64, 64)[:-40]),
    "png cut after its header": Image(format="png", data=png(64, 64)[:60] + png(64, 64)[-12:]),
    "url where data was needed": Image(format="png", url="http://127.0.0.1:9/x.png"),
}


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
async def test_unreadable_output_is_the_backends_failure_and_falls_through(bad, fmt):
    if bad == "png cut after its header" and fmt == "png":
        # Passed on untouched: the constant-time check on the passthrough path sees a good head and trailer
        # (imaging.framed_as); only a transcode decodes the pixels in between.
        pytest.skip("damage inside the data is found by a full decode only")
    d, backends, _ = make([BAD_OUTPUTS[bad]], [])
    served = await d.dispatch(dataclass_replace(req(), output_format=fmt), RequestTiming(), None)
    assert served.backend == "b" and len(served.attempts) == 1
    assert served.attempts[0].outcome == "backend.backend_protocol_error"
    with PILImage.open(io.BytesIO(served.result.images[0].as_bytes())) as img:
        img.load()
        assert img.format == fmt.upper() and served.result.images[0].format == fmt


async def test_a_good_image_in_the_wanted_format_passes_through_untouched(monkeypatch):
    def no_decode(*args):
        raise AssertionError("the passthrough case must not decode or re-encode")

    monkeypatch.setattr("backends.imaging.conform", no_decode)
    b64 = _b64(png(32, 16))
    good = Image(format="png", b64=b64, revised_prompt="r")
    d, _, _ = make([good, Image(format="jpeg", data=PNG)], [])
    served = await d.dispatch(req(), RequestTiming(), None)
    assert served.result.images[0] is good  # same object: base64 text passed on as received
    # Framed as PNG but labelled jpeg: relabelled, still not decoded.
    served = await d.dispatch(req(), RequestTiming(), None)
    assert served.result.images[0].format == "png" and served.result.images[0].data is PNG


async def test_other_formats_and_compression_are_transcoded_in_the_attempt():
    d, _, _ = make([], [])
    served = await d.dispatch(dataclass_replace(req(), output_format="webp"), RequestTiming(), None)
    assert served.backend == "b" or served.backend == "a"
    with PILImage.open(io.BytesIO(served.result.images[0].as_bytes())) as img:
        assert img.format == "WEBP" and img.size == (8, 8)
    served = await d.dispatch(dataclass_replace(req(), output_compression=90), RequestTiming(), None)
    with PILImage.open(io.BytesIO(served.result.images[0].as_bytes())) as img:
        assert img.format == "PNG"


def dataclass_replace(request: ImageRequest, **changes) -> ImageRequest:
    import dataclasses

    return dataclasses.replace(request, **changes)
