"""fal backend: pure mapping tables, error mapping, and the backend against the fake fal servers."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends.base import BackendSpec, ImageRequest, StageClock, Timeouts
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    OutputFetchError,
    OutputNotAllowed,
)
from backends.fal import (
    FalBackend,
    FalSettings,
    InputMapping,
    error_for,
    from_output,
    image_size,
    split_counts,
    to_input,
    to_inputs,
)
from backends.settings import SettingsError, build
from tests.fakes.fal_fake import Failure, FalFake
from tests.servers import post_generation as _post

# -- pure: request mapping ---------------------------------------------------------------------------

PRESET_SIZES = [
    ("square_hd", 1024, 1024),
    ("square", 512, 512),
    ("portrait_4_3", 768, 1024),
    ("portrait_16_9", 576, 1024),
    ("landscape_4_3", 1024, 768),
    ("landscape_16_9", 1024, 576),
]


@pytest.mark.parametrize(("name", "width", "height"), PRESET_SIZES)
def test_image_size_presets(name: str, width: int, height: int) -> None:
    assert image_size(width, height, InputMapping()) == name
    assert image_size(width, height, InputMapping(image_size="preset")) == name
    assert image_size(width, height, InputMapping(image_size="dims")) == {"width": width, "height": height}


def test_image_size_other_sizes() -> None:
    assert image_size(832, 1216, InputMapping()) == {"width": 832, "height": 1216}
    with pytest.raises(BackendFailed, match="832x1216 is not one of"):
        image_size(832, 1216, InputMapping(image_size="preset"))
    # A model family with its own preset table (e.g. recraft's 4:3 is 1365x1024).
    custom = InputMapping(image_size="preset", presets={"landscape_4_3": "1365x1024", "square_hd": "1024x1024"})
    assert image_size(1365, 1024, custom) == "landscape_4_3"
    with pytest.raises(BackendFailed):
        image_size(1024, 768, custom)


def test_preset_only_models_declare_their_sizes_to_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """``image_size: preset`` narrows the backend's capabilities at config load, so the router skips it for
    other sizes (a caller error from a planned request would never fall back)."""
    from gateway.config import load_config_text
    from gateway.router import plan

    monkeypatch.setenv("FAL_TEST_KEY", "fal-test-key-123")
    config = load_config_text(
        """
backends:
  fal: {type: fal, settings: {key: "${FAL_TEST_KEY}", app: fal-ai/x, input: {image_size: preset}}}
  other: {type: openai, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - {name: all, candidates: [{backend: fal}, {backend: other}]}
"""
    )
    assert "1024x1024" in config.backends["fal"].capabilities.sizes
    assert [c.backend for c in plan(ImageRequest(prompt="x", width=1024, height=1024), config).candidates] == [
        "fal",
        "other",
    ]
    odd = plan(ImageRequest(prompt="x", width=832, height=1216), config)
    assert [c.backend for c in odd.candidates] == ["other"]
    assert dict(odd.skipped)["fal"].startswith("size 832x1216 not in")


def test_to_input_full_mapping() -> None:
    request = ImageRequest(
        prompt="a fox",
        n=2,
        width=1024,
        height=576,
        negative_prompt="blurry",
        steps=25,
        guidance_scale=6.5,
        output_format="png",
    )
    assert to_input(request, InputMapping(enable_safety_checker=False), seed=7) == {
        "prompt": "a fox",
        "image_size": "landscape_16_9",
        "num_images": 2,
        "negative_prompt": "blurry",
        "num_inference_steps": 25,
        "guidance_scale": 6.5,
        "seed": 7,
        "format": "png",
        "enable_safety_checker": False,
    }


def test_to_input_model_family_keys() -> None:
    # A FLUX-like family: output_format instead of format, no negative prompt/guidance, data URIs wanted.
    flux = InputMapping(
        format_key="output_format",
        negative_prompt_key=None,
        guidance_key=None,
        sync_mode=True,
        extra={"acceleration": "regular"},
    )
    request = ImageRequest(
        prompt="p",
        width=640,
        height=480,
        negative_prompt="x",
        guidance_scale=3.0,
        output_format="jpeg",
        options={"fal_input": {"acceleration": "high"}},
    )
    assert to_input(request, flux) == {
        "prompt": "p",
        "image_size": {"width": 640, "height": 480},
        "num_images": 1,
        "output_format": "jpeg",
        "sync_mode": True,
        "acceleration": "high",
    }
    # webp is not a format fast-sdxl can produce: leave it out, the gateway re-encodes.
    assert "format" not in to_input(ImageRequest(prompt="p", output_format="webp"), InputMapping())


def test_n_maps_to_num_images_and_parallel_calls() -> None:
    assert split_counts(3, InputMapping()) == [3]
    assert split_counts(6, InputMapping(max_images_per_call=4)) == [4, 2]
    assert split_counts(3, InputMapping(num_images_key=None)) == [1, 1, 1]
    inputs = to_inputs(ImageRequest(prompt="p", n=6, seed=100), InputMapping(max_images_per_call=4))
    assert [(i["num_images"], i["seed"]) for i in inputs] == [(4, 100), (2, 104)]
    single = to_inputs(ImageRequest(prompt="p", n=2), InputMapping(num_images_key=None))
    assert single == [{"prompt": "p", "image_size": "square_hd", "format": "png"}] * 2


# -- pure: response mapping --------------------------------------------------------------------------


def test_from_output() -> None:
    out = from_output(
        {
            "images": [
                {"url": "https://v3.fal.media/files/a.jpg", "width": 1024, "height": 768, "content_type": "image/jpeg"}
            ],
            "timings": {"inference": 1.25},
            "seed": 9,
            "has_nsfw_concepts": [False],
            "prompt": "p",
        }
    )
    assert out.images[0].url.endswith("a.jpg") and (out.images[0].width, out.images[0].height) == (1024, 768)
    assert (out.predict_seconds, out.seed, out.has_nsfw_concepts) == (1.25, 9, (False,))
    assert from_output({"images": [], "timings": {"a": 1, "b": 0.5}}).predict_seconds == 1.5
    assert from_output({"images": []}).predict_seconds is None
    bad: object
    for bad in ({"detail": "x"}, [], {"images": [{"width": 3}]}, {"images": "no"}):
        with pytest.raises(BackendProtocolError):
            from_output(bad)


KEY = "fal-secret-key-abcdef"


def _resp(status: int, body: object = None, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers or {})


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (_resp(200, {"images": []}), None),
        (_resp(429, {"detail": "slow down"}, {"Retry-After": "3"}), BackendOverloaded),
        (
            _resp(
                503,
                {"detail": "x", "error_type": "runner_scheduling_failure"},
                {"X-Fal-Error-Type": "runner_scheduling_failure"},
            ),
            BackendOverloaded,
        ),
        (_resp(503, {"detail": "x", "error_type": "runner_disconnected"}), BackendOverloaded),
        (_resp(503, {"detail": "x"}, {"X-Fal-Error-Type": "runner_connection_timeout"}), BackendOverloaded),
        (_resp(504, {"detail": "x", "error_type": "startup_timeout"}), BackendTimeout),
        (_resp(504, {"detail": "x"}, {"X-Fal-Error-Type": "request_timeout"}), BackendTimeout),
        (_resp(504, {"detail": "x"}, {"X-Fal-Request-Timeout-Type": "user"}), BackendRejected),
        (_resp(500, {"detail": "boom"}, {"X-Fal-Needs-Retry": "1"}), BackendOverloaded),
        (
            _resp(422, {"detail": [{"loc": ["body", "num_images"], "msg": "must be <= 8", "type": "value_error"}]}),
            BackendRejected,
        ),
        (_resp(500, {"detail": "CUDA out of memory"}), BackendFailed),
        (_resp(401, {"detail": f"bad key {KEY}"}), BackendFailed),
    ],
)
def test_error_for(response: httpx.Response, kind: type | None) -> None:
    error = error_for(response, backend="fal", secrets=(KEY,))
    if kind is None:
        assert error is None
        return
    assert error is not None and type(error) is kind
    assert KEY not in error.message


def test_error_for_details() -> None:
    rate = error_for(_resp(429, {"detail": "x"}, {"Retry-After": "3"}), backend="fal")
    assert rate is not None and rate.retry_after == 3.0
    invalid = error_for(
        _resp(
            422,
            {
                "detail": [
                    {"loc": ["body", "image_size", "width"], "msg": "too large"},
                    {"loc": ["body", "prompt"], "msg": "field required"},
                ]
            },
        ),
        backend="f",
    )
    assert invalid is not None and "image_size.width: too large; prompt: field required" in invalid.message
    # X-Fal-Request-Timeout came from our own start_timeout: there may be time left for another backend.
    start = error_for(_resp(504, {}, {"X-Fal-Request-Timeout-Type": "user"}), backend="f", deadline_bound=False)
    assert type(start) is BackendTimeout and start.fallback


def test_settings_are_strict() -> None:
    ok = build(FalSettings, {"key": "k", "app": "fal-ai/flux/schnell", "input": {"presets": {"sq": "64x64"}}})
    assert ok.mode == "queue" and ok.input.preset_table() == {"sq": (64, 64)}
    for raw, where in [
        ({"key": "k", "app": "fast-sdxl"}, "app"),
        ({"key": " ", "app": "a/b"}, "key"),
        ({"key": "k", "app": "a/b", "modee": "sync"}, "modee"),
        ({"key": "k", "app": "a/b", "mode": "stream"}, "mode"),
        ({"key": "k", "app": "a/b", "input": {"presets": {"x": "big"}}}, "WIDTHxHEIGHT"),
    ]:
        with pytest.raises(SettingsError, match=where):
            build(FalSettings, raw)


# -- against the fake -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[FalFake]:
    fake = FalFake(key=KEY)
    with fake.serve():
        yield fake


@pytest.fixture
def fake(served: FalFake) -> FalFake:
    served.reset()
    return served


async def started(fake: FalFake, **overrides: object) -> FalBackend:
    raw = {
        "key": fake.key,
        "app": "fal-ai/fast-sdxl",
        "queue_base_url": fake.queue_url,
        "run_base_url": fake.run_url,
        "poll_interval": 0.01,
        "allowed_output_hosts": [fake.output_host],
        "cancel_timeout": 2.0,
        **overrides,
    }
    spec = BackendSpec(
        name="falfake", type="fal", settings=build(FalSettings, raw), timeouts=Timeouts(connect=2, read=5, total=10)
    )
    backend = FalBackend(spec)
    assert not backend.ready()
    await backend.start()
    assert backend.ready()
    return backend


def req(**kw: Any) -> ImageRequest:
    kw.setdefault("prompt", "a red fox")
    kw.setdefault("deadline", time.monotonic() + 10)
    return ImageRequest(**kw)


async def test_not_started_is_unavailable(fake: FalFake) -> None:
    backend = await started(fake)
    await backend.aclose()
    assert not backend.ready()
    with pytest.raises(BackendUnavailable):
        await backend.generate(req(), StageClock())


async def test_queue_success(fake: FalFake) -> None:
    fake.reset(queue_polls=3, inference_time=0.75)
    backend = await started(fake, app="fal-ai/fast-sdxl/turbo")
    clock = StageClock()
    try:
        result = await backend.generate(req(width=1024, height=768, output_format="png", seed=5), clock)
    finally:
        await backend.aclose()
    assert len(result.images) == 1 and result.images[0].format == "png"
    assert result.images[0].as_bytes().startswith(b"\x89PNG")
    assert result.usage.images == 1 and result.usage.megapixels == pytest.approx(1024 * 768 / 1e6)
    assert result.usage.predict_seconds == 0.75
    assert clock.stages["remote_predict"] == 0.75 and clock.stages["remote_queue"] > 0
    assert clock.backend_s > 0
    methods_paths = [(m, p) for m, p, _ in fake.log]
    # Submit keeps the sub-path; status/result use the returned URLs, which drop it.
    assert methods_paths[0] == ("POST", "/fal-ai/fast-sdxl/turbo")
    job = next(iter(fake.jobs.values()))
    assert job.input["image_size"] == "landscape_4_3" and job.input["format"] == "png" and job.input["seed"] == 5
    status_polls = [p for m, p in methods_paths if p.endswith("/status")]
    assert len(status_polls) == 5 and all(p.startswith("/fal-ai/fast-sdxl/requests/") for p in status_polls)
    submit_headers = fake.log[0][2]
    assert 0 < float(submit_headers["x-fal-request-timeout"]) <= 10
    # The key goes to the API only, never to the output host.
    assert fake.file_fetches and all("authorization" not in h for h in fake.file_fetches)


async def test_n_beyond_max_runs_parallel_calls(fake: FalFake) -> None:
    backend = await started(fake, input={"max_images_per_call": 2})
    try:
        result = await backend.generate(req(n=3, seed=10), StageClock())
    finally:
        await backend.aclose()
    assert len(result.images) == 3 and {i.format for i in result.images} == {"png"}
    assert sorted((j.input["num_images"], j.input["seed"]) for j in fake.jobs.values()) == [(1, 12), (2, 10)]
    assert len({i.as_bytes() for i in result.images}) == 3  # offset seeds: distinct images


async def test_sync_mode_with_data_uris(fake: FalFake) -> None:
    backend = await started(fake, mode="sync", input={"sync_mode": True})
    clock = StageClock()
    try:
        result = await backend.generate(req(n=2, width=512, height=512, output_format="jpeg"), clock)
    finally:
        await backend.aclose()
    assert [i.as_bytes()[:3] for i in result.images] == [b"\xff\xd8\xff"] * 2
    assert fake.jobs == {} and fake.file_fetches == []  # no queue, no URL fetch
    assert clock.stages == {"remote_predict": 0.05}


@pytest.mark.parametrize("mode", ["queue", "sync"])
@pytest.mark.parametrize(
    ("failure", "kind", "retry_after"),
    [
        (Failure.rate_limited(2), BackendOverloaded, 2.0),
        (Failure.infra("runner_scheduling_failure"), BackendOverloaded, None),
        (Failure.infra("startup_timeout"), BackendTimeout, None),
        (Failure.user_timeout(), BackendRejected, None),
        (Failure.validation("image_size", "unsupported size"), BackendRejected, None),
        (Failure.needs_retry(), BackendOverloaded, None),
        (Failure(500, {"detail": f"internal error for Key {KEY}"}), BackendFailed, None),
    ],
)
async def test_failures_map_to_vocabulary(
    fake: FalFake, mode: str, failure: Failure, kind: type[BackendError], retry_after: float | None
) -> None:
    fake.reset(fail_submit=[failure])
    backend = await started(fake, mode=mode)
    try:
        with pytest.raises(kind) as info:
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert type(info.value) is kind and info.value.retry_after == retry_after
    assert KEY not in str(info.value)
    if failure.status == 422:
        assert "image_size: unsupported size" in info.value.message


async def test_status_poll_blips_are_tolerated(fake: FalFake) -> None:
    fake.reset(fail_status=[Failure.infra("runner_connection_timeout"), Failure.rate_limited(0)])
    backend = await started(fake)
    try:
        result = await backend.generate(req(), StageClock())
        assert len(result.images) == 1
        fake.reset(progress_polls=10**6, fail_status=[Failure.infra("runner_disconnected")] * 4)
        with pytest.raises(BackendOverloaded):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert len(fake.cancelled) == 1  # gave up on it: cancelled


async def test_user_timeout_from_start_timeout_falls_back(fake: FalFake) -> None:
    fake.reset(fail_submit=[Failure.user_timeout()])
    backend = await started(fake, start_timeout=2.0)
    try:
        with pytest.raises(BackendTimeout):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert fake.log[0][2]["x-fal-request-timeout"] == "2.000"


async def test_wrong_key_is_not_echoed(fake: FalFake) -> None:
    backend = await started(fake, key="wrong-key-123456")
    try:
        with pytest.raises(BackendFailed) as info:
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert "401" in info.value.message and "wrong-key-123456" not in info.value.message


@pytest.mark.parametrize(
    ("completed_error", "kind", "text"),
    [
        (Failure.validation("prompt", "prompt is flagged"), BackendRejected, "prompt: prompt is flagged"),
        (Failure(500, {"detail": "CUDA out of memory"}), BackendFailed, "CUDA out of memory"),
        (Failure.infra("request_timeout"), BackendTimeout, "request_timeout"),
        (Failure.user_timeout(), BackendRejected, "deadline passed before a fal runner started"),
    ],
)
async def test_completed_with_error(fake: FalFake, completed_error: Failure, kind: type, text: str) -> None:
    fake.reset(completed_error=completed_error)
    backend = await started(fake)
    try:
        with pytest.raises(kind, match=text):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert fake.cancelled == []  # it was done: nothing to cancel


@pytest.mark.parametrize("mode", ["queue", "sync"])
@pytest.mark.parametrize(
    ("scenario", "kind", "text"),
    [
        ({"result": "malformed"}, BackendProtocolError, "not valid JSON"),
        ({"result": "reset"}, BackendProtocolError, "connection broke"),
        ({"output_status": 404}, OutputFetchError, "HTTP 404"),
    ],
)
async def test_broken_outputs(fake: FalFake, mode: str, scenario: dict, kind: type, text: str) -> None:
    fake.reset(**scenario)
    backend = await started(fake, mode=mode)
    try:
        with pytest.raises(kind, match=text):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()


async def test_output_on_other_host_is_refused(fake: FalFake) -> None:
    # Same server under another name: a fetch would show up in file_fetches.
    fake.reset(output_base=fake.queue_url.replace("127.0.0.1", "localhost"))
    backend = await started(fake)
    try:
        with pytest.raises(OutputNotAllowed, match="localhost"):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()
    assert fake.file_fetches == []


async def test_queue_urls_on_other_host_are_not_followed(fake: FalFake) -> None:
    fake.reset(queue_url_base=fake.queue_url.replace("127.0.0.1", "localhost"))
    backend = await started(fake)
    try:
        with pytest.raises(BackendProtocolError, match="outside"):
            await backend.generate(req(), StageClock())
        assert await asyncio.to_thread(fake.cancel_seen.wait, 5)  # cancelled on the configured origin
    finally:
        await backend.aclose()
    assert all(h["host"] == fake.output_host for _, _, h in fake.log)
    assert [m for m, p, _ in fake.log] == ["POST", "PUT"]


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_cancellation_cancels_the_remote_request(fake: FalFake) -> None:
    fake.reset(queue_polls=2, progress_polls=10**6)
    backend = await started(fake)
    task = asyncio.create_task(backend.generate(req(), StageClock()))
    await _wait_for(lambda: any(j.polls > 3 for j in fake.jobs.values()))
    assert backend.load().in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (job,) = fake.jobs.values()
    assert fake.cancelled == [job.id]  # the PUT went out before the CancelledError was re-raised
    assert backend.load().in_flight == 0
    await backend.aclose()


async def test_deadline_in_queue_cancels_and_times_out(fake: FalFake) -> None:
    fake.reset(progress_polls=10**6)
    backend = await started(fake)
    try:
        with pytest.raises(BackendTimeout, match="deadline"):
            await backend.generate(req(deadline=time.monotonic() + 0.3), StageClock())
    finally:
        await backend.aclose()
    assert len(fake.cancelled) == 1


async def test_parallel_call_failure_cancels_the_sibling(fake: FalFake) -> None:
    # Two calls, both queued; then the second one's status polls fail for good (a 500 is not a blip): the
    # first, still queued, must be cancelled remotely before the failure reaches the caller.
    fake.reset(progress_polls=10**6, fail_last_job=(2, Failure(500, {"detail": "runner crashed"})))
    backend = await started(fake, input={"max_images_per_call": 1})
    try:
        with pytest.raises(BackendFailed, match="runner crashed"):
            await backend.generate(req(n=2), StageClock())
    finally:
        await backend.aclose()
    sibling, failed = fake.jobs.values()  # in submit order
    assert sibling.id in fake.cancelled  # cancelled because the other call failed
    assert set(fake.cancelled) == {sibling.id, failed.id}  # and the failed one, which we gave up on


async def test_sync_cancellation_drops_the_connection(fake: FalFake) -> None:
    fake.reset(run_delay=5.0)
    backend = await started(fake, mode="sync")
    task = asyncio.create_task(backend.generate(req(), StageClock()))
    await _wait_for(lambda: len(fake.log) == 1)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await backend.aclose()
    assert await asyncio.to_thread(fake.run_disconnect_seen.wait, 3)


# -- through the gateway ----------------------------------------------------------------------------


def gateway_config(fake: FalFake) -> object:
    from gateway.config import load_config_text

    return load_config_text(
        f"""
server: {{default_deadline_s: 20, max_retries: 1, retry_backoff_s: 0.01, cooldown_failures: 0}}
backends:
  fal_queue:
    type: fal
    quality: 0.8
    cost: {{per_image: 0.003}}
    timeouts: {{connect: 2, read: 10, total: 20}}
    capabilities: {{sizes: ["512x512", "1024x768"], max_n: 4}}
    settings:
      key: ${{FAL_TEST_KEY}}
      app: fal-ai/fast-sdxl
      queue_base_url: {fake.queue_url}
      poll_interval: 0.01
      allowed_output_hosts: ["{fake.output_host}"]
  fal_sync:
    type: fal
    quality: 0.8
    cost: {{per_second: 0.001}}
    capabilities: {{sizes: ["512x512", "1024x768"], max_n: 4}}
    settings:
      key: ${{FAL_TEST_KEY}}
      app: fal-ai/fast-sdxl
      mode: sync
      run_base_url: {fake.run_url}
      input: {{sync_mode: true}}
tiers:
  standard: {{quality_floor: 0.5}}
routes:
  - name: fal
    strategy: fallback
    candidates: [{{backend: fal_queue}}, {{backend: fal_sync}}]
default_tier: standard
""",
        "fal-test-routes.yaml",
    )


@pytest.fixture(scope="module")
def gateway(served: FalFake) -> Iterator[str]:
    from tests.servers import serve_gateway, with_env

    with serve_gateway(with_env(lambda: gateway_config(served), {"FAL_TEST_KEY": served.key})) as base:
        yield base


def test_gateway_success(gateway: str, fake: FalFake) -> None:
    fake.reset(queue_polls=2, inference_time=0.25)
    resp = _post(gateway, {"prompt": "a red fox", "size": "1024x768", "n": 2, "output_format": "jpeg"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-backend"] == "fal_queue" and resp.headers["x-attempts"] == "1"
    assert resp.headers["x-cost-usd"] == "0.006000"
    timing = resp.headers["server-timing"]
    assert "remote_queue;dur=" in timing and "remote_predict;dur=250.000" in timing
    images = [base64.b64decode(d["b64_json"]) for d in resp.json()["data"]]
    assert len(images) == 2 and all(i.startswith(b"\xff\xd8\xff") for i in images)
    (job,) = fake.jobs.values()
    assert job.input["image_size"] == "landscape_4_3" and job.input["num_images"] == 2


def test_gateway_falls_back_to_the_next_fal_backend(gateway: str, fake: FalFake) -> None:
    # The queue backend is refused twice (first try + one same-backend retry), the sync one serves it.
    leak = Failure(
        503,
        {"detail": f"no runner for Key {fake.key}", "error_type": "runner_scheduling_failure"},
        {"X-Fal-Error-Type": "runner_scheduling_failure"},
    )
    fake.reset(fail_submit=[leak, leak])
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-backend"] == "fal_sync" and resp.headers["x-attempts"] == "3"
    assert fake.jobs == {} and fake.file_fetches == []  # sync + data URIs
    # A terminal failure does not fall back, and the key stays out of the answer.
    fake.reset(fail_submit=[Failure(422, {"detail": [{"loc": ["body", "prompt"], "msg": f"bad {fake.key}"}]})])
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 422 and "prompt: bad" in resp.text
    assert fake.key not in resp.text and len(fake.log) == 1


def test_gateway_output_on_other_host_is_refused(gateway: str, fake: FalFake) -> None:
    fake.reset(output_base=fake.queue_url.replace("127.0.0.1", "localhost"), fail_submit=[])
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    # The queue backend refuses the URL; the sync backend (data URIs) serves the request.
    assert resp.status_code == 200 and resp.headers["x-backend"] == "fal_sync"
    assert fake.file_fetches == []


def test_gateway_client_disconnect_cancels_the_fal_request(gateway: str, fake: FalFake) -> None:
    fake.reset(progress_polls=10**6)
    with pytest.raises(httpx.ReadTimeout):
        _post(gateway, {"prompt": "a red fox", "size": "512x512"}, timeout=0.5)
    assert fake.cancel_seen.wait(5), "the gateway never cancelled the fal request"
    (job,) = fake.jobs.values()
    assert fake.cancelled == [job.id]
