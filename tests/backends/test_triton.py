"""type: triton — the V2 codec as pure functions, and the backend against an in-process fake V2 server
(``tests/fakes/triton_models/fake_v2.py``) for the failure modes the real servers cannot be steered into.
The same backend against real Triton and MLServer: ``test_triton_real.py``."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import struct
import time
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image as PILImage
from structlog.testing import capture_logs

from backends.base import BackendSpec, Image, ImageRequest, StageClock, Timeouts
from backends.errors import (
    BackendFailed,
    BackendProtocolError,
    BackendQueueFull,
    BackendRejected,
    BackendUnavailable,
)
from backends.settings import SettingsError, build
from backends.triton import (
    CodecError,
    Settings,
    TritonBackend,
    decode_response,
    encode_request,
    split_calls,
)
from backends.triton.codec import encode_array, infer_path, ready_path, to_images
from tests.fakes.triton_models.fake_v2 import FakeV2
from tests.fakes.triton_models.image_model import FAIL_PROMPT, render
from tests.servers import free_port, serve_app
from tests.servers import post_generation as post

BASE = {"base_url": "http://127.0.0.1:1", "model": "image"}
SIZE_INPUTS = {"seed": {"name": "seed"}, "width": {"name": "width"}, "height": {"name": "height"}}


def settings(**overrides) -> Settings:
    return build(Settings, {**BASE, **overrides})


def request(**kw) -> ImageRequest:
    kw.setdefault("prompt", "a red fox")
    kw.setdefault("width", 16)
    kw.setdefault("height", 8)
    return ImageRequest(**kw)


def v2_response(
    tensor: np.ndarray,
    datatype: str,
    *,
    binary: bool,
    name: str = "generated_image",
    extra_first: np.ndarray | None = None,
) -> tuple[dict[str, str], bytes]:
    """A response as Triton writes it (optionally with another binary output listed first)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    if extra_first is not None:
        outputs.append(
            {
                "name": "other",
                "datatype": "FP32",
                "shape": list(extra_first.shape),
                "parameters": {"binary_data_size": extra_first.nbytes},
            }
        )
        blobs.append(extra_first.tobytes())
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
    if binary:
        out["parameters"] = {"binary_data_size": tensor.nbytes}
        blobs.append(tensor.tobytes())
    else:
        out["data"] = tensor.reshape(-1).tolist()
    outputs.append(out)
    head = orjson.dumps({"model_name": "image", "model_version": "1", "outputs": outputs})
    if blobs:
        return {"Inference-Header-Content-Length": str(len(head))}, head + b"".join(blobs)
    return {"Content-Type": "application/json"}, head


# -- settings ---------------------------------------------------------------------------------------


def test_settings_defaults_and_paths():
    s = settings()
    assert s.inputs.prompt.name == "prompt" and s.inputs.prompt.shape == (1, 1)
    assert s.output == "generated_image" and s.layout == "NHWC" and not s.binary
    assert infer_path(s) == "/v2/models/image/infer"
    assert ready_path(settings(model_version="3")) == "/v2/models/image/versions/3/ready"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"inputs": {"prompt": {"name": "p", "datatype": "INT32"}}}, "must be BYTES"),
        ({"inputs": {"seed": {"name": "prompt"}}}, "used twice"),
        ({"inputs": {"n": {"name": "n"}}, "max_batch": 2}, "not both"),
        ({"inputs": {"steps": {"name": "s", "shape": [1, 0]}}}, "positive"),
        ({"inputs": {"seed": {"name": "s", "datatype": "INT128"}}}, "INT64"),
        ({"layout": "WHC"}, "NHWC"),
        ({"base_url": "triton:8000"}, "http(s) URL"),
        ({"outputs": "x"}, "unknown key"),
    ],
)
def test_settings_refuses_bad_config(raw, fragment):
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build(Settings, {**BASE, **raw})


# -- request encoding -------------------------------------------------------------------------------


def test_encode_json_prompt_only():
    headers, body = encode_request(request(request_id="req-1"), settings())
    assert headers == {"Accept-Encoding": "identity", "Content-Type": "application/json"}
    assert orjson.loads(body) == {
        "id": "req-1",
        "inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["a red fox"]}],
        "outputs": [{"name": "generated_image"}],
    }


def test_encode_maps_request_fields_with_datatypes_shapes_and_defaults():
    s = settings(
        inputs={
            "prompt": {"name": "text", "shape": [1]},
            "negative_prompt": {"name": "neg"},
            "seed": {"name": "seed"},
            "steps": {"name": "num_steps", "default": 30},
            "guidance": {"name": "cfg", "datatype": "FP64"},
            "width": {"name": "w", "datatype": "INT64", "shape": [1]},
            "height": {"name": "h", "datatype": "BYTES"},
            "n": {"name": "count"},
        },
        parameters={"priority": 1},
    )
    _, body = encode_request(request(negative_prompt="blurry", seed=7, guidance_scale=5), s)
    doc = orjson.loads(body)
    assert doc["parameters"] == {"priority": 1}
    by_name = {t["name"]: t for t in doc["inputs"]}
    assert by_name["text"] == {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a red fox"]}
    assert by_name["neg"]["data"] == ["blurry"]
    assert by_name["seed"] == {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [7]}
    assert by_name["num_steps"] == {"name": "num_steps", "shape": [1, 1], "datatype": "INT32", "data": [30]}
    assert by_name["cfg"]["data"] == [5.0] and isinstance(by_name["cfg"]["data"][0], float)
    assert by_name["w"] == {"name": "w", "shape": [1], "datatype": "INT64", "data": [16]}
    assert by_name["h"]["data"] == ["8"]
    assert by_name["count"]["data"] == [1]


def test_encode_leaves_out_unset_fields_without_default():
    s = settings(inputs={"seed": {"name": "seed"}, "negative_prompt": {"name": "neg"}})
    doc = orjson.loads(encode_request(request(), s)[1])
    assert [t["name"] for t in doc["inputs"]] == ["prompt"]


def test_encode_binary_output_request_and_gzip():
    headers, body = encode_request(request(), settings(binary=True, accept_gzip=True))
    assert headers["Accept-Encoding"] == "gzip"
    doc = orjson.loads(body)
    assert doc["parameters"] == {"binary_data_output": True}
    assert doc["outputs"] == [{"name": "generated_image", "parameters": {"binary_data": True}}]


def test_encode_binary_inputs_layout():
    s = settings(
        binary_inputs=True, inputs={"prompt": {"name": "prompt"}, "seed": {"name": "seed"}, "guidance": {"name": "g"}}
    )
    headers, body = encode_request(request(prompt="héllo", seed=3, guidance_scale=2.5), s)
    assert headers["Content-Type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:length])
    sizes = [t["parameters"]["binary_data_size"] for t in doc["inputs"]]
    assert all("data" not in t for t in doc["inputs"])
    raw = body[length:]
    text = "héllo".encode()
    # BYTES: 4-byte little-endian length, then the UTF-8 bytes; numbers little-endian in their dtype.
    expected = [struct.pack("<I", len(text)) + text, struct.pack("<q", 3), struct.pack("<f", 2.5)]
    assert sizes == [len(e) for e in expected]
    assert raw == b"".join(expected)


def test_split_calls_parallel_and_batched():
    r = request(n=5, seed=100, request_id="r")
    singles = split_calls(r, settings())
    assert [(c.n, c.seed, c.request_id) for c in singles] == [(1, 100 + i, f"r-{i}") for i in range(5)]
    batched = split_calls(r, settings(max_batch=2))
    assert [(c.n, c.seed) for c in batched] == [(2, 100), (2, 102), (1, 104)]
    assert split_calls(r, settings(inputs={"n": {"name": "n"}})) == [r]
    assert [c.seed for c in split_calls(request(n=2), settings())] == [None, None]


def test_encode_batch_dimension_rows():
    s = settings(
        max_batch=4,
        inputs={"prompt": {"name": "prompt"}, "seed": {"name": "seed"}, "width": {"name": "width", "shape": [1, 1]}},
    )
    doc = orjson.loads(encode_request(request(n=3, seed=9), s)[1])
    by_name = {t["name"]: t for t in doc["inputs"]}
    assert by_name["prompt"]["shape"] == [3, 1] and by_name["prompt"]["data"] == ["a red fox"] * 3
    assert by_name["seed"]["data"] == [9, 10, 11]
    assert by_name["width"]["data"] == [16, 16, 16]


# -- response decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_decode_nhwc(binary, datatype):
    images = np.stack([render("a", 1, 5, 4), render("b", 2, 5, 4)])
    tensor = images.astype(np.uint8 if datatype == "UINT8" else np.float32)
    headers, body = v2_response(tensor, datatype, binary=binary)
    out = decode_response(headers, body, settings())
    assert len(out) == 2
    for got, want in zip(out, images, strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.shape == (4, 5, 3)
        np.testing.assert_array_equal(got, want)


def test_decode_finds_binary_output_after_another_binary_output():
    image = render("x", 0, 3, 2)[None]
    headers, body = v2_response(image, "UINT8", binary=True, extra_first=np.arange(7, dtype=np.float32))
    np.testing.assert_array_equal(decode_response(headers, body, settings())[0], image[0])


def test_decode_gzip_reply_length_header_counts_decoded_json():
    """Triton sets Inference-Header-Content-Length before compressing; httpx undoes the gzip first."""
    image = render("gz", 3, 6, 6)[None]
    headers, body = v2_response(image, "UINT8", binary=True)
    response = httpx.Response(200, headers={**headers, "Content-Encoding": "gzip"}, content=gzip.compress(body))
    assert response.content == body
    np.testing.assert_array_equal(decode_response(response.headers, response.content, settings())[0], image[0])


def test_decode_layouts_and_scale():
    image = render("l", 0, 4, 3)
    chw = image.transpose(2, 0, 1)
    np.testing.assert_array_equal(to_images(chw[None], "NCHW")[0], image)
    np.testing.assert_array_equal(to_images(chw, "CHW")[0], image)
    np.testing.assert_array_equal(to_images(image, "HWC")[0], image)
    np.testing.assert_array_equal(to_images(image, "NHWC")[0], image)  # a model that drops the batch dim
    unit = image.astype(np.float32) / 255.0
    np.testing.assert_array_equal(to_images(unit, "HWC", scale=255.0)[0], image)
    over = np.array([[[-3.0, 300.0, 127.6]]], dtype=np.float32)
    assert to_images(over, "HWC")[0].tolist() == [[[0, 255, 128]]]
    gray = to_images(np.zeros((1, 2, 2, 1), np.uint8), "NHWC")[0]
    assert PILImage.open(io.BytesIO(encode_array(gray))).mode == "L"


def test_decode_bytes_output_of_encoded_images():
    png = encode_array(render("p", 0, 4, 4))
    blob = struct.pack("<I", len(png)) + png
    head = orjson.dumps(
        {
            "outputs": [
                {
                    "name": "generated_image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    )
    out = decode_response({"inference-header-content-length": str(len(head))}, head + blob, settings())
    assert out == [Image(format="png", data=png)]
    json_body = orjson.dumps(
        {
            "outputs": [
                {"name": "generated_image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}
            ]
        }
    )
    assert decode_response({}, json_body, settings()) == [Image(format="png", data=png)]


def test_bytes_output_that_is_not_an_image_is_a_protocol_error():
    from backends.triton.backend import _decode_and_encode

    body = orjson.dumps(
        {
            "outputs": [
                {
                    "name": "generated_image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(b"not an image").decode()],
                }
            ]
        }
    )
    with pytest.raises(CodecError, match="not an image"):
        _decode_and_encode(httpx.Headers(), body, settings(), "png")


@pytest.mark.parametrize(
    "headers, body, fragment",
    [
        ({}, b"<html>oops", "not valid JSON"),
        ({}, b'{"model_name": "image"}', "no outputs"),
        ({}, b'{"outputs": [{"name": "other", "datatype": "UINT8", "shape": [1], "data": [1]}]}', "not in response"),
        (
            {},
            b'{"outputs": [{"name": "generated_image", "datatype": "UINT8", "shape": [1,2,2,3], "data": [1]}]}',
            "4 values|1 values",
        ),
        (
            {},
            b'{"outputs": [{"name": "generated_image", "datatype": "BF16", "shape": [1], "data": [1]}]}',
            "unsupported datatype",
        ),
        (
            {},
            b'{"outputs": [{"name": "generated_image", "datatype": "UINT8", "shape": [1,2,2,2], '
            b'"data": [0,0,0,0,0,0,0,0]}]}',
            "channels",
        ),
        (
            {},
            b'{"outputs": [{"name": "generated_image", "datatype": "FP32", "shape": [2,1], "data": [1, 2]}]}',
            "expected NHWC",
        ),
        (
            {},
            b'{"outputs": [{"name": "generated_image", "datatype": "UINT8", "shape": [-1,2], "data": [1]}]}',
            "bad shape",
        ),
        ({"Inference-Header-Content-Length": "999"}, b"{}", "outside a body"),
        ({"Inference-Header-Content-Length": "x"}, b"{}", "bad Inference"),
    ],
)
def test_decode_errors(headers, body, fragment):
    with pytest.raises(CodecError, match=fragment):
        decode_response(headers, body, settings())


def test_decode_errors_truncated_binary_and_nan():
    image = render("t", 0, 2, 2)[None]
    headers, body = v2_response(image, "UINT8", binary=True)
    with pytest.raises(CodecError, match="beyond the body"):
        decode_response(headers, body[:-1], settings())
    nan = np.full((1, 1, 1, 3), np.nan, dtype=np.float32)
    with pytest.raises(CodecError, match="NaN"):
        decode_response(*v2_response(nan, "FP32", binary=True), settings())


# -- the backend against the fake V2 server ----------------------------------------------------------


@pytest.fixture
def fake():
    fake = FakeV2()
    with serve_app(fake.app()) as base:
        fake.base = base
        yield fake


def make_backend(base: str, **overrides) -> TritonBackend:
    raw = {
        "base_url": base,
        "model": "image",
        "inputs": {"prompt": {"name": "prompt"}, **SIZE_INPUTS},
        "ready_interval_s": 0.1,
        **overrides,
    }
    spec = BackendSpec(
        name="tri", type="triton", settings=build(Settings, raw), timeouts=Timeouts(connect=2, read=10, total=20)
    )
    return TritonBackend(spec)


@pytest.fixture
async def backend(fake):
    b = make_backend(fake.base)
    await b.start()
    yield b
    await b.aclose()


def pixels(image: Image) -> np.ndarray:
    assert image.format == "png"
    return np.asarray(PILImage.open(io.BytesIO(image.as_bytes())).convert("RGB"))


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"binary": True},
        {"binary": True, "accept_gzip": True},
        {"binary": True, "binary_inputs": True},
        {"accept_gzip": True},
    ],
)
async def test_generate_modes(fake, mode):
    b = make_backend(fake.base, **mode)
    await b.start()
    try:
        assert b.ready()
        clock = StageClock()
        result = await b.generate(request(seed=5, request_id="abc"), clock)
    finally:
        await b.aclose()
    assert len(result.images) == 1
    np.testing.assert_array_equal(pixels(result.images[0]), render("a red fox", 5, 16, 8))
    assert result.usage.images == 1 and result.usage.megapixels == pytest.approx(16 * 8 / 1e6)
    assert clock.backend_s > 0
    sent = fake.calls[-1]
    assert sent["inputs"]["seed"] == [5] and sent["inputs"]["width"] == [16]
    assert sent["headers"]["accept-encoding"] == ("gzip" if mode.get("accept_gzip") else "identity")
    assert ("inference-header-content-length" in sent["headers"]) == bool(mode.get("binary_inputs"))
    head_length = int(sent["headers"].get("inference-header-content-length", len(sent["body"])))
    assert orjson.loads(sent["body"][:head_length])["id"] == "abc"


async def test_generate_fp32_nchw_tensor(fake):
    fake.output_datatype, fake.layout = "FP32", "NCHW"
    b = make_backend(fake.base, binary=True, layout="NCHW")
    await b.start()
    try:
        result = await b.generate(request(seed=1), StageClock())
    finally:
        await b.aclose()
    np.testing.assert_array_equal(pixels(result.images[0]), render("a red fox", 1, 16, 8))


@pytest.mark.parametrize(
    "fmt, compression, expected",
    [
        ("jpeg", None, "jpeg"),
        ("webp", None, "webp"),
        ("jpeg", 50, "png"),
        ("png", 80, "png"),
    ],
)
async def test_tensor_encoded_in_the_clients_format_unless_it_asked_for_compression(
    fake, backend, fmt, compression, expected
):
    result = await backend.generate(request(output_format=fmt, output_compression=compression), StageClock())
    image = result.images[0]
    assert image.format == expected
    assert PILImage.open(io.BytesIO(image.as_bytes())).format == expected.upper()


async def test_n_images_in_parallel_calls_with_distinct_seeds(fake, backend):
    result = await backend.generate(request(n=3, seed=40), StageClock())
    assert len(fake.calls) == 3
    assert sorted(c["inputs"]["seed"][0] for c in fake.calls) == [40, 41, 42]
    for i, image in enumerate(result.images):
        np.testing.assert_array_equal(pixels(image), render("a red fox", 40 + i, 16, 8))
    assert result.usage.images == 3


async def test_n_images_batched_along_batch_dimension(fake):
    b = make_backend(fake.base, max_batch=2, binary=True)
    await b.start()
    try:
        result = await b.generate(request(n=3, seed=0), StageClock())
    finally:
        await b.aclose()
    assert sorted(c["inputs"]["seed"] for c in fake.calls) == [[0, 1], [2]]
    assert [pixels(i).tolist() for i in result.images] == [render("a red fox", s, 16, 8).tolist() for s in range(3)]


async def test_parallel_call_failure_fails_the_request(fake, backend):
    fake.fail_next(503, "Exceeds maximum queue size")
    with pytest.raises(BackendQueueFull):
        await backend.generate(request(n=3, seed=1), StageClock())


@pytest.mark.parametrize(
    "status, error, expected",
    [
        (503, "Exceeds maximum queue size", BackendQueueFull),
        (500, "Failed to process the request(s) for model 'image', message: boom", BackendFailed),
        (400, "unexpected shape for input 'prompt' for model 'image'", BackendRejected),
        (422, "Unprocessable Entity", BackendRejected),
    ],
)
async def test_error_statuses(fake, backend, status, error, expected):
    fake.fail_next(status, error)
    with pytest.raises(expected) as info:
        await backend.generate(request(), StageClock())
    assert f"HTTP {status}" in info.value.message and error[:20] in info.value.message
    if expected is BackendQueueFull:
        assert info.value.retry_after is None  # Triton's queue-full 503 carries no Retry-After
        assert not info.value.retry_same  # a full queue: the next candidate now, not the same server again


async def test_model_exception_from_the_model(fake, backend):
    with pytest.raises(BackendFailed, match="HTTP 500"):
        await backend.generate(request(prompt=FAIL_PROMPT), StageClock())


async def test_unknown_model_is_a_config_failure(fake):
    b = make_backend(fake.base, model="nope")
    await b.start()
    try:
        assert not b.ready()
        with pytest.raises(BackendFailed, match="HTTP 404"):
            await b.generate(request(), StageClock())
    finally:
        await b.aclose()


async def test_malformed_and_cut_bodies(fake, backend):
    fake.fail_next(200, body=b"{not json")
    with pytest.raises(BackendProtocolError, match="not valid JSON"):
        await backend.generate(request(), StageClock())
    fake.fail_next(200, body=b'{"outputs": []}')
    with pytest.raises(BackendProtocolError, match="not in response"):
        await backend.generate(request(), StageClock())
    fake.fail_next(reset=True)
    with pytest.raises(BackendProtocolError):
        await backend.generate(request(), StageClock())
    # The pooled client recovers after a broken connection.
    assert len((await backend.generate(request(), StageClock())).images) == 1


async def test_secret_never_in_error_message(fake):
    b = make_backend(fake.base, api_key="sk-very-secret-token")
    await b.start()
    try:
        fake.fail_next(500, "auth header was Bearer sk-very-secret-token")
        with pytest.raises(BackendFailed) as info:
            await b.generate(request(), StageClock())
    finally:
        await b.aclose()
    assert "sk-very-secret-token" not in info.value.message
    assert fake.calls[0]["headers"]["authorization"] == "Bearer sk-very-secret-token"


async def test_connect_refused_marks_not_ready_and_poll_recovers(fake):
    port = free_port()
    b = make_backend(f"http://127.0.0.1:{port}")
    with capture_logs() as logs:
        await b.start()
        try:
            assert not b.ready()
            with pytest.raises(BackendUnavailable):
                await b.generate(request(), StageClock())
        finally:
            await b.aclose()
        b = make_backend(fake.base)
        await b.start()
        try:
            assert b.ready()
            fake.ready = False
            await _until(lambda: not b.ready())
            fake.ready = True
            await _until(b.ready)
        finally:
            await b.aclose()
    # Through structlog, as every other log line (the changes the poller saw, one line each).
    assert [(e["event"], e["log_level"], e.get("ready")) for e in logs] == [
        ("triton.not_ready_at_start", "warning", None),
        ("triton.ready_changed", "info", False),
        ("triton.ready_changed", "info", True),
    ]


async def test_cancellation_drops_the_connection(fake, backend):
    fake.delay_s = 60.0  # far longer than any stall: the answer never comes before the cancel
    task = asyncio.create_task(backend.generate(request(), StageClock()))
    await _until(lambda: fake.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # In this order: our task ended, then the server saw the connection go, and it never answered.
    assert fake.delays_served == 0
    await _until(lambda: fake.disconnected == 1)
    assert fake.delays_served == 0 and backend.load().in_flight == 0


async def test_cancellation_of_parallel_calls_drops_them_all(fake, backend):
    fake.delay_s = 5.0
    task = asyncio.create_task(backend.generate(request(n=3), StageClock()))
    await _until(lambda: fake.in_flight == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: fake.disconnected == 3)


async def _until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# -- through the gateway ----------------------------------------------------------------------------


def gateway_yaml(primary: str, secondary: str, **primary_settings) -> str:
    def backend(name: str, base: str, extra: dict) -> str:
        settings = {
            "base_url": base,
            "model": "image",
            "binary": True,
            "accept_gzip": True,
            "inputs": {"prompt": {"name": "prompt"}, **SIZE_INPUTS},
            **extra,
        }
        return (
            f"  {name}:\n    type: triton\n    quality: 0.8\n    cost: {{per_image: 0.002}}\n"
            f"    timeouts: {{connect: 2, read: 10, total: 20}}\n"
            f"    capabilities: {{max_n: 4}}\n    settings: {orjson.dumps(settings).decode()}\n"
        )

    return (
        "server: {host: 127.0.0.1, port: 8000, default_deadline_s: 30, retry_backoff_s: 0.05}\n"
        "backends:\n"
        + backend("tri-a", primary, primary_settings)
        + backend("tri-b", secondary, {})
        + "tiers:\n  standard: {quality_floor: 0.5, latency_budget_s: 30}\n"
        "routes:\n  - name: standard\n    match: {tiers: [standard]}\n    strategy: fallback\n"
        "    candidates:\n      - backend: tri-a\n      - backend: tri-b\n"
        "default_tier: standard\n"
    )


@pytest.fixture
def two_fakes():
    first, second = FakeV2(), FakeV2()
    with serve_app(first.app()) as a, serve_app(second.app()) as b:
        first.base, second.base = a, b
        yield first, second


@pytest.fixture
def gateway(two_fakes):
    from gateway.config import load_config_text
    from tests.servers import serve_gateway

    first, second = two_fakes
    config = load_config_text(gateway_yaml(first.base, second.base), source="test")
    with serve_gateway(config) as base:
        yield base


def test_gateway_serves_through_triton(gateway, two_fakes):
    first, _ = two_fakes
    response = post(gateway, {"prompt": "a red fox", "size": "64x32", "seed": 3, "n": 2})
    assert response.status_code == 200, response.text
    assert response.headers["x-backend"] == "tri-a" and response.headers["x-attempts"] == "1"
    data = response.json()["data"]
    for i, item in enumerate(data):
        image = Image(format="png", b64=item["b64_json"])
        np.testing.assert_array_equal(pixels(image), render("a red fox", 3 + i, 64, 32))
    assert sorted(c["inputs"]["seed"][0] for c in first.calls) == [3, 4]


def test_gateway_official_client_jpeg(gateway):
    import openai

    client = openai.OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0)
    result = client.images.generate(prompt="a red fox", size="64x64", output_format="jpeg")
    assert result.data is not None and result.data[0].b64_json is not None
    data = base64.b64decode(result.data[0].b64_json)
    assert data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("status", [503, 500])
def test_gateway_falls_back_when_triton_fails(gateway, two_fakes, status):
    first, second = two_fakes
    first.fail_next(status, "Exceeds maximum queue size" if status == 503 else "model exploded", times=5)
    response = post(gateway, {"prompt": "a red fox", "size": "64x64"})
    assert response.status_code == 200, response.text
    assert response.headers["x-backend"] == "tri-b"
    assert int(response.headers["x-attempts"]) >= 2
    assert len(second.calls) == 1


def test_gateway_does_not_fall_back_on_a_rejected_request(gateway, two_fakes):
    first, second = two_fakes
    first.fail_next(400, "unexpected shape for input 'prompt' for model 'image'")
    response = post(gateway, {"prompt": "a red fox", "size": "64x64"})
    assert response.status_code == 422, response.text
    assert "unexpected shape" in response.json()["error"]["message"]
    assert second.calls == []


def test_gateway_client_disconnect_drops_the_triton_connection(gateway, two_fakes):
    first, _ = two_fakes
    first.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        post(gateway, {"prompt": "a red fox", "size": "64x64"}, timeout=0.5)
    deadline = time.monotonic() + 5
    while first.disconnected < 1:
        assert time.monotonic() < deadline, "Triton never saw the connection close"
        time.sleep(0.05)
