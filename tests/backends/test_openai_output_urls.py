"""``type: openai`` with ``response_format: url`` (issue #8 item 15): an upstream's output link reaches the
client only when ``allowed_output_hosts`` allows its host and it is not a private, loopback or link-local
address. A link to an allow-listed private address is fetched and re-hosted by the gateway; any other link
is the backend's failure (``OutputNotAllowed``), so the request falls back to the next candidate."""

from __future__ import annotations

import httpx
import orjson
import pytest

from backends.base import BackendSpec, ImageRequest, StageClock, Timeouts
from backends.errors import OutputNotAllowed
from backends.http import passable_link
from backends.openai_compat import OpenAIBackend, Settings
from backends.settings import build
from gateway.config import load_config_text
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import post_generation, serve_app, serve_gateway

METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/role"


@pytest.mark.parametrize(
    ("url", "allowed", "passable"),
    [
        ("https://images.example.com/a.png", ("images.example.com",), True),
        ("https://cdn.example.com/a.png", ("*.example.com",), True),
        ("https://8.8.8.8/a.png", ("8.8.8.8",), True),  # a public address literal, allow-listed
        ("https://evil.example.net/a.png", ("images.example.com",), False),  # not allow-listed
        (METADATA, ("images.example.com",), False),
        (METADATA, ("169.254.169.254",), False),  # link-local: never handed out, even when allow-listed
        ("http://127.0.0.1:8080/a.png", ("127.0.0.1:8080",), False),  # loopback
        ("http://10.1.2.3/a.png", ("10.1.2.3",), False),  # private
        ("http://[::1]/a.png", ("::1",), False),
        ("http://[fe80::1]/a.png", ("fe80::1",), False),
        ("http://2130706433/a.png", ("2130706433",), False),  # 127.0.0.1 spelled as one number
        ("http://0x7f.1/a.png", ("0x7f.1",), False),
        ("https://user:pw@images.example.com/a.png", ("images.example.com",), False),  # userinfo
        ("ftp://images.example.com/a.png", ("images.example.com",), False),
        ("data:image/png;base64,iVBORw0KGgo=", ("images.example.com",), False),
    ],
)
def test_passable_link(url: str, allowed: tuple[str, ...], passable: bool) -> None:
    assert passable_link(url, allowed) is passable


def backend(base: str, allowed: list[str]) -> OpenAIBackend:
    settings = build(Settings, {"base_url": f"{base}/v1", "allowed_output_hosts": allowed})
    return OpenAIBackend(
        BackendSpec(name="up", type="openai", settings=settings, timeouts=Timeouts(connect=2, read=5, total=10))
    )


async def test_url_mode_checks_the_upstream_link() -> None:
    stub = OpenAIStub()
    with serve_app(stub) as base:
        loopback = base.split("://", 1)[1]
        b = backend(base, ["images.example.com", loopback])
        await b.start()
        try:
            url_mode = ImageRequest(prompt="p", response_format="url")
            # A metadata-service link is refused, not handed to the client.
            stub.script = [f"url:{METADATA}"]
            with pytest.raises(OutputNotAllowed, match=r"169\.254\.169\.254"):
                await b.generate(url_mode, StageClock())
            # An allow-listed public host goes through as it is (nothing is fetched).
            stub.script = ["url:https://images.example.com/out/a.png"]
            (image,) = (await b.generate(url_mode, StageClock())).images
            assert image.url == "https://images.example.com/out/a.png" and image.data is None
            # An allow-listed loopback address (the stub's own /files/x.png) is fetched and re-hosted.
            stub.script = ["url"]
            (image,) = (await b.generate(url_mode, StageClock())).images
            assert image.url is None and image.data == stub.image
        finally:
            await b.aclose()


def test_gateway_falls_back_when_the_upstream_links_to_the_metadata_service() -> None:
    bad, good = OpenAIStub(), OpenAIStub()
    with serve_app(bad) as bad_url, serve_app(good) as good_url:
        config = load_config_text(
            f"""
server: {{max_retries: 0, cooldown_failures: 0, public_url: "http://gateway.test"}}
backends:
  bad: {{type: openai, settings: {{base_url: "{bad_url}/v1"}}}}
  good: {{type: openai, settings: {{base_url: "{good_url}/v1"}}}}
routes:
  - name: main
    candidates: [{{backend: bad}}, {{backend: good}}]
""",
            "links.yaml",
        )
        bad.script = [f"url:{METADATA}"]
        with serve_gateway(config) as gateway:
            response = post_generation(gateway, {"prompt": "a cat", "response_format": "url"})
            assert response.status_code == 200, response.text
            assert response.headers["x-backend"] == "good" and response.headers["x-attempts"] == "2"
            (item,) = orjson.loads(response.content)["data"]
            assert "169.254" not in response.text
            assert item["url"].startswith("http://gateway.test/v1/images/files/")
            file = httpx.get(gateway + item["url"].removeprefix("http://gateway.test"), timeout=5)
            assert file.status_code == 200 and file.content == good.image
