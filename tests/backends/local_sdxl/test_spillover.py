"""A full local GPU queue spills over to the next candidate at once (issue #8 item 7).

The real worker with ``queue_size: 1`` behind the real gateway, a healthy remote (a fake) second: while
the device is held busy by a gate the test controls, one request runs, one queues, and every other
request is served by the remote — before the gate opens, so nobody waited for the local queue."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image as PILImage

from backends.base import Image, ImageRequest, ImageResult, Load, StageClock, Usage
from backends.local_sdxl import LocalSDXLBackend
from gateway.app import create_app
from gateway.config import load_config_text

from .conftest import SIZE, Hook, wait_for

CONFIG = f"""
# Retry-After-style waits up to 1000 s would be honoured: a full queue must not be treated as one.
server: {{default_deadline_s: 600, max_retries: 1, max_retry_after_s: 1000, cooldown_failures: 0}}
backends:
  local:
    type: local_sdxl
    cost: {{per_gpu_second: 0.0004}}
    settings: {{preset: tiny, device: cpu, default_steps: 4, max_wait_ms: 0, warmup_runs: 0, queue_size: 1,
               shapes: [{{width: {SIZE}, height: {SIZE}, batch: 1}}, {{width: {SIZE}, height: {SIZE}, batch: 4}}]}}
  remote:
    type: openai
    cost: {{per_image: 0.01}}
    settings: {{base_url: "http://127.0.0.1:9/v1"}}
routes:
  - name: main
    strategy: fallback
    candidates: [{{backend: local}}, {{backend: remote}}]
"""


class Remote:
    """A healthy remote; records whether the local device was still held when it served each request."""

    Settings = object

    def __init__(self, spec, gate) -> None:
        self.spec, self.gate = spec, gate
        self.served_while_local_busy: list[bool] = []

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        self.served_while_local_busy.append(not self.gate.is_set())
        buf = io.BytesIO()
        PILImage.new("RGB", (request.width, request.height), (0, 90, 200)).save(buf, format="PNG")
        return ImageResult((Image(data=buf.getvalue()),) * request.n, Usage(images=request.n))


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[httpx.AsyncClient, LocalSDXLBackend, Remote, Hook]]:
    config = load_config_text(CONFIG, "spill.yaml")
    local = LocalSDXLBackend(config.backends["local"].spec)
    await local.start()
    assert local.worker is not None
    hook = Hook()
    local.worker.inject = hook
    # A realistic run-time estimate (a real SDXL run takes seconds): the worker's estimated wait is then
    # minutes, which the old dispatcher slept on before retrying the same full queue.
    local.worker.ewma_run_s = 120.0
    remote = Remote(config.backends["remote"].spec, hook.gate)
    app = create_app(config, backends={"local": local, "remote": remote})
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=600
        ) as client:
            yield client, local, remote, hook
    finally:
        hook.gate.set()
        await local.aclose()


async def test_a_full_local_queue_spills_over_at_once(gateway):
    client, local, remote, hook = gateway

    def post() -> asyncio.Task[httpx.Response]:
        body = {"prompt": "blocker", "size": f"{SIZE}x{SIZE}"}
        return asyncio.create_task(client.post("/v1/images/generations", json=body))

    first = post()
    await wait_for(lambda: len(hook.batches) == 1)  # on the device, held there by the gate
    others = [post() for _ in range(7)]
    # One more fits the queue (queue_size 1); the other six are served by the remote while the local
    # device is still held: none of them waited for the local queue.
    await wait_for(lambda: sum(t.done() for t in others) == 6)
    assert remote.served_while_local_busy == [True] * 6
    assert not hook.gate.is_set() and len(hook.batches) == 1 and local.worker.queue_depth() == 1
    spilled = [t for t in others if t.done()]
    for task in spilled:
        response = task.result()
        assert response.status_code == 200, response.text
        # One local attempt (queue full, not retried) and then the remote.
        assert response.headers["x-backend"] == "remote" and response.headers["x-attempts"] == "2"

    hook.gate.set()
    responses = await asyncio.gather(first, *others)
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.headers["x-backend"] for r in responses) == ["local"] * 2 + ["remote"] * 6
    metrics = (await client.get("/metrics")).text
    assert 'imagegate_backend_attempts_total{backend="local",outcome="backend.backend_queue_full"} 6.0' in metrics
