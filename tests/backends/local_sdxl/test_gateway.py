"""The local SDXL backend behind the real gateway over HTTP on 127.0.0.1: stage names in Server-Timing,
decoders per tier, health while the device is busy, OOM fallback to the next candidate, and a
disconnected client's queued request that never reaches the device."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image as PILImage

from backends.local_sdxl import LocalSDXLBackend
from backends.local_sdxl.backend import STAGES
from gateway.config import load_config_text
from tests.servers import serve_gateway

from .conftest import SIZE, Hook, wait_for

SETTINGS = (
    f"{{preset: tiny, device: cpu, default_steps: 4, max_wait_ms: 0, warmup_runs: 0, "
    f"shapes: [{{width: {SIZE}, height: {SIZE}, batch: 1}}, {{width: {SIZE}, height: {SIZE}, batch: 2}}]}}"
)
CONFIG = f"""
server: {{default_deadline_s: 30, max_retries: 0, cooldown_failures: 0}}
backends:
  primary:
    type: local_sdxl
    cost: {{per_gpu_second: 0.0004}}
    settings: {SETTINGS}
  secondary:
    type: local_sdxl
    cost: {{per_gpu_second: 0.001}}
    settings: {SETTINGS}
tiers:
  preview: {{quality_floor: 0.0, latency_budget_s: 5}}
  standard: {{quality_floor: 0.0, latency_budget_s: 30}}
routes:
  - name: preview
    match: {{tiers: [preview]}}
    candidates: [{{backend: primary, options: {{decoder: taesd}}}}]
  - name: standard
    match: {{tiers: [standard]}}
    strategy: fallback
    candidates: [{{backend: primary, options: {{decoder: full}}}}, {{backend: secondary}}]
default_tier: standard
"""


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, dict[str, LocalSDXLBackend]]]:
    config = load_config_text(CONFIG, "test-local-sdxl.yaml")
    backends = {name: LocalSDXLBackend(b.spec) for name, b in config.backends.items()}
    with serve_gateway(config, backends, ready_timeout=120) as base:
        # /readyz turns ready with the first backend (neither is `required`); the fallback tests need both.
        deadline = time.monotonic() + 120
        while not all(b.ready() for b in backends.values()):
            assert time.monotonic() < deadline, "backends not ready after 120 s"
            time.sleep(0.01)
        yield base, backends


@pytest.fixture
def hooks(served) -> Iterator[dict[str, Hook]]:
    _, backends = served
    hooks = {name: Hook() for name in backends}
    for name, backend in backends.items():
        backend.worker.inject = hooks[name]
    try:
        yield hooks
    finally:
        for name, backend in backends.items():
            hooks[name].gate.set()
            backend.worker.inject = None


def server_timing(response: httpx.Response) -> dict[str, float]:
    out = {}
    for part in response.headers["server-timing"].split(","):
        name, *params = [p.strip() for p in part.split(";")]
        out[name] = float(next(p for p in params if p.startswith("dur="))[4:])
    return out


def body(prompt: str, **kw) -> dict:
    return {"prompt": prompt, "size": f"{SIZE}x{SIZE}", **kw}


def image_of(response: httpx.Response, index: int = 0) -> PILImage.Image:
    data = base64.b64decode(response.json()["data"][index]["b64_json"])
    img = PILImage.open(io.BytesIO(data))
    img.load()
    return img


async def test_stages_appear_in_server_timing_and_metrics(served, hooks):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post("/v1/images/generations", json=body("a teapot", output_format="webp", seed=1))
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    assert response.headers["x-backend"] == "primary"
    timing = server_timing(response)
    assert set(STAGES) <= set(timing)
    assert timing["denoise"] > 0 and timing["backend"] >= timing["denoise"]
    img = image_of(response)
    assert img.format == "WEBP" and img.size == (SIZE, SIZE)
    assert hooks["primary"].batches[-1].decoder == "full"
    for stage in STAGES:  # the same stages, as histograms in seconds per backend
        assert f'imagegate_backend_stage_seconds_count{{backend="primary",stage="{stage}"}}' in metrics
    assert 'imagegate_backend_stage_seconds_bucket{backend="primary",le="300.0",stage="denoise"}' in metrics


async def test_tiers_choose_the_decoder_and_seeds_repeat(served, hooks):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        preview = [
            await client.post("/v1/images/generations", json=body("a kite", tier="preview", seed=9, n=2))
            for _ in range(2)
        ]
    assert all(r.status_code == 200 for r in preview), preview[0].text
    assert [b.decoder for b in hooks["primary"].batches] == ["taesd", "taesd"]
    assert preview[0].json()["data"] == preview[1].json()["data"]  # same seed, same images
    assert len(preview[0].json()["data"]) == 2
    assert image_of(preview[0], 0).tobytes() != image_of(preview[0], 1).tobytes()


async def test_health_answers_while_a_generation_is_in_flight(served, hooks):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        busy = asyncio.create_task(client.post("/v1/images/generations", json=body("blocker")))
        await wait_for(lambda: len(hooks["primary"].batches) == 1)
        health = await asyncio.wait_for(client.get("/healthz"), timeout=5)
        assert health.status_code == 200
        assert not busy.done()  # the device is still busy with it
        hooks["primary"].gate.set()
        assert (await busy).status_code == 200


async def test_injected_oom_falls_back_and_the_backend_keeps_serving(served, hooks):
    base, backends = served
    hooks["primary"].fail["out of memory please"] = RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post("/v1/images/generations", json=body("out of memory please"))
        assert response.status_code == 200, response.text
        assert response.headers["x-backend"] == "secondary"
        assert response.headers["x-attempts"] == "2"
        assert image_of(response).size == (SIZE, SIZE)
        again = await client.post("/v1/images/generations", json=body("all good"))
    assert again.status_code == 200 and again.headers["x-backend"] == "primary"
    assert backends["primary"].ready()


async def test_disconnected_clients_queued_request_never_runs(served, hooks):
    base, backends = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        busy = asyncio.create_task(client.post("/v1/images/generations", json=body("blocker")))
        await wait_for(lambda: len(hooks["primary"].batches) == 1)
        async with httpx.AsyncClient(base_url=base, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/images/generations", json=body("gone before its turn"))
        # The gateway saw the disconnect and cancelled the attempt: the job no longer counts as queued.
        await wait_for(lambda: backends["primary"].worker.queue_depth() == 0)
        hooks["primary"].gate.set()
        assert (await busy).status_code == 200
        assert (await client.post("/v1/images/generations", json=body("next one"))).status_code == 200
    assert "gone before its turn" not in hooks["primary"].prompts()
    assert "gone before its turn" not in hooks["secondary"].prompts()
    assert hooks["primary"].prompts() == ["blocker", "next one"]


async def test_models_endpoint_says_the_preset_draws_noise(served):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.get("/v1/models")
    assert response.status_code == 200
    assert "noise" in response.text


async def test_concurrent_requests_share_one_device_run(served, hooks):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        busy = asyncio.create_task(client.post("/v1/images/generations", json=body("blocker")))
        await wait_for(lambda: len(hooks["primary"].batches) == 1)
        pair = [
            asyncio.create_task(client.post("/v1/images/generations", json=body(f"twin {i}", seed=i))) for i in range(2)
        ]
        await wait_for(lambda: served[1]["primary"].worker.queue_depth() == 2)
        hooks["primary"].gate.set()
        responses = await asyncio.gather(busy, *pair)
    assert all(r.status_code == 200 for r in responses)
    # The two requests race over separate connections: either may be queued first.
    assert [sorted(p for p, _ in b.prompts) for b in hooks["primary"].batches] == [["blocker"], ["twin 0", "twin 1"]]
    assert image_of(responses[1]).tobytes() != image_of(responses[2]).tobytes()


async def test_unlisted_size_runs_eagerly_through_the_gateway(served, hooks):
    base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post("/v1/images/generations", json={"prompt": "wide", "size": "48x32"})
    assert response.status_code == 200, response.text
    assert image_of(response).size == (48, 32)
    assert hooks["primary"].batches[-1].eager
