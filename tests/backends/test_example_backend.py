"""The README's "Writing a backend" example (``tests/backends/example_backend.py``) is a working backend:
registered for the test only (the one line a new backend adds to ``backends.registry.BACKEND_TYPES``) and
configured from routes.yaml, it serves a request through the gateway against a tiny fake of its API on
127.0.0.1, maps upstream failures into the error vocabulary, and the README shows exactly this module, so
the example cannot rot."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from backends import registry
from backends.base import ImageRequest, StageClock
from backends.errors import BackendFailed, BackendOverloaded, BackendProtocolError, BackendRejected, BackendUnavailable
from gateway.config import Config, load_config_text
from tests.backends import example_backend
from tests.fakes.asgi import read_body, send_json
from tests.fakes.output_host import OutputHost
from tests.servers import post_generation, serve_app, serve_gateway, with_env

KEY = "pixelbox-test-key-7f3a9c"
README = Path(__file__).resolve().parents[2] / "README.md"


class PixelboxFake:
    """The made-up API: ``POST /v1/render`` answers ``count`` image URLs on ``cdn``. ``status`` forces an
    error answer, ``missing`` leaves that many URLs out."""

    def __init__(self, cdn: str) -> None:
        self.cdn = cdn
        self.expected = KEY
        self.status = 200
        self.missing = 0
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        self.auth.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        body = orjson.loads(raw)
        self.bodies.append(body)
        answer: dict[str, Any]
        if scope["path"] != "/v1/render" or self.auth[-1] != f"Token {self.expected}":
            status, answer = 401, {"error": {"message": f"bad key {self.auth[-1]}"}}  # echoes the key
        elif self.status != 200:
            status, answer = self.status, {"error": {"message": f"upstream says {self.status}"}}
        else:
            status, answer = 200, {"images": [f"{self.cdn}/out/{i}.png" for i in range(body["count"] - self.missing)]}
        await send_json(send, status, answer)


@dataclass
class Served:
    api: PixelboxFake
    cdn: OutputHost
    config: Config


@pytest.fixture
def pixelbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    # The registry line a new backend adds (`"pixelbox": "backends.pixelbox:PixelboxBackend"`), for this test only.
    monkeypatch.setitem(registry.BACKEND_TYPES, "pixelbox", "tests.backends.example_backend:PixelboxBackend")
    cdn = OutputHost()
    with serve_app(cdn) as cdn_url:
        api = PixelboxFake(cdn_url)
        cdn_host = cdn_url.removeprefix("http://")
        with serve_app(api) as api_url:
            yaml = f"""
backends:
  pixelbox:
    type: pixelbox
    cost: {{per_image: 0.002}}
    settings: {{api_key: "${{PIXELBOX_KEY}}", base_url: "{api_url}", allowed_output_hosts: ["{cdn_host}"]}}
routes:
  - name: main
    candidates: [{{backend: pixelbox}}]
"""
            config = with_env(lambda: load_config_text(yaml, "pixelbox.yaml"), {"PIXELBOX_KEY": KEY})
            yield Served(api, cdn, config)


def test_the_example_serves_a_request_through_the_gateway(pixelbox: Served) -> None:
    with serve_gateway(pixelbox.config) as gateway:
        response = post_generation(gateway, {"prompt": "a lighthouse", "size": "256x256", "n": 2, "seed": 7})
    assert response.status_code == 200, response.text
    assert [base64.b64decode(item["b64_json"]) for item in response.json()["data"]] == [pixelbox.cdn.image] * 2
    assert pixelbox.api.bodies == [{"prompt": "a lighthouse", "width": 256, "height": 256, "count": 2, "seed": 7}]
    assert pixelbox.api.auth == [f"Token {KEY}"]
    # The images came from the allow-listed host, fetched without the key.
    assert sorted(r.path for r in pixelbox.cdn.requests) == ["/out/0.png", "/out/1.png"]
    assert KEY not in pixelbox.cdn.header_text()


@pytest.mark.parametrize(
    ("status", "missing", "error"),
    [
        (429, 0, BackendOverloaded),
        (503, 0, BackendOverloaded),
        (500, 0, BackendFailed),
        (422, 0, BackendRejected),
        (200, 1, BackendProtocolError),
    ],
)
async def test_failures_map_into_the_vocabulary(
    pixelbox: Served, status: int, missing: int, error: type[Exception]
) -> None:
    backend = registry.create(pixelbox.config.backends["pixelbox"].spec)
    request = ImageRequest(prompt="p", width=64, height=64)
    with pytest.raises(BackendUnavailable, match="not started"):
        await backend.generate(request, StageClock())
    await backend.start()
    try:
        pixelbox.api.status, pixelbox.api.missing = status, missing
        with pytest.raises(error):
            await backend.generate(request, StageClock())
    finally:
        await backend.aclose()
    assert pixelbox.api.auth == [f"Token {KEY}"]


async def test_a_key_the_upstream_echoes_is_scrubbed(pixelbox: Served) -> None:
    pixelbox.api.expected = "another-key-entirely"  # so it answers 401, quoting the header it got
    backend = registry.create(pixelbox.config.backends["pixelbox"].spec)
    await backend.start()
    try:
        with pytest.raises(BackendFailed, match="401") as info:
            await backend.generate(ImageRequest(prompt="p", width=64, height=64), StageClock())
    finally:
        await backend.aclose()
    assert KEY not in info.value.message and "[redacted]" in info.value.message


def test_the_readme_shows_this_module() -> None:
    section = README.read_text().partition("\n## Writing a backend\n")[2]
    assert section, "README.md has no '## Writing a backend' section"
    block = re.search(r"```python\n(.*?)```", section, re.S)
    code = Path(example_backend.__file__).read_text().partition('"""\n\n')[2]  # the module, its docstring aside
    assert block is not None and block.group(1) == code, "the README's example differs from example_backend.py"
