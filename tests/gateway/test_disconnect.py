"""A client that goes away mid-request cancels the backend's work (the handler's lazy disconnect watcher),
and a fast request never starts the watcher at all."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading

import httpx

from backends.base import Image, ImageRequest, ImageResult, Load, StageClock
from gateway import handler as handler_module
from gateway.app import create_app
from gateway.config import load_config_text
from tests.fakes.openai_stub import tiny_png
from tests.servers import serve_app

PNG = base64.b64encode(tiny_png()).decode()  # a decodable image (the gateway checks what backends return)

CONFIG = """
backends:
  up:
    type: openai
    settings: {base_url: "http://127.0.0.1:9/v1"}
tiers:
  standard: {quality_floor: 0.0}
routes:
  - name: main
    candidates: [{backend: up}]
default_tier: standard
"""


class SlowBackend:
    """Takes ``delay`` seconds per request (None: never answers); records how each call ended."""

    Settings = object

    def __init__(self, spec, delay: float | None) -> None:
        self.spec = spec
        self.delay = delay
        self.outcomes: list[str] = []
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        self.started.set()
        try:
            with clock.waiting():
                if self.delay is None:
                    await asyncio.Event().wait()  # only a cancellation ends this
                else:
                    await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            self.cancelled.set()
            raise
        self.outcomes.append("done")
        return ImageResult((Image(format="png", b64=PNG),))


def gateway_with(delay: float | None):
    config = load_config_text(CONFIG, source="test")
    backend = SlowBackend(config.backends["up"].spec, delay)
    return create_app(config, backends={"up": backend}), backend


def test_client_disconnect_cancels_the_backend() -> None:
    app, backend = gateway_with(delay=None)  # never answers: only the cancellation can end its work
    body = b'{"prompt": "a fox", "size": "64x64"}'
    with serve_app(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert backend.started.wait(30), "the request never reached the backend"
        # The client has gone while the backend works. The watcher (started WATCH_AFTER_S into the dispatch)
        # finds the disconnect and cancels the work: the wait below ends then, however long that takes.
        assert backend.cancelled.wait(60), "the backend kept working for a client that left"
        metrics = httpx.get(base + "/metrics").text
    assert backend.outcomes == ["cancelled"]
    assert 'outcome="gateway.client_disconnected"' in metrics


def test_fast_requests_never_start_a_watcher(monkeypatch) -> None:
    started = []
    original = handler_module._Watch.start

    def counting_start(self) -> None:
        started.append(1)
        original(self)

    monkeypatch.setattr(handler_module._Watch, "start", counting_start)
    app, backend = gateway_with(delay=0.0)
    with serve_app(app) as base, httpx.Client(base_url=base) as client:
        for _ in range(5):
            assert client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"}).status_code == 200
    slow_app, _ = gateway_with(delay=0.3)
    with serve_app(slow_app) as base, httpx.Client(base_url=base) as client:
        assert client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"}).status_code == 200
    assert backend.outcomes == ["done"] * 5
    assert len(started) == 1  # only the request slower than WATCH_AFTER_S
