"""Issue #8 item 5: a backend's unreadable image (non-image base64, truncated PNG) is that backend's
failure, found inside the attempt: the request falls through to the next candidate and gets a 200, never
a 500 from a transcode after dispatch."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image as PILImage

from backends.base import BackendSpec, Image, ImageRequest, ImageResult, Load, StageClock, Usage
from gateway.app import create_app
from gateway.config import load_config_text

CONFIG = """
server: {max_retries: 0, cooldown_failures: 0}
backends:
  first: {type: openai, settings: {base_url: "http://127.0.0.1:9/v1"}}
  second: {type: openai, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - name: main
    candidates: [{backend: first}, {backend: second}]
"""


def png(size: int = 48) -> bytes:
    buf = io.BytesIO()
    PILImage.effect_noise((size, size), 60).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


class Fixed:
    """Answers every request with the same image."""

    Settings = object

    def __init__(self, spec: BackendSpec, image: Image) -> None:
        self.spec, self.image, self.calls = spec, image, 0

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        self.calls += 1
        return ImageResult((self.image,) * request.n, Usage(images=request.n))


GOOD = png()
BAD = {
    "base64 of text": Image(format="png", b64=base64.b64encode(b"upstream error page").decode()),
    "not base64": Image(format="png", b64="%%% definitely not base64 %%%"),
    "truncated png (base64)": Image(format="png", b64=base64.b64encode(GOOD[: len(GOOD) // 2]).decode()),
    "truncated png (bytes)": Image(format="png", data=GOOD[:-30]),
}


@pytest.mark.parametrize("output_format", ["png", "webp"])
@pytest.mark.parametrize("bad", list(BAD))
async def test_bad_output_falls_through_to_the_next_backend(bad, output_format):
    config = load_config_text(CONFIG, "t.yaml")
    first = Fixed(config.backends["first"].spec, BAD[bad])
    second = Fixed(config.backends["second"].spec, Image(format="png", data=GOOD))
    app = create_app(config, backends={"first": first, "second": second})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        response = await client.post(
            "/v1/images/generations", json={"prompt": "a fox", "size": "48x48", "output_format": output_format}
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-backend"] == "second" and response.headers["x-attempts"] == "2"
    assert first.calls == 1 and second.calls == 1
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    with PILImage.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == output_format.upper() and img.size == (48, 48)


async def test_only_bad_outputs_is_a_502_naming_them_not_a_500():
    config = load_config_text(CONFIG, "t.yaml")
    backends = {name: Fixed(config.backends[name].spec, BAD["truncated png (base64)"]) for name in ("first", "second")}
    app = create_app(config, backends=backends)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        response = await client.post("/v1/images/generations", json={"prompt": "a fox", "size": "48x48"})
    assert response.status_code == 502, response.text
    assert response.headers["x-attempts"] == "2"
    assert "not a readable image" in response.json()["error"]["message"]


def encoded(fmt: str, size: int = 40) -> bytes:
    buf = io.BytesIO()
    PILImage.effect_noise((size, size), 60).convert("RGB").save(buf, format=fmt.upper())
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_the_passthrough_check_knows_each_format_and_its_truncation(fmt):
    from backends.imaging import quick_format

    data = encoded(fmt)
    for form in (lambda d: Image(format=fmt, data=d), lambda d: Image(format=fmt, b64=base64.b64encode(d).decode())):
        assert quick_format(form(data)) == fmt
        assert quick_format(form(data[:-7])) is None  # truncated
        assert quick_format(form(data + b"\x00")) is None  # trailing bytes
        if fmt == "webp":  # the only format whose header states its length (PNG and JPEG: a full decode)
            assert quick_format(form(data[: len(data) // 2] + data[len(data) // 2 + 5 :])) is None  # spliced


PADDED = next(d for d in (png(96) for _ in range(50)) if len(d) % 3)  # its base64 ends with "="


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(base64.encodebytes(PADDED).decode(), id="base64 with line breaks"),
        pytest.param(base64.b64encode(PADDED).decode().rstrip("="), id="base64 without padding"),
    ],
)
def test_unusual_but_good_base64_is_accepted_not_failed(text):
    from backends.imaging import conform, quick_format

    image = Image(format="png", b64=text)
    assert quick_format(image) is None  # not the fast path...
    with PILImage.open(io.BytesIO(conform(image, "png").as_bytes())) as img:  # ...but a good image
        img.load()
        assert img.size == (96, 96)
