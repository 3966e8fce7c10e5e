"""``response_format: url``: where links point (never where a client's Host header says: issue 8, item 14)
and where the images live (a directory shared by worker processes: item 12)."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from backends.http import make_client
from backends.remote import RemoteBackend
from gateway.app import create_app
from gateway.config import load_config_text
from gateway.images import DirectoryImageStore, MemoryImageStore, open_store
from tests.fakes.openai_stub import OpenAIStub, tiny_png
from tests.servers import serve_app, serve_gateway

CONFIG = """
server: {{public_url: {public}, image_dir: {image_dir}}}
backends:
  stub: {{type: openai, cost: {{per_image: 0.01}}, settings: {{base_url: "{base}/v1"}}}}
tiers: {{standard: {{}}}}
routes:
  - {{name: main, candidates: [{{backend: stub}}]}}
default_tier: standard
"""
URL_REQUEST = {"prompt": "a fox", "size": "64x64", "response_format": "url"}


def config(base: str, *, public: str | None = None, image_dir: str | None = None):
    return load_config_text(CONFIG.format(base=base, public=public or "null", image_dir=image_dir or "null"), "links")


# -- links ------------------------------------------------------------------------------------------------


def test_links_ignore_the_host_header_and_point_at_the_bound_address() -> None:
    stub = OpenAIStub()
    with serve_app(stub) as upstream, serve_gateway(config(upstream)) as base:
        r = httpx.post(base + "/v1/images/generations", json=URL_REQUEST, headers={"Host": "attacker.example:666"})
        assert r.status_code == 200
        url = r.json()["data"][0]["url"]
        assert url.startswith(base + "/v1/images/files/"), url
        got = httpx.get(url)
        assert got.status_code == 200 and got.content == stub.image


def test_links_use_public_url_when_configured() -> None:
    with (
        serve_app(OpenAIStub()) as upstream,
        serve_gateway(config(upstream, public="https://images.example.com/gw/")) as base,
    ):
        r = httpx.post(base + "/v1/images/generations", json=URL_REQUEST, headers={"Host": "attacker.example"})
        url = r.json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/gw/v1/images/files/")
        assert httpx.get(base + url.removeprefix("https://images.example.com/gw")).status_code == 200


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (("10.1.2.3", 8080), "http://10.1.2.3:8080"),
        (("::1", 8000), "http://[::1]:8000"),
        (None, "http://127.0.0.1:8000"),  # a Unix socket: the configured address
    ],
)
def test_base_url_from_the_servers_own_address(server, expected) -> None:
    app = create_app(config("http://stub.invalid"))
    scope = {"type": "http", "scheme": "http", "server": server, "headers": [(b"host", b"attacker.example:666")]}
    assert app._base_url(scope) == expected


def test_public_url_must_be_a_url() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match="public_url"):
        config("http://stub.invalid", public="images.example.com")


# -- the directory store ----------------------------------------------------------------------------------


def test_an_image_put_by_one_store_is_read_by_another_on_the_same_directory(tmp_path) -> None:
    one, two = (DirectoryImageStore(tmp_path, ttl_s=60, max_bytes=1 << 20) for _ in range(2))
    key = one.put(b"\x89PNG-one", "png")
    assert two.get(key) == (b"\x89PNG-one", "image/png")
    assert [p.name for p in tmp_path.iterdir()] == [key]  # no temporary left behind
    assert one.get(two.put(b"jpeg!", "jpeg")) == (b"jpeg!", "image/jpeg")


def test_expired_images_are_not_served_and_are_swept(tmp_path) -> None:
    now = [1_000_000.0]
    store = DirectoryImageStore(tmp_path, ttl_s=60, max_bytes=1 << 20, clock=lambda: now[0])
    key = store.put(b"old", "png")
    os.utime(tmp_path / key, (now[0], now[0]))
    now[0] += 61
    assert store.get(key) is None  # expired, swept or not
    store.put(b"new", "png")  # more than ttl/4 later: this put sweeps
    assert not (tmp_path / key).exists()


def test_the_directory_is_bounded_oldest_first(tmp_path) -> None:
    store = DirectoryImageStore(tmp_path, ttl_s=600, max_bytes=10_000)
    keys = []
    born = time.time() - 100
    for i in range(8):
        keys.append(store.put(bytes([i]) * 3000, "png"))
        os.utime(tmp_path / keys[-1], (born + i, born + i))  # distinct, ordered ages, none expired
    store.sweep()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(keys[-3:])  # 3 x 3000 bytes fit in 10 000
    assert store.get(keys[-1]) == (bytes([7]) * 3000, "image/png")


def test_only_keys_it_made_are_looked_up(tmp_path) -> None:
    store = DirectoryImageStore(tmp_path / "images", ttl_s=60, max_bytes=1 << 20)
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "images" / ".AAAAAAAAAAAAAAAAAAAAAA.png.tmp").write_bytes(b"half")  # a write in progress
    (tmp_path / "images" / "notes.txt").write_text("someone else's")
    for key in ("../secret.txt", ".AAAAAAAAAAAAAAAAAAAAAA.png.tmp", "notes.txt", "AAAAAAAAAAAAAAAAAAAAAA.gif", ""):
        assert store.get(key) is None
    store.sweep()
    assert (tmp_path / "images" / "notes.txt").exists()  # not ours: left alone


def test_one_worker_keeps_images_in_memory_unless_a_directory_is_configured(tmp_path) -> None:
    assert isinstance(open_store(config("http://x").server), MemoryImageStore)
    assert isinstance(open_store(config("http://x", image_dir=str(tmp_path)).server), DirectoryImageStore)


def test_two_gateways_sharing_a_directory_serve_each_others_links(tmp_path) -> None:
    """What ``serve --workers 2`` runs: two processes, each its own gateway, one image directory."""
    cfg = config("http://stub.invalid", image_dir=str(tmp_path))
    first, second = create_app(cfg), create_app(cfg)
    stub = OpenAIStub(tiny_png(color=(1, 2, 3)))

    async def run() -> tuple[httpx.Response, httpx.Response]:
        backend = first.backends["stub"]
        assert isinstance(backend, RemoteBackend)
        backend._client = client = make_client(backend.spec, transport=httpx.ASGITransport(stub))
        try:
            async with (
                httpx.AsyncClient(transport=httpx.ASGITransport(first), base_url="http://gw") as a,
                httpx.AsyncClient(transport=httpx.ASGITransport(second), base_url="http://gw") as b,
            ):
                made = await a.post("/v1/images/generations", json=URL_REQUEST)
                path = httpx.URL(made.json()["data"][0]["url"]).path
                return made, await b.get(path)
        finally:
            await client.aclose()

    made, served = asyncio.run(run())
    assert made.status_code == 200
    assert served.status_code == 200 and served.content == stub.image
    assert served.headers["content-type"] == "image/png"
