"""``type: replicate``: the pure mapping tables, then the backend against the Replicate fake over real HTTP
(every failure mode on demand), then through the gateway."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from backends.base import BackendSpec, ImageRequest, StageClock, Timeouts
from backends.errors import (
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    OutputFetchError,
    OutputNotAllowed,
)
from backends.predictions import (
    FLUX_ASPECT_RATIOS,
    FLUX_PRO_ASPECT_RATIOS,
    classify_failure,
    from_prediction,
    nearest_aspect_ratio,
    resolve_mapping,
    to_input,
    to_inputs,
)
from backends.replicate import ReplicateBackend, Settings
from backends.settings import SettingsError, build
from tests.fakes.replicate_fake import MODELS, TOKEN, FakeReplicate, Scenario
from tests.servers import post_generation as _post

# -- pure: request → input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "ratios", "expected"),
    [
        ((1024, 1024), FLUX_ASPECT_RATIOS, "1:1"),
        ((1344, 768), FLUX_ASPECT_RATIOS, "16:9"),
        ((768, 1344), FLUX_ASPECT_RATIOS, "9:16"),
        ((1536, 640), FLUX_ASPECT_RATIOS, "21:9"),
        ((1216, 832), FLUX_ASPECT_RATIOS, "3:2"),
        ((832, 1216), FLUX_ASPECT_RATIOS, "2:3"),
        ((1024, 768), FLUX_ASPECT_RATIOS, "4:3"),
        ((1152, 896), FLUX_ASPECT_RATIOS, "5:4"),  # 1.29: nearer 5:4 (1.25) than 4:3 (1.33)
        ((1024, 1280), FLUX_ASPECT_RATIOS, "4:5"),
        ((2048, 512), FLUX_ASPECT_RATIOS, "21:9"),  # wider than anything: the widest
        ((1536, 640), FLUX_PRO_ASPECT_RATIOS, "16:9"),  # pro has no 21:9
        ((1792, 1024), FLUX_ASPECT_RATIOS, "16:9"),  # DALL-E 3's wide size
        ((1024, 1536), FLUX_ASPECT_RATIOS, "2:3"),  # gpt-image-1's portrait size
    ],
)
def test_nearest_aspect_ratio(size, ratios, expected):
    width, height = size
    assert nearest_aspect_ratio(width, height, ratios) == expected


def req(**kw: Any) -> ImageRequest:
    return ImageRequest(**{"prompt": "a red fox", **kw})


FULL = {
    "n": 2,
    "width": 1344,
    "height": 768,
    "negative_prompt": "blurry",
    "steps": 4,
    "guidance_scale": 3.5,
    "seed": 7,
    "output_format": "jpeg",
    "output_compression": 20,
}


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "sdxl",
            {
                "prompt": "a red fox",
                "width": 1344,
                "height": 768,
                "num_outputs": 2,
                "negative_prompt": "blurry",
                "num_inference_steps": 4,
                "guidance_scale": 3.5,
                "seed": 7,
            },
        ),
        (
            "flux_schnell",
            {
                "prompt": "a red fox",
                "aspect_ratio": "16:9",
                "megapixels": "1",
                "num_outputs": 2,
                "num_inference_steps": 4,
                "seed": 7,
                "output_format": "jpg",
            },
        ),
        (
            "flux_dev",
            {
                "prompt": "a red fox",
                "aspect_ratio": "16:9",
                "megapixels": "1",
                "num_outputs": 2,
                "num_inference_steps": 4,
                "guidance": 3.5,
                "seed": 7,
                "output_format": "jpg",
            },
        ),
        ("custom", {"prompt": "a red fox"}),
    ],
)
def test_to_input_per_family(family, expected):
    mapping = resolve_mapping(family, {}, {})
    assert to_input(req(**{**FULL, "n": 2 if family != "custom" else 1}), mapping) == expected


def test_output_compression_is_left_to_the_gateway():
    # The dispatcher asks a backend for a format and applies the client's compression itself (the requests a
    # backend gets carry none): no input is fed from it (FULL above sets one), and no setting claims to.
    with pytest.raises(SettingsError, match=r"input\.quality_field: unknown key"):
        resolve_mapping("flux_schnell", {"quality_field": "output_quality"}, {})


def test_flux_pro_makes_one_image_per_prediction_with_distinct_seeds():
    mapping = resolve_mapping("flux_pro", {}, {})
    inputs = to_inputs(req(n=3, width=1024, height=1024, seed=100, output_format="webp"), mapping)
    assert inputs == [
        {"prompt": "a red fox", "aspect_ratio": "1:1", "seed": s, "output_format": "webp"} for s in (100, 101, 102)
    ]


def test_n_beyond_max_outputs_splits_into_calls():
    mapping = resolve_mapping("sdxl", {}, {})
    inputs = to_inputs(req(n=6, seed=10), mapping)
    assert [(i["num_outputs"], i["seed"]) for i in inputs] == [(4, 10), (2, 14)]
    assert [
        i["num_outputs"] for i in to_inputs(req(n=3), resolve_mapping("sdxl", {"max_outputs_per_call": 1}, {}))
    ] == [1, 1, 1]


def test_small_sizes_ask_flux_for_a_quarter_megapixel():
    mapping = resolve_mapping("flux_schnell", {}, {})
    assert to_input(req(width=512, height=512), mapping)["megapixels"] == "0.25"
    assert to_input(req(width=768, height=768), mapping)["megapixels"] == "1"


def test_overrides_static_inputs_and_route_options():
    mapping = resolve_mapping(
        "sdxl",
        {"steps_field": None, "n_field": "num_images", "width_field": "w"},
        {"apply_watermark": False, "num_images": 9},
    )
    body = to_input(req(n=2, steps=30, options={"input": {"scheduler": "K_EULER"}}), mapping)
    # static first, the request's own values win over a static of the same name, route options last
    assert body == {
        "apply_watermark": False,
        "num_images": 2,
        "prompt": "a red fox",
        "w": 1024,
        "height": 1024,
        "scheduler": "K_EULER",
    }
    with pytest.raises(SettingsError, match=r"input\.bogus"):
        resolve_mapping("sdxl", {"bogus": 1}, {})
    with pytest.raises(SettingsError, match="W:H"):
        resolve_mapping("flux_schnell", {"aspect_ratios": ["square"]}, {})


def test_png_only_model_gets_no_format_field():
    body = to_input(req(output_format="webp"), resolve_mapping("sdxl", {}, {}))
    assert "output_format" not in body  # the gateway re-encodes what comes back


# -- pure: prediction → result -----------------------------------------------------------------------------


def test_from_prediction_succeeded_with_timings():
    p = from_prediction(
        {
            "id": "abc",
            "status": "succeeded",
            "output": ["https://replicate.delivery/x/out-0.webp"],
            "created_at": "2024-09-30T16:13:41.614282Z",
            "started_at": "2024-09-30T16:13:43.114282Z",
            "completed_at": "2024-09-30T16:13:44Z",
            "metrics": {"predict_time": 0.87, "total_time": 2.4},
            "urls": {"get": "https://api.replicate.com/v1/predictions/abc", "cancel": 5},
        }
    )
    assert p.terminal and p.id == "abc" and p.outputs == ("https://replicate.delivery/x/out-0.webp",)
    assert p.timings["remote_predict"] == 0.87
    assert p.timings["remote_queue"] == pytest.approx(1.5)
    assert dict(p.urls) == {"get": "https://api.replicate.com/v1/predictions/abc"}


def test_from_prediction_shapes():
    single = from_prediction({"id": "a", "status": "succeeded", "output": "data:image/png;base64,AAAA"})
    assert single.outputs == ("data:image/png;base64,AAAA",) and dict(single.timings) == {}
    # cog writes nanosecond timestamps with an offset
    cog = from_prediction(
        {
            "status": "processing",
            "created_at": "2026-01-01T00:00:00.000000001+00:00",
            "started_at": "2026-01-01T00:00:00.250000999+00:00",
        }
    )
    assert cog.id is None and not cog.terminal and cog.timings["remote_queue"] == pytest.approx(0.25)
    failed = from_prediction({"id": "a", "status": "failed", "error": "boom", "output": None})
    assert failed.error == "boom" and failed.outputs == ()
    bad: object
    for bad in ([], {"status": "finished"}, {"status": "succeeded", "output": {"images": 1}}):
        with pytest.raises(BackendProtocolError):
            from_prediction(bad)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("NSFW content detected. Try running it again, or try a different prompt.", BackendRejected),
        ("ValueError: prompt is too long", BackendRejected),
        ("Error: The input or output was flagged as sensitive. (E005)", BackendRejected),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", BackendFailed),
        ("Prediction interrupted; please retry (code: PA)", BackendFailed),
        ("Director: unexpected error handling prediction (E8765)", BackendFailed),
        ("Prediction timed out", BackendFailed),
        (None, BackendFailed),
    ],
)
def test_classify_failure(error, expected):
    assert classify_failure(error) is expected


def test_settings_validation():
    base = {"api_token": "t", "model": "a/b"}
    assert build(Settings, base).create_path == "/v1/models/a/b/predictions"
    assert build(Settings, {"api_token": "t", "deployment": "a/b"}).create_path == "/v1/deployments/a/b/predictions"
    assert build(Settings, {"api_token": "t", "version": "f" * 64}).create_path == "/v1/predictions"
    for bad, message in [
        ({"api_token": "t"}, "exactly one"),
        ({**base, "version": "f" * 64}, "exactly one"),
        ({"api_token": "t", "version": "abc"}, "64"),
        ({"api_token": "t", "model": "nope"}, "owner/name"),
        ({**base, "prefer_wait": 61}, "1..60"),
        ({**base, "api_token": " "}, "REPLICATE_API_TOKEN"),
        ({**base, "family": "dalle"}, "family"),
        ({**base, "input": {"size_mode": "square"}}, "size_mode"),
    ]:
        with pytest.raises(SettingsError, match=message):
            build(Settings, bad)


# -- the backend against the fake --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[FakeReplicate]:
    fake = FakeReplicate()
    with fake.serve():
        yield fake


@pytest.fixture()
def fake(served: FakeReplicate) -> FakeReplicate:
    served.reset()
    return served


def make(fake: FakeReplicate, **settings: Any) -> ReplicateBackend:
    raw = {
        "api_token": TOKEN,
        "base_url": fake.base_url,
        "model": "black-forest-labs/flux-schnell",
        "family": "flux_schnell",
        "poll_interval": 0.05,
        "prefer_wait": 5,
        "cancel_timeout": 2.0,
        "allowed_output_hosts": [urlsplit(fake.base_url).netloc],
        **settings,
    }
    spec = BackendSpec(
        name="rep", type="replicate", settings=build(Settings, raw), timeouts=Timeouts(connect=2, read=10, total=20)
    )
    return ReplicateBackend(spec)


@pytest.fixture()
async def backend(fake: FakeReplicate) -> AsyncIterator[ReplicateBackend]:
    b = make(fake)
    await b.start()
    yield b
    await b.aclose()


async def until(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_success_official_model(fake, backend):
    clock = StageClock()
    result = await backend.generate(
        req(n=2, width=1344, height=768, seed=1, output_format="jpeg", deadline=time.monotonic() + 30), clock
    )
    assert [i.format for i in result.images] == ["jpeg", "jpeg"]
    assert result.images[0].data[:3] == b"\xff\xd8\xff" and result.images[0].data != result.images[1].data
    assert result.usage.images == 2 and result.usage.predict_seconds is not None
    assert "remote_predict" in clock.stages and clock.backend_s > 0
    (create,) = fake.creates()
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.body == {
        "input": {
            "prompt": "a red fox",
            "aspect_ratio": "16:9",
            "megapixels": "1",
            "num_outputs": 2,
            "seed": 1,
            "output_format": "jpg",
        }
    }
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert create.headers["prefer"] == "wait=5"
    assert create.headers["cancel-after"] in ("29s", "30s")
    fetches = [r for r in fake.requests if r.path.startswith("/delivery/")]
    assert len(fetches) == 2 and all("authorization" not in r.headers for r in fetches)  # token stays home


async def test_version_and_deployment(fake):
    sdxl = MODELS["stability-ai/sdxl"].version
    for settings, path in [
        ({"model": None, "version": sdxl, "family": "sdxl"}, "/v1/predictions"),
        (
            {"model": None, "deployment": "acme/sdxl-prod", "family": "sdxl"},
            "/v1/deployments/acme/sdxl-prod/predictions",
        ),
    ]:
        b = make(fake, **settings)
        await b.start()
        try:
            result = await b.generate(req(width=256, height=128), StageClock())
        finally:
            await b.aclose()
        assert result.images[0].format == "png"
        assert fake.creates()[-1].path == path
    assert fake.creates()[0].body["version"] == sdxl


async def test_single_output_model_runs_parallel_predictions(fake):
    b = make(fake, model="black-forest-labs/flux-1.1-pro", family="flux_pro")
    await b.start()
    try:
        fake.plan(*[Scenario(run_s=1.0)] * 3)
        started = time.monotonic()
        result = await b.generate(req(n=3, seed=5, output_format="webp"), StageClock())
        elapsed = time.monotonic() - started
    finally:
        await b.aclose()
    assert len(result.images) == 3 and {i.format for i in result.images} == {"webp"}
    assert sorted(c.body["input"]["seed"] for c in fake.creates()) == [5, 6, 7]
    assert elapsed < 2.5  # concurrently, not 3 x 1 s (a wide margin: shared CI machines stall)
    assert result.usage.predict_seconds == pytest.approx(3.0, abs=0.1)


async def test_non_terminal_sync_answer_is_polled(fake):
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(queue_s=0.4, run_s=1.0))
        clock = StageClock()
        result = await b.generate(req(), clock)
    finally:
        await b.aclose()
    assert len(result.images) == 1
    assert any(r.method == "GET" and r.path.startswith("/v1/predictions/") for r in fake.requests)
    assert clock.stages["remote_queue"] == pytest.approx(0.4, abs=0.05)
    assert clock.stages["remote_predict"] == pytest.approx(1.0, abs=0.05)
    assert clock.backend_s >= 1.3  # the held create plus the poll sleeps


async def test_prediction_urls_on_another_host_are_not_followed(fake):
    # We send the token wherever we poll and cancel: only to the configured API origin.
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(run_s=1.2, foreign_urls=True), Scenario(run_s=10, foreign_urls=True))
        await b.generate(req(), StageClock())
        with pytest.raises(BackendTimeout):
            await b.generate(req(deadline=time.monotonic() + 1.3), StageClock())
    finally:
        await b.aclose()
    api_host = urlsplit(fake.base_url).netloc
    assert {r.headers["host"] for r in fake.requests} == {api_host}
    assert any(r.method == "GET" and r.path.startswith("/v1/predictions/") for r in fake.requests)
    assert len(fake.cancels) == 1


async def test_poll_errors_are_retried(fake):
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(
            Scenario(run_s=1.2, poll_status=502, poll_errors=2), Scenario(run_s=1.2, poll_status=429, poll_errors=2)
        )
        for _ in range(2):
            result = await b.generate(req(), StageClock())
            assert len(result.images) == 1
    finally:
        await b.aclose()
    assert sum(p.polls for p in fake.predictions.values()) >= 6


@pytest.mark.parametrize(
    ("scenario", "error", "check"),
    [
        (Scenario(http_status=429, retry_after="2"), BackendOverloaded, lambda e: e.retry_after == 2.0),
        (Scenario(http_status=503), BackendOverloaded, lambda e: e.retry_after is None),
        (Scenario(http_status=500), BackendFailed, None),
        (Scenario(outcome="failed", error="NSFW content detected. Try a different prompt."), BackendRejected, None),
        (Scenario(outcome="failed", error="CUDA out of memory"), BackendFailed, None),
        (Scenario(outcome="canceled"), BackendFailed, lambda e: "canceled upstream" in e.message),
        (Scenario(outcome="aborted"), BackendTimeout, lambda e: "aborted" in e.message),
        (Scenario(break_create="malformed"), BackendProtocolError, lambda e: "JSON" in e.message),
        (Scenario(break_create="reset"), BackendProtocolError, lambda e: "connection broke" in e.message),
        (Scenario(output="expired"), OutputFetchError, lambda e: "404" in e.message),
        (Scenario(output="foreign"), OutputNotAllowed, lambda e: "localhost" in e.message),
        (Scenario(output="garbage"), BackendProtocolError, None),
    ],
)
async def test_failures_map_to_the_vocabulary(fake, backend, scenario, error, check):
    fake.plan(scenario)
    with pytest.raises(error) as info:
        await backend.generate(req(), StageClock())
    assert type(info.value) is error
    if check:
        assert check(info.value), info.value.message
    assert TOKEN not in info.value.message


async def test_validation_error_is_rejected(fake, backend):
    with pytest.raises(BackendRejected, match="num_inference_steps"):
        await backend.generate(req(steps=30), StageClock())


async def test_foreign_output_url_is_never_fetched(fake, backend):
    fake.plan(Scenario(output="foreign"))
    with pytest.raises(OutputNotAllowed):
        await backend.generate(req(), StageClock())
    assert not [r for r in fake.requests if r.path.startswith("/delivery/")]


async def test_data_uri_outputs(fake, backend):
    fake.plan(Scenario(output="data"))
    result = await backend.generate(req(n=2, output_format="png"), StageClock())
    assert [i.data[:4] for i in result.images] == [b"\x89PNG"] * 2
    assert not [r for r in fake.requests if r.path.startswith("/delivery/")]


async def test_no_secret_in_errors(fake, backend):
    fake.plan(
        Scenario(http_status=500, detail=f"upstream broke; request had Authorization: Bearer {TOKEN}"),
        Scenario(outcome="failed", error=f"ValueError: token {TOKEN} rejected"),
    )
    for _ in range(2):
        with pytest.raises((BackendFailed, BackendRejected)) as info:
            await backend.generate(req(), StageClock())
        assert TOKEN not in info.value.message and "[redacted]" in info.value.message
    bad = make(fake, api_token="r8_wrongWrongWrong")
    await bad.start()
    try:
        with pytest.raises(BackendFailed, match="401") as info:
            await bad.generate(req(), StageClock())
    finally:
        await bad.aclose()
    assert "r8_wrongWrongWrong" not in info.value.message


async def test_unreadable_poll_cancels_the_prediction(fake):
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(run_s=5, break_poll="malformed"))
        with pytest.raises(BackendProtocolError):
            await b.generate(req(), StageClock())
    finally:
        await b.aclose()
    assert len(fake.cancels) == 1


async def test_client_going_away_while_polling_cancels_the_prediction(fake):
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(run_s=10))
        task = asyncio.create_task(b.generate(req(), StageClock()))
        await until(lambda: any(r.method == "GET" for r in fake.requests))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the cancel was awaited (shielded) before the CancelledError went on
        (pred_id,) = fake.cancels
        assert fake.predictions[pred_id].canceled_at is not None
    finally:
        await b.aclose()


async def test_client_going_away_during_the_held_create_cancels_once_the_id_is_known(fake):
    b = make(fake, prefer_wait=3)
    await b.start()
    answer = threading.Event()  # the fake holds the create's answer until this is set
    try:
        fake.plan(Scenario(run_s=60, hold_create=answer))
        task = asyncio.create_task(b.generate(req(), StageClock()))
        await until(lambda: fake.creates())  # the create reached the fake (which holds its answer)
        task.cancel()
        # The caller is released while the create is still unanswered (it cannot be answered yet)...
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not fake.cancels
        # ...and once the answer tells us the prediction's id, it is cancelled.
        answer.set()
        await until(lambda: fake.cancels, timeout=8)
        (pred_id,) = fake.cancels
        assert fake.predictions[pred_id].canceled_at is not None  # stopped while it was running
    finally:
        answer.set()
        await b.aclose()


async def test_parallel_siblings_are_cancelled_when_one_fails(fake):
    b = make(fake, model="black-forest-labs/flux-1.1-pro", family="flux_pro", prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(run_s=10), Scenario(outcome="failed", error="NSFW content detected"), Scenario(run_s=10))
        with pytest.raises(BackendRejected):
            await b.generate(req(n=3), StageClock())
        await until(lambda: len(fake.cancels) == 2, timeout=3)
    finally:
        await b.aclose()


async def test_deadline_cancels_remote_and_times_out(fake):
    b = make(fake, prefer_wait=1)
    await b.start()
    try:
        fake.plan(Scenario(run_s=60))
        with pytest.raises(BackendTimeout, match="deadline"):
            await b.generate(req(deadline=time.monotonic() + 1.5), StageClock())
        # Given up at the deadline, not at the end of the run: the cancel found the prediction running.
        (pred_id,) = fake.cancels
        assert fake.predictions[pred_id].canceled_at is not None
        assert fake.creates()[-1].headers["cancel-after"] == "5s"  # the floor; our own cancel covers the rest
    finally:
        await b.aclose()


# -- through the gateway -----------------------------------------------------------------------------------


def gateway_config(fake: FakeReplicate) -> object:
    from gateway.config import load_config_text

    host = urlsplit(fake.base_url).netloc
    sdxl = MODELS["stability-ai/sdxl"].version
    return load_config_text(
        f"""
server: {{default_deadline_s: 20, max_retries: 1, retry_backoff_s: 0.01, cooldown_failures: 0}}
backends:
  flux:
    type: replicate
    quality: 0.7
    cost: {{per_image: 0.003}}
    timeouts: {{connect: 2, read: 10, total: 20}}
    capabilities: {{sizes: ["1024x1024", "1344x768", "512x512"], max_n: 4, max_steps: 4}}
    settings:
      api_token: ${{REPLICATE_TEST_TOKEN}}
      base_url: {fake.base_url}
      model: black-forest-labs/flux-schnell
      family: flux_schnell
      prefer_wait: 1
      poll_interval: 0.05
      allowed_output_hosts: ["{host}"]
  sdxl:
    type: replicate
    quality: 0.8
    cost: {{per_second: 0.001}}
    timeouts: {{connect: 2, read: 10, total: 20}}
    capabilities: {{sizes: ["1024x1024", "1344x768", "512x512"], max_n: 4}}
    settings:
      api_token: ${{REPLICATE_TEST_TOKEN}}
      base_url: {fake.base_url}
      version: {sdxl}
      family: sdxl
      extra_input: {{apply_watermark: false}}
      poll_interval: 0.05
      allowed_output_hosts: ["{host}"]
tiers:
  standard: {{quality_floor: 0.5}}
routes:
  - name: replicate
    strategy: fallback
    candidates: [{{backend: flux}}, {{backend: sdxl}}]
default_tier: standard
""",
        "replicate-test-routes.yaml",
    )


@pytest.fixture(scope="module")
def gateway(served: FakeReplicate) -> Iterator[str]:
    from tests.servers import serve_gateway, with_env

    with serve_gateway(with_env(lambda: gateway_config(served), {"REPLICATE_TEST_TOKEN": served.token})) as base:
        yield base


def test_gateway_success(gateway: str, fake: FakeReplicate) -> None:
    fake.plan(Scenario(queue_s=0.1, run_s=0.3))
    resp = _post(gateway, {"prompt": "a red fox", "size": "1344x768", "n": 2, "output_format": "webp"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-backend"] == "flux" and resp.headers["x-attempts"] == "1"
    assert resp.headers["x-cost-usd"] == "0.006000"
    timing = resp.headers["server-timing"]
    assert "remote_queue;dur=" in timing and "remote_predict;dur=" in timing
    images = [base64.b64decode(d["b64_json"]) for d in resp.json()["data"]]
    assert len(images) == 2 and all(i[:4] == b"RIFF" and i[8:12] == b"WEBP" for i in images)
    (create,) = fake.creates()
    assert create.body["input"]["aspect_ratio"] == "16:9" and create.body["input"]["output_format"] == "webp"


def test_gateway_falls_back_to_the_next_replicate_backend(gateway: str, fake: FakeReplicate) -> None:
    leak = Scenario(http_status=503, detail=f"no capacity for Bearer {fake.token}")
    fake.plan(leak, leak)  # flux: first try + one same-backend retry; then sdxl serves it
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-backend"] == "sdxl" and resp.headers["x-attempts"] == "3"
    assert fake.creates()[-1].body["input"]["apply_watermark"] is False
    assert base64.b64decode(resp.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
    # An infrastructure failure of the prediction falls back too; a model refusal of the input does not.
    fake.reset()
    fake.plan(Scenario(outcome="failed", error="CUDA out of memory"))
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 200 and resp.headers["x-backend"] == "sdxl"
    fake.reset()
    fake.plan(Scenario(outcome="failed", error=f"NSFW content detected (token {fake.token})"))
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 422 and "NSFW" in resp.text
    assert fake.token not in resp.text and len(fake.creates()) == 1


def test_gateway_output_on_other_host_is_refused(gateway: str, fake: FakeReplicate) -> None:
    fake.plan(Scenario(output="foreign"))
    resp = _post(gateway, {"prompt": "a red fox", "size": "512x512"})
    assert resp.status_code == 200 and resp.headers["x-backend"] == "sdxl" and resp.headers["x-attempts"] == "2"
    fetches = [r for r in fake.requests if r.path.startswith("/delivery/")]
    assert len(fetches) == 1 and fetches[0].headers["host"] == urlsplit(fake.base_url).netloc


def test_gateway_client_disconnect_cancels_the_prediction(gateway: str, fake: FakeReplicate) -> None:
    fake.plan(Scenario(run_s=30))
    with pytest.raises(httpx.ReadTimeout):
        _post(gateway, {"prompt": "a red fox", "size": "512x512"}, timeout=0.5)
    # The create was held (prefer_wait 1 s) when the client left: the cancel follows its answer.
    end = time.monotonic() + 5
    while not fake.cancels and time.monotonic() < end:
        time.sleep(0.05)
    (pred_id,) = fake.cancels
    assert fake.predictions[pred_id].state(time.time())[0] == "canceled"
