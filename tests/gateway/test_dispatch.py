"""The dispatch policy with in-process backends (no HTTP): retries, fallbacks, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
from PIL import Image as PILImage

from backends import imaging
from backends.base import BackendSpec, Capabilities, Image, ImageRequest, ImageResult, Load, StageClock, Usage
from backends.errors import BackendOverloaded, BackendQueueFull, BackendRejected, BackendUnavailable, ImagegateError
from gateway.config import load_config_text
from gateway.context import RequestContext
from gateway.dispatch import Dispatcher, asked_format
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
        self.spec, self.actions = spec, actions
        self.calls: list[ImageRequest] = []

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

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


def images(ctx: RequestContext) -> tuple[Image, ...]:
    assert ctx.result is not None
    return ctx.result.images


async def run(d: Dispatcher, request: ImageRequest) -> RequestContext:
    """Dispatch ``request`` the way the handler does; the context holds what was decided."""
    ctx = RequestContext("t", RequestTiming(), request)
    await d.dispatch(ctx)
    return ctx


async def test_success_carries_options_stages_and_settled_cost():
    d, backends, seen = make([], [])
    served = await run(d, req())
    timing = served.timing
    assert served.backend == "a" and served.cost_usd == 0.5 and served.route == "r"
    assert backends["a"].calls[0].options == {"decoder": "taesd"}
    assert served.attempt_count == 1 and timing.stages == {"denoise": 0.008}
    assert timing.backend_s >= 0.01
    assert seen == [("a", "ok", pytest.approx(timing.backend_s), {"denoise": 0.008})]


async def test_retry_same_backend_only_when_no_work_started():
    d, backends, _ = make([BackendUnavailable("refused"), BackendOverloaded("busy", retry_after=0.01)], [])
    served = await run(d, req())
    assert served.backend == "a" and len(backends["a"].calls) == 3 and len(served.attempts) == 2


async def test_retry_after_beyond_the_limit_falls_back_immediately():
    d, backends, _ = make([BackendOverloaded("busy", retry_after=30)], [])
    served = await run(d, req())
    assert served.backend == "b" and len(backends["a"].calls) == 1
    # b is priced per GPU second from the backend's report: 0.25 s x $2
    assert served.cost_usd == 0.5


async def test_terminal_rejection_does_not_fall_back():
    d, backends, _ = make([BackendRejected("bad prompt")], [])
    with pytest.raises(ImagegateError) as err:
        await run(d, req())
    assert err.value.code == "backend_rejected" and not backends["b"].calls


async def test_per_attempt_timeout_then_fallback():
    d, _, _ = make(["hang"], [])
    served = await run(d, req())
    timing = served.timing
    assert served.backend == "b" and served.attempts[0].outcome == "backend.backend_timeout"
    assert timing.backend_s >= 0.3  # the hang counted as backend time, not gateway time


async def test_deadline_exceeded_is_504():
    d, _, _ = make(["hang"], ["hang"])
    with pytest.raises(ImagegateError) as err:
        await run(d, req(deadline_s=0.2))
    assert err.value.status == 504


async def test_backend_bug_is_contained_as_backend_failure():
    d, _, seen = make(["bug"], [])
    served = await run(d, req())
    assert served.backend == "b" and "unexpected KeyError" in served.attempts[0].message
    assert seen[0][1] == "backend.backend_failed"


async def test_concurrency_limit_spills_to_next_candidate():
    d, backends, _ = make(["hang"], [])
    first = asyncio.create_task(run(d, req()))
    await asyncio.sleep(0.05)
    served = await run(d, req())  # a is busy (max_concurrency 1)
    assert served.backend == "b" and served.attempts[0].outcome == "backend.backend_queue_full"
    # Our own limit is a full queue: fall through at once, never sleep and retry the same backend.
    assert [a.backend for a in served.attempts] == ["a"] and len(backends["a"].calls) == 1
    first.cancel()


async def test_cancellation_reaches_the_backend():
    d, backends, seen = make(["hang"], [])
    task = asyncio.create_task(run(d, req()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 1 and seen[0][:2] == ("a", "gateway.client_disconnected")
    assert seen[0][2] >= 0.04  # the time spent waiting before the cancel is still backend time
    assert not backends["b"].calls


async def test_time_priced_estimates_learn_billed_seconds_not_latency():
    d, _, _ = make([], [])
    await run(d, req())
    stats = d.stats.snapshot()["a"]
    # The backend reported 0.25 GPU-seconds for an attempt that took ~0.01 s of wall time.
    assert stats.ewma_seconds_per_image == 0.25
    assert stats.ewma_latency_s < 0.25


async def test_a_full_queue_falls_through_at_once():
    d, backends, _ = make([BackendQueueFull("a: 9 requests queued", retry_after=0.01)], [])
    served = await run(d, req())
    # Not retried in place even though the wait would fit: the next candidate serves now.
    assert served.backend == "b" and len(backends["a"].calls) == 1
    assert [(a.backend, a.outcome) for a in served.attempts] == [("a", "backend.backend_queue_full")]
    assert d.stats._live["a"].consecutive_failures == 0  # load, not ill health: no cooldown


@pytest.mark.parametrize(
    ("b_error", "retry_after"),
    [
        (BackendQueueFull("b: full", retry_after=2.0), 2.0),
        (BackendOverloaded("b: 429", retry_after=30), 4.0),  # beyond max_retry_after_s: not slept on
        (BackendQueueFull("b: full"), 4.0),  # no estimate from b: a's
    ],
)
async def test_everything_busy_is_503_with_the_soonest_wait(b_error, retry_after):
    d, backends, _ = make([BackendQueueFull("a: full", retry_after=4.0)], [b_error])
    with pytest.raises(ImagegateError) as err:
        await run(d, req())
    assert err.value.status == 503 and err.value.code == "all_backends_overloaded"
    assert err.value.retry_after == retry_after
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
    d, _, _ = make([BAD_OUTPUTS[bad]], [])
    served = await run(d, dataclass_replace(req(), output_format=fmt))
    assert served.backend == "b" and len(served.attempts) == 1
    assert served.attempts[0].outcome == "backend.backend_protocol_error"
    with PILImage.open(io.BytesIO(images(served)[0].as_bytes())) as img:
        img.load()
        assert img.format == fmt.upper() and images(served)[0].format == fmt


async def test_a_good_image_in_the_wanted_format_passes_through_untouched(monkeypatch):
    def no_decode(*args):
        raise AssertionError("the passthrough case must not decode or re-encode")

    monkeypatch.setattr("backends.imaging.conform", no_decode)
    b64 = _b64(png(32, 16))
    good = Image(format="png", b64=b64, revised_prompt="r")
    d, _, _ = make([good, Image(format="jpeg", data=PNG)], [])
    served = await run(d, req())
    assert images(served)[0] is good  # same object: base64 text passed on as received
    # Framed as PNG but labelled jpeg: relabelled, still not decoded.
    served = await run(d, req())
    assert images(served)[0].format == "png" and images(served)[0].data is PNG


async def test_other_formats_and_compression_are_transcoded_in_the_attempt():
    d, _, _ = make([], [])
    served = await run(d, dataclass_replace(req(), output_format="webp"))
    assert served.backend == "b" or served.backend == "a"
    with PILImage.open(io.BytesIO(images(served)[0].as_bytes())) as img:
        assert img.format == "WEBP" and img.size == (8, 8)
    served = await run(d, dataclass_replace(req(), output_compression=90))
    with PILImage.open(io.BytesIO(images(served)[0].as_bytes())) as img:
        assert img.format == "PNG"


def dataclass_replace(request: ImageRequest, **changes) -> ImageRequest:
    import dataclasses

    return dataclasses.replace(request, **changes)


# -- the output format, decided once (issue #9 items 3 and 4) ------------------------------------------------

FORMATS = """
server: {max_retries: 0, cooldown_failures: 0}
backends:
  png_only: {type: openai, capabilities: {output_formats: [png]}, settings: {base_url: "http://127.0.0.1:9/v1"}}
  any: {type: openai, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - {name: png_only, match: {models: [png_only]}, candidates: [{backend: png_only}]}
  - {name: any, match: {models: [any]}, candidates: [{backend: any}]}
"""
SOURCE = PILImage.effect_noise((24, 16), 80).convert("RGB")


class Producing:
    """Encodes one fixed picture in whatever format and compression it is asked for (as a backend would)."""

    Settings = object

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.calls: list[ImageRequest] = []

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        self.calls.append(request)
        data = imaging.encode(SOURCE, request.output_format, request.output_compression)
        return ImageResult((Image(format=request.output_format, data=data),) * request.n, Usage(images=request.n))


def producing():
    cfg = load_config_text(FORMATS, "t")
    backends = {name: Producing(cfg.backends[name].spec) for name in cfg.backends}
    return Dispatcher(cfg, backends, StatsBook(backends, 0, 1)), backends


@pytest.mark.parametrize(
    ("produced", "fmt", "compression", "asked"),
    [
        (("png", "jpeg", "webp"), "webp", None, "webp"),  # produced: passed through untouched
        (("png",), "webp", None, "png"),  # not produced: lossless PNG, converted by the gateway
        (("png", "jpeg", "webp"), "jpeg", 40, "png"),  # a compression: the gateway encodes, from lossless
        (("webp", "jpeg"), "jpeg", 40, "jpeg"),  # no PNG: the client's format
        (("webp", "jpeg"), "png", None, "webp"),  # neither: the first produced
    ],
)
def test_asked_format(produced, fmt, compression, asked):
    caps = Capabilities(output_formats=produced)
    assert asked_format(ImageRequest(prompt="p", output_format=fmt, output_compression=compression), caps) == asked


async def test_a_backend_is_asked_only_for_a_format_it_produces_and_the_client_gets_theirs():
    d, backends = producing()
    ctx = await run(d, dataclass_replace(req(), model="png_only", output_format="webp"))
    sent = backends["png_only"].calls[-1]
    assert (sent.output_format, sent.output_compression) == ("png", None)
    assert images(ctx)[0].format == "webp"
    with PILImage.open(io.BytesIO(images(ctx)[0].as_bytes())) as img:
        assert img.format == "WEBP" and img.size == SOURCE.size


async def test_a_listed_format_passes_through_as_the_backend_made_it(monkeypatch):
    monkeypatch.setattr("backends.imaging.conform", lambda *a: pytest.fail("passthrough must not re-encode"))
    d, backends = producing()
    ctx = await run(d, dataclass_replace(req(), model="any", output_format="jpeg"))
    assert backends["any"].calls[-1].output_format == "jpeg"
    assert images(ctx)[0].data == imaging.encode(SOURCE, "jpeg")


async def test_output_compression_is_applied_once_by_the_gateway():
    d, backends = producing()
    ctx = await run(d, dataclass_replace(req(), model="any", output_format="jpeg", output_compression=40))
    sent = backends["any"].calls[-1]
    assert (sent.output_format, sent.output_compression) == ("png", None)  # lossless from the backend
    # One lossy encode of the backend's pixels: exactly what encoding the source once gives.
    assert images(ctx)[0].data == imaging.encode(SOURCE, "jpeg", 40)
