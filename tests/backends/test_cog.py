"""``type: cog`` against cog's real HTTP server (``python -m cog.server.http``, cog 0.23) running the small
predictor in ``tests/fakes/cog_predictor``; directly and through the gateway.

cog lives in its own venv (``bash .ci/install-cog.sh``): the tests find its interpreter through
``IMAGEGATE_COG_PYTHON`` or at ``.ci-venvs/cog/bin/python``, and skip (saying so) when it is absent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from backends.base import BackendSpec, Image, ImageRequest, StageClock, Timeouts
from backends.cog import CogBackend, Settings
from backends.errors import BackendQueueFull, BackendRejected, BackendUnavailable
from backends.settings import SettingsError, build
from tests.fakes.replicate_fake import FakeReplicate
from tests.servers import free_port, run_process
from tests.servers import post_generation as _generate

ROOT = Path(__file__).resolve().parents[2]
PREDICTOR = ROOT / "tests" / "fakes" / "cog_predictor" / "predict.py"


def cog_python() -> str | None:
    candidate = os.environ.get("IMAGEGATE_COG_PYTHON") or str(ROOT / ".ci-venvs" / "cog" / "bin" / "python")
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


# What `cog build` would generate into .cog/openapi_schema.json for predict.py's inputs; with it the
# server validates inputs (422) instead of handing anything to predict().
INPUT_SCHEMA = {
    "type": "object",
    "title": "Input",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string"},
        "negative_prompt": {"type": "string"},
        "width": {"type": "integer", "minimum": 8, "maximum": 512},
        "height": {"type": "integer", "minimum": 8, "maximum": 512},
        "num_outputs": {"type": "integer", "minimum": 1, "maximum": 4},
        "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 50},
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": 20},
        "seed": {"type": "integer"},
        "output_format": {"type": "string", "enum": ["png", "jpg", "webp"]},
        "sleep": {"type": "number", "minimum": 0, "maximum": 30},
    },
}


# -- no server needed --------------------------------------------------------------------------------------


def test_settings_validation() -> None:
    ok = build(Settings, {"base_url": "http://127.0.0.1:5000", "input": {"output_format_field": "output_format"}})
    assert ok.mapping.output_format_field == "output_format" and ok.mapping.size_mode == "width_height"
    for raw, message in [
        ({}, "base_url"),
        ({"base_url": "127.0.0.1:5000"}, "http"),
        ({"base_url": "http://x", "health_interval": 0}, "positive"),
        ({"base_url": "http://x", "input": {"nope": 1}}, "input.nope"),
    ]:
        with pytest.raises(SettingsError, match=message):
            build(Settings, raw)


def make(base_url: str, **settings: Any) -> CogBackend:
    raw = {"base_url": base_url, "health_interval": 0.2, "input": {"output_format_field": "output_format"}, **settings}
    return CogBackend(
        BackendSpec(
            name="cog", type="cog", settings=build(Settings, raw), timeouts=Timeouts(connect=1, read=20, total=30)
        )
    )


async def test_unreachable_container_is_not_ready_and_unavailable() -> None:
    backend = make(f"http://127.0.0.1:{free_port()}", connect_retries=1)
    await backend.start()
    try:
        assert not backend.ready() and backend.health is None
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            await backend.generate(ImageRequest(prompt="x", width=64, height=64), StageClock())
    finally:
        await backend.aclose()


# -- against the real cog server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cog_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's working directory; its outputs (and ``slept-*`` markers) go to ``out/``."""
    return tmp_path_factory.mktemp("cog")


def slept(work: Path, prompt: str) -> bool:
    """Whether the predictor's sleep for ``prompt`` ran its course (a cancelled one leaves no marker)."""
    return (work / "out" / ("slept-" + hashlib.sha256(prompt.encode()).hexdigest()[:16])).exists()


@pytest.fixture(scope="module")
def cog_server(cog_work: Path) -> Iterator[str]:
    python = cog_python()
    if python is None:
        pytest.skip("cog is not installed: run `bash .ci/install-cog.sh` or set IMAGEGATE_COG_PYTHON")
    work = cog_work
    shutil.copy(PREDICTOR, work / "predict.py")
    (work / ".cog").mkdir()
    (work / ".cog" / "openapi_schema.json").write_text(
        json.dumps(
            {
                "openapi": "3.0.2",
                "info": {"title": "Cog", "version": "0.1.0"},
                "paths": {},
                "components": {"schemas": {"Input": INPUT_SCHEMA}},
            }
        )
    )
    (work / "out").mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "IMAGEGATE_COG_OUT_DIR": str(work / "out"),
        # cog's server spawns a bare `python` for the worker: it must be the cog venv's.
        "PATH": f"{os.path.dirname(python)}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with run_process(
        [python, "-m", "cog.server.http", "--host", "127.0.0.1"],
        ready_url=f"{base}/health-check",
        env=env,
        cwd=str(work),
        timeout=60,
    ):
        end = time.monotonic() + 30
        while httpx.get(f"{base}/health-check", timeout=2).json().get("status") != "READY":
            assert time.monotonic() < end, "cog never became READY"
            time.sleep(0.1)
        yield base


def health(base: str) -> str:
    return httpx.get(f"{base}/health-check", timeout=2).json()["status"]


async def wait_idle(base: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while await asyncio.to_thread(health, base) != "READY":
        assert time.monotonic() < end, "cog still busy"
        await asyncio.sleep(0.05)


@pytest.fixture()
async def backend(cog_server: str) -> AsyncIterator[CogBackend]:
    await wait_idle(cog_server)
    b = make(cog_server)
    await b.start()
    yield b
    await b.aclose()


def data(image: Image) -> bytes:
    """The image's bytes: cog answers with data URIs, decoded into ``data``."""
    assert image.data is not None
    return image.data


def decode(data: bytes) -> PILImage.Image:
    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.thirdparty
async def test_generate(backend: CogBackend) -> None:
    assert backend.ready() and backend.health == "READY"
    clock = StageClock()
    result = await backend.generate(
        ImageRequest(prompt="a red fox", n=2, width=64, height=48, seed=3, steps=4, negative_prompt="blur"), clock
    )
    assert [i.format for i in result.images] == ["png", "png"]
    first, second = (decode(data(i)) for i in result.images)
    assert first.size == (64, 48) and first.getpixel((0, 0)) != second.getpixel((0, 0))
    assert result.usage.images == 2 and result.usage.predict_seconds is not None
    assert "remote_predict" in clock.stages and clock.backend_s > 0


@pytest.mark.thirdparty
async def test_output_format_and_parallel_split(cog_server: str) -> None:
    # One image per prediction: n=3 becomes three sequential PUTs (the container has one slot).
    b = make(cog_server, input={"output_format_field": "output_format", "max_outputs_per_call": 1})
    await b.start()
    try:
        result = await b.generate(
            ImageRequest(prompt="fox", n=3, width=32, height=32, output_format="jpeg"), StageClock()
        )
    finally:
        await b.aclose()
    assert [i.format for i in result.images] == ["jpeg"] * 3
    assert all(data(i)[:3] == b"\xff\xd8\xff" for i in result.images)


@pytest.mark.thirdparty
async def test_model_exception_is_a_terminal_failure(backend: CogBackend) -> None:
    with pytest.raises(BackendRejected, match="could not draw this prompt"):
        await backend.generate(ImageRequest(prompt="please fail", width=32, height=32), StageClock())


@pytest.mark.thirdparty
async def test_invalid_input_is_rejected(backend: CogBackend) -> None:
    with pytest.raises(BackendRejected, match="422"):
        await backend.generate(ImageRequest(prompt="x", width=32, height=32, steps=99), StageClock())


@pytest.mark.thirdparty
async def test_busy_is_overload_and_cancel_reaches_the_container(
    backend: CogBackend, cog_server: str, cog_work: Path
) -> None:
    prompt = "busy, then cancelled"
    slow = asyncio.create_task(
        backend.generate(
            ImageRequest(prompt=prompt, width=32, height=32, options={"input": {"sleep": 20}}), StageClock()
        )
    )
    end = time.monotonic() + 5
    while await asyncio.to_thread(health, cog_server) != "BUSY":
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    with pytest.raises(BackendQueueFull, match="409"):
        await backend.generate(ImageRequest(prompt="y", width=32, height=32), StageClock())
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The container is free again because it stopped the prediction, not because its 20 s sleep ran out.
    await wait_idle(cog_server, timeout=30)
    assert not slept(cog_work, prompt)
    await backend.check_health()
    assert backend.ready() and backend.health == "READY"
    # The marker does appear when a sleep runs its course.
    await backend.generate(
        ImageRequest(prompt="a short nap", width=32, height=32, options={"input": {"sleep": 0.1}}), StageClock()
    )
    assert slept(cog_work, "a short nap")


@pytest.mark.thirdparty
async def test_cancel_by_id_stops_a_prediction_whose_connection_stays_open(
    backend: CogBackend, cog_server: str, cog_work: Path
) -> None:
    # cog cancels a synchronous prediction by itself when its connection drops; here the connection stays
    # open (as through a proxy), so only our cancel by id can stop it.
    prompt = "held open by a proxy"
    async with httpx.AsyncClient() as other:
        held = asyncio.create_task(
            other.put(
                f"{cog_server}/predictions/held",
                timeout=30,
                json={"id": "held", "input": {"prompt": prompt, "sleep": 20}},
            )
        )
        end = time.monotonic() + 5
        while await asyncio.to_thread(health, cog_server) != "BUSY":
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
        await backend.cancel("held")
        response = await held
    # Stopped by our cancel (cog says so), before its sleep ran out (no marker).
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert not slept(cog_work, prompt)


# -- through the gateway -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosted() -> Iterator[FakeReplicate]:
    fake = FakeReplicate()
    with fake.serve():
        yield fake


@pytest.fixture(scope="module")
def gateway(cog_server: str, hosted: FakeReplicate) -> Iterator[str]:
    from gateway.config import load_config_text
    from tests.servers import serve_gateway

    dead = f"http://127.0.0.1:{free_port()}"
    config = load_config_text(
        f"""
server: {{default_deadline_s: 20, max_retries: 1, retry_backoff_s: 0.01, cooldown_failures: 0}}
backends:
  cog_down:
    type: cog
    quality: 0.9
    cost: {{per_second: 0.0005}}
    timeouts: {{connect: 1, read: 20, total: 30}}
    capabilities: {{sizes: ["64x64", "128x96"], max_n: 4}}
    settings: {{base_url: "{dead}", connect_retries: 0, health_interval: 0.5}}
  cog:
    type: cog
    quality: 0.8
    cost: {{per_second: 0.0005}}
    timeouts: {{connect: 1, read: 20, total: 30}}
    required: true
    capabilities: {{sizes: ["64x64", "128x96"], max_n: 4}}
    settings:
      base_url: "{cog_server}"
      health_interval: 0.5
      input: {{output_format_field: output_format}}
  hosted:
    type: replicate
    quality: 0.8
    cost: {{per_image: 0.003}}
    capabilities: {{sizes: ["64x64", "128x96"], max_n: 4}}
    settings:
      api_token: {hosted.token}
      base_url: {hosted.base_url}
      model: black-forest-labs/flux-schnell
      family: flux_schnell
      poll_interval: 0.05
      allowed_output_hosts: ["{hosted.base_url.split("//")[1]}"]
tiers:
  standard: {{quality_floor: 0.5}}
routes:
  - name: self-hosted-first
    strategy: fallback
    candidates: [{{backend: cog_down}}, {{backend: cog}}, {{backend: hosted}}]
default_tier: standard
""",
        "cog-test-routes.yaml",
    )
    with serve_gateway(config) as base:
        yield base


@pytest.mark.thirdparty
def test_gateway_success(gateway: str, cog_server: str) -> None:
    resp = _generate(gateway, {"prompt": "a red fox", "size": "128x96", "n": 2, "output_format": "webp"})
    assert resp.status_code == 200, resp.text
    # cog_down is not ready (nothing listens there): demoted behind the others, so cog serves at once.
    assert resp.headers["x-backend"] == "cog" and resp.headers["x-attempts"] == "1"
    assert "remote_predict;dur=" in resp.headers["server-timing"]
    images = [decode(base64.b64decode(d["b64_json"])) for d in resp.json()["data"]]
    assert [(i.format, i.size) for i in images] == [("WEBP", (128, 96))] * 2
    ready = httpx.get(gateway + "/readyz", timeout=5).json()["backends"]
    assert ready["cog"]["ready"] is True and ready["cog_down"]["ready"] is False


@pytest.mark.thirdparty
def test_gateway_busy_container_overflows_to_the_hosted_api(
    gateway: str, cog_server: str, hosted: FakeReplicate
) -> None:
    hosted.reset()
    # Someone else holds the container's only slot for 3 s.
    occupant = threading.Thread(
        target=lambda: httpx.put(
            f"{cog_server}/predictions/occupant",
            json={"id": "occupant", "input": {"prompt": "x", "sleep": 3}},
            timeout=10,
        )
    )
    occupant.start()
    end = time.monotonic() + 3
    while health(cog_server) != "BUSY":
        assert time.monotonic() < end
        time.sleep(0.02)
    try:
        resp = _generate(gateway, {"prompt": "a red fox", "size": "64x64"})
        assert resp.status_code == 200, resp.text
        # 409 busy (after cog's own busy_wait_s) means every slot is taken: the next candidate, at once.
        assert resp.headers["x-backend"] == "hosted" and resp.headers["x-attempts"] == "2"
        (create,) = hosted.creates()
        assert create.body["input"]["aspect_ratio"] == "1:1" and create.body["input"]["megapixels"] == "0.25"
    finally:
        httpx.post(f"{cog_server}/predictions/occupant/cancel", timeout=5)
        occupant.join()


@pytest.mark.thirdparty
def test_gateway_client_disconnect_cancels_the_prediction(gateway: str, cog_server: str) -> None:
    def client() -> None:
        with pytest.raises(httpx.ReadTimeout):
            _generate(gateway, {"prompt": "a slow fox", "size": "64x64"}, timeout=1.0)

    thread = threading.Thread(target=client)
    thread.start()
    end = time.monotonic() + 3
    while health(cog_server) != "BUSY":  # the prediction is running ("slow": 5 s)...
        assert time.monotonic() < end, "the prediction never started"
        time.sleep(0.02)
    thread.join()  # ...the client gives up after 1 s...
    end = time.monotonic() + 3
    while health(cog_server) != "READY":  # ...and the container is free again long before the 5 s.
        assert time.monotonic() < end, "the prediction was not cancelled"
        time.sleep(0.05)
