"""type: triton against real KServe V2 servers on 127.0.0.1:

* Triton Inference Server 2.51, the binary inside the ``nvidia-pytriton`` wheel, serving the Python test
  model of ``tests/fakes/triton_models/serve_pytriton.py`` — JSON, binary tensors, gzip, batching, the
  server's own error statuses (400/404/500/503 queue full);
* MLServer 1.7 serving the same model as a custom runtime (JSON V2 only);
* ``tritonclient[http]`` (the official client) to cross-check our binary request encoding.

The servers live in their own venvs (``.ci/install-triton.sh``); found through ``IMAGEGATE_PYTRITON_PYTHON``
/ ``IMAGEGATE_MLSERVER_BIN`` or ``.ci-venvs/``. A test whose server is not installed skips, saying why.
Each server starts once per module.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image as PILImage

from backends.base import BackendSpec, ImageRequest, StageClock, Timeouts
from backends.errors import BackendFailed, BackendQueueFull, BackendRejected
from backends.settings import build
from backends.triton import Settings, TritonBackend, decode_response, encode_request
from tests.fakes.triton_models.image_model import FAIL_PROMPT, render
from tests.servers import free_port, run_process

pytestmark = [pytest.mark.thirdparty, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fakes" / "triton_models"
PYTRITON_PYTHON = Path(os.environ.get("IMAGEGATE_PYTRITON_PYTHON", ROOT / ".ci-venvs/pytriton/bin/python"))
MLSERVER_BIN = Path(os.environ.get("IMAGEGATE_MLSERVER_BIN", ROOT / ".ci-venvs/mlserver/bin/mlserver"))
INPUTS = {
    "prompt": {"name": "prompt"},
    "seed": {"name": "seed"},
    "width": {"name": "width"},
    "height": {"name": "height"},
}


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not installed: {path} is missing (run .ci/install-triton.sh)")


@pytest.fixture(scope="module")
def triton_url():
    _require(PYTRITON_PYTHON, "nvidia-pytriton")
    http, grpc, metrics = free_port(), free_port(), free_port()
    argv = [
        str(PYTRITON_PYTHON),
        str(MODELS / "serve_pytriton.py"),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    base = f"http://127.0.0.1:{http}"
    # /v2/health/ready answers before pytriton has bound its models: wait for the last one bound.
    with run_process(argv, ready_url=f"{base}/v2/models/image_queue1/ready", timeout=120):
        yield base


@pytest.fixture(scope="module")
def mlserver_url():
    _require(MLSERVER_BIN, "mlserver")
    http = free_port()
    env = {
        "MLSERVER_HOST": "127.0.0.1",
        "MLSERVER_HTTP_PORT": str(http),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
    }
    base = f"http://127.0.0.1:{http}"
    with run_process(
        [str(MLSERVER_BIN), "start", str(MODELS / "mlserver")],
        env=env,
        ready_url=f"{base}/v2/models/image/ready",
        timeout=120,
    ):
        yield base


def spec_for(base: str, **settings) -> BackendSpec:
    raw = {"base_url": base, "model": "image", "inputs": INPUTS, **settings}
    return BackendSpec(
        name="triton-real",
        type="triton",
        settings=build(Settings, raw),
        timeouts=Timeouts(connect=5, read=30, total=60),
    )


async def generate(base: str, req: ImageRequest, **settings):
    backend = TritonBackend(spec_for(base, **settings))
    await backend.start()
    try:
        assert backend.ready()
        clock = StageClock()
        result = await backend.generate(req, clock)
        assert clock.backend_s > 0
        return result
    finally:
        await backend.aclose()


def pixels(image) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(image.as_bytes())).convert("RGB"))


def req(**kw) -> ImageRequest:
    kw.setdefault("prompt", "a lighthouse at dusk")
    kw.setdefault("width", 64)
    kw.setdefault("height", 48)
    kw.setdefault("seed", 11)
    return ImageRequest(**kw)


# -- Triton -----------------------------------------------------------------------------------------

MODES = {
    "json": {},
    "json-gzip": {"accept_gzip": True},
    "binary": {"binary": True},
    "binary-gzip": {"binary": True, "accept_gzip": True},
    "binary-inputs": {"binary": True, "binary_inputs": True, "accept_gzip": True},
}


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
async def test_triton_generates_the_models_image(triton_url, mode):
    result = await generate(triton_url, req(), **MODES[mode])
    assert len(result.images) == 1 and result.images[0].format == "png"
    np.testing.assert_array_equal(pixels(result.images[0]), render("a lighthouse at dusk", 11, 64, 48))
    assert result.usage.images == 1 and result.usage.megapixels == pytest.approx(64 * 48 / 1e6)


@pytest.mark.parametrize(
    "output, layout, binary",
    [
        ("generated_image_fp32", "NHWC", True),
        ("generated_image_fp32", "NHWC", False),
        ("generated_image_chw", "NCHW", True),
    ],
)
async def test_triton_fp32_and_chw_outputs(triton_url, output, layout, binary):
    result = await generate(triton_url, req(), output=output, layout=layout, binary=binary)
    np.testing.assert_array_equal(pixels(result.images[0]), render("a lighthouse at dusk", 11, 64, 48))


async def test_triton_gzip_reply_header_length_counts_the_decoded_body(triton_url):
    """What Triton really sends for a gzip-accepting binary request: the length header is the JSON
    length inside the *uncompressed* body (the compressed body is shorter than JSON + tensor)."""
    settings = spec_for(triton_url, binary=True, accept_gzip=True).settings
    headers, body = encode_request(req(), settings)
    async with httpx.AsyncClient(base_url=triton_url) as client:
        response = await client.post("/v2/models/image/infer", headers=headers, content=body)
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) < len(response.content)
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 64 * 48 * 3
    np.testing.assert_array_equal(
        decode_response(response.headers, response.content, settings)[0], render("a lighthouse at dusk", 11, 64, 48)
    )


@pytest.mark.parametrize("max_batch", [1, 4])
async def test_triton_n_images_parallel_or_batched(triton_url, max_batch):
    result = await generate(triton_url, req(n=3, seed=100, width=32, height=32), binary=True, max_batch=max_batch)
    assert [pixels(i).tolist() for i in result.images] == [
        render("a lighthouse at dusk", 100 + i, 32, 32).tolist() for i in range(3)
    ]


async def test_triton_model_exception_is_a_backend_failure(triton_url):
    with pytest.raises(BackendFailed, match="HTTP 500: Failed to process"):
        await generate(triton_url, req(prompt=FAIL_PROMPT))


async def test_triton_unknown_input_is_rejected(triton_url):
    inputs = {**INPUTS, "steps": {"name": "num_inference_steps"}}
    with pytest.raises(BackendRejected, match=r"HTTP 400.*num_inference_steps"):
        await generate(triton_url, req(steps=20), inputs=inputs)


async def test_triton_unknown_model_is_not_ready_and_fails(triton_url):
    backend = TritonBackend(spec_for(triton_url, model="no_such_model"))
    await backend.start()
    try:
        assert not backend.ready()
        with pytest.raises(BackendFailed, match="HTTP 404"):
            await backend.generate(req(), StageClock())
    finally:
        await backend.aclose()


async def test_triton_queue_full_is_overload(triton_url):
    """``image_queue1`` runs one request and queues one more; Triton refuses the rest with 503."""
    backend = TritonBackend(spec_for(triton_url, model="image_queue1", binary=True))
    await backend.start()
    try:
        outcomes = await asyncio.gather(
            *(backend.generate(req(prompt="sleep:0.6 slow", width=8, height=8), StageClock()) for _ in range(5)),
            return_exceptions=True,
        )
    finally:
        await backend.aclose()
    overloaded = [o for o in outcomes if isinstance(o, BackendQueueFull)]
    succeeded = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(overloaded) + len(succeeded) == 5, outcomes
    assert overloaded and succeeded
    assert all(o.retry_after is None for o in overloaded)


def test_binary_request_matches_the_official_tritonclient():
    """Our binary-input body, byte for byte in its tensor part and field for field in its JSON, is what
    ``tritonclient.http`` builds for the same tensors."""
    python = MLSERVER_BIN.parent / "python"
    _require(python, "tritonclient (mlserver venv)")
    script = r"""
import sys, json, numpy as np, tritonclient.http as h
inputs = [h.InferInput("prompt", [1, 1], "BYTES"), h.InferInput("seed", [1, 1], "INT64"),
          h.InferInput("width", [1, 1], "INT32"), h.InferInput("height", [1, 1], "INT32")]
inputs[0].set_data_from_numpy(np.array([["héllo wörld".encode()]], dtype=object))
inputs[1].set_data_from_numpy(np.array([[42]], dtype=np.int64))
inputs[2].set_data_from_numpy(np.array([[64]], dtype=np.int32))
inputs[3].set_data_from_numpy(np.array([[48]], dtype=np.int32))
outputs = [h.InferRequestedOutput("generated_image", binary_data=True)]
body, length = h.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id="r1")
sys.stdout.buffer.write(str(length).encode() + b"\n" + body)
"""
    done = subprocess.run([str(python), "-c", script], capture_output=True, check=True, timeout=60)
    first, _, theirs = done.stdout.partition(b"\n")
    their_len = int(first)
    settings = spec_for("http://127.0.0.1:1", binary=True, binary_inputs=True).settings
    headers, ours = encode_request(req(prompt="héllo wörld", seed=42, request_id="r1"), settings)
    our_len = int(headers["Inference-Header-Content-Length"])
    assert ours[our_len:] == theirs[their_len:]
    our_doc, their_doc = orjson.loads(ours[:our_len]), orjson.loads(theirs[:their_len])
    assert our_doc["inputs"] == their_doc["inputs"]
    assert our_doc["outputs"] == their_doc["outputs"]
    assert our_doc["id"] == their_doc["id"] == "r1"


# -- MLServer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [{}, {"accept_gzip": True}], ids=["json", "json-gzip"])
async def test_mlserver_generates_the_models_image(mlserver_url, mode):
    result = await generate(mlserver_url, req(), **mode)
    np.testing.assert_array_equal(pixels(result.images[0]), render("a lighthouse at dusk", 11, 64, 48))


async def test_mlserver_fp32_output_and_parallel_n(mlserver_url):
    result = await generate(mlserver_url, req(n=2, seed=5, width=16, height=16), output="generated_image_fp32")
    assert [pixels(i).tolist() for i in result.images] == [
        render("a lighthouse at dusk", 5 + i, 16, 16).tolist() for i in range(2)
    ]


async def test_mlserver_model_exception_is_a_backend_failure(mlserver_url):
    with pytest.raises(BackendFailed, match="HTTP 500"):
        await generate(mlserver_url, req(prompt=FAIL_PROMPT))


async def test_mlserver_refuses_binary_bodies(mlserver_url):
    """MLServer has no binary tensor extension: a binary body is a 422 validation error (terminal)."""
    with pytest.raises(BackendRejected, match="HTTP 422"):
        await generate(mlserver_url, req(), binary=True, binary_inputs=True)


# -- through the gateway ----------------------------------------------------------------------------


def test_gateway_falls_back_from_a_failing_v2_server_to_real_triton(triton_url):
    """A fake V2 server answering 503 (queue full) first in the route, real Triton second."""
    from gateway.config import load_config_text
    from tests.backends.test_triton import gateway_yaml
    from tests.fakes.triton_models.fake_v2 import FakeV2
    from tests.servers import serve_app, serve_gateway

    failing = FakeV2()
    failing.fail_next(503, "Exceeds maximum queue size", times=10)
    with serve_app(failing.app()) as fake_base:
        config = load_config_text(gateway_yaml(fake_base, triton_url), source="test")
        with serve_gateway(config) as base:
            response = httpx.post(
                f"{base}/v1/images/generations",
                timeout=30,
                json={"prompt": "a lighthouse at dusk", "size": "64x48", "seed": 11},
            )
            ok = httpx.post(
                f"{base}/v1/images/generations",
                timeout=30,
                json={"prompt": "a lighthouse at dusk", "size": "64x48", "seed": 11, "n": 2},
            )
    assert response.status_code == 200, response.text
    assert response.headers["x-backend"] == "tri-b"
    assert failing.calls, "the failing server was tried first"
    image = io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))
    np.testing.assert_array_equal(
        np.asarray(PILImage.open(image).convert("RGB")), render("a lighthouse at dusk", 11, 64, 48)
    )
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
