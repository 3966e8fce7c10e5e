"""``gateway.server.GatewayHttpProtocol`` under a real uvicorn on 127.0.0.1: responses are written in one
piece (head held until the first body chunk), everything uvicorn does otherwise still works, and the
arrival stamp reaches the app and the gateway's timing headers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway import server as server_module
from gateway.config import load_config_text
from gateway.server import RECEIVED_AT, GatewayHttpProtocol, protocol
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import free_port, serve_app


@contextlib.contextmanager
def serve_with_protocol(app) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=GatewayHttpProtocol,
        loop="asyncio",
        log_level="warning",
        access_log=False,
        lifespan="auto",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


seen: dict[str, float] = {}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    if path == "/stamp":
        seen["received_at"] = scope["extensions"][RECEIVED_AT]
        seen["app_start"] = time.perf_counter()
    if path == "/boom":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("failed after start, before any body")
    if path == "/stream":  # no content-length: uvicorn chunks it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"hello " + path.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    if path == "/slow":
        await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": body})


def test_protocol_is_used_when_available() -> None:
    assert protocol() is GatewayHttpProtocol


def test_head_waits_for_the_body_and_goes_out_in_one_piece() -> None:
    with serve_with_protocol(app) as (_, port), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(0.15)
        with pytest.raises(TimeoutError):  # plain uvicorn would have sent the head by now
            sock.recv(65536)
        sock.settimeout(2)
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nhello /slow")


def test_keep_alive_streaming_head_and_errors_still_work() -> None:
    with serve_with_protocol(app) as (base, _), httpx.Client(base_url=base) as client:
        for i in range(3):
            r = client.get(f"/n{i}")
            assert r.status_code == 200 and r.text == f"hello /n{i}"
        r = client.get("/stream")
        assert r.text == "one two three" and r.headers["transfer-encoding"] == "chunked"
        r = client.head("/x")
        assert r.status_code == 200 and r.headers["content-length"] == str(len("hello /x"))
        r = client.get("/boom")  # the held head was never written, so uvicorn can still answer 500
        assert r.status_code == 500
        assert client.get("/after").text == "hello /after"


def test_arrival_stamp_reaches_the_app() -> None:
    with serve_with_protocol(app) as (base, _):
        before = time.perf_counter()
        httpx.get(base + "/stamp")
        assert before <= seen["received_at"] <= seen["app_start"] <= time.perf_counter()


def test_gateway_overhead_counts_from_arrival() -> None:
    stub = OpenAIStub()
    with serve_app(stub) as upstream:
        config = load_config_text(
            f"""
backends:
  up:
    type: openai
    settings: {{base_url: "{upstream}/v1"}}
tiers:
  standard: {{quality_floor: 0.0}}
routes:
  - name: main
    candidates: [{{backend: up}}]
default_tier: standard
""",
            source="test",
        )
        from gateway.app import create_app

        with serve_with_protocol(create_app(config)) as (base, _), httpx.Client(base_url=base) as client:
            for _ in range(3):
                r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
                assert r.status_code == 200
                timing = dict(
                    part.split(";dur=")[:2]
                    for part in (p.split(";desc=")[0].strip() for p in r.headers["server-timing"].split(","))
                )
                gateway, backend, total = (float(timing[k]) for k in ("gateway", "backend", "total"))
                assert gateway > 0 and backend > 0
                assert abs(gateway + backend - total) < 0.01
                assert float(r.headers["x-gateway-overhead-ms"]) == pytest.approx(gateway, abs=0.001)


def test_answer_for_a_client_already_gone_is_dropped_not_raised() -> None:
    from gateway.server import _Capture

    class ClosedTransport:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def is_closing(self) -> bool:
            return True

        def write(self, data: bytes) -> None:  # uvloop raises here once the handle is closed
            raise RuntimeError("unable to perform operation on a closed handle")

        def close(self) -> None:
            pass

    capture = _Capture(ClosedTransport())
    capture.write(b"HTTP/1.1 200 OK\r\n\r\n")
    capture.write(b"body")
    capture.flush()  # no exception


# -- uvicorn's internals are checked at start-up (issue 8, "the speed layer stays, made safe") -----------------


def _drop_response_started(monkeypatch) -> None:
    original = RequestResponseCycle.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self.response_started  # as if uvicorn renamed it

    monkeypatch.setattr(RequestResponseCycle, "__init__", init)


def _send_takes_more(monkeypatch) -> None:
    async def send(self, message, *, flush=True):
        pass

    monkeypatch.setattr(RequestResponseCycle, "send", send)


def _wrapped_headers_complete(monkeypatch) -> None:
    original = HttpToolsProtocol.on_headers_complete

    def on_headers_complete(self):  # builds its cycle somewhere else now
        original(self)

    monkeypatch.setattr(HttpToolsProtocol, "on_headers_complete", on_headers_complete)


CHANGES = {
    "no on_message_complete": lambda mp: mp.delattr(HttpToolsProtocol, "on_message_complete"),
    "cycle without response_started": _drop_response_started,
    "send with another signature": _send_takes_more,
    "cycle built elsewhere": _wrapped_headers_complete,
    "an __init__ that sets other attributes": lambda mp: mp.setattr(
        HttpToolsProtocol, "__init__", lambda self, config, server_state, app_state, _loop=None: None
    ),
}


def test_the_pinned_uvicorn_has_what_the_protocol_relies_on() -> None:
    assert server_module.check_internals() is None


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_internal_falls_back_to_stock_uvicorn_with_one_warning(change, monkeypatch) -> None:
    CHANGES[change](monkeypatch)
    assert server_module.check_internals() is not None
    warnings = []

    class Log:
        def warning(self, event, **fields):
            warnings.append((event, fields))

    assert server_module.protocol(Log()) == "auto"
    assert len(warnings) == 1 and warnings[0][0] == "uvicorn_internals_changed" and warnings[0][1]["detail"]


def test_the_fallback_serves_the_gateway_under_stock_uvicorn(monkeypatch) -> None:
    from tests.servers import serve_gateway

    _wrapped_headers_complete(monkeypatch)  # stock uvicorn still works with this one; our subclass would not know
    stub = OpenAIStub()
    with serve_app(stub) as upstream:
        config = load_config_text(
            f"""
backends:
  up: {{type: openai, settings: {{base_url: "{upstream}/v1"}}}}
tiers: {{standard: {{}}}}
routes:
  - {{name: main, candidates: [{{backend: up}}]}}
default_tier: standard
""",
            source="test",
        )
        with structlog.testing.capture_logs() as logs:
            from gateway.server import uvicorn_settings

            assert uvicorn_settings(config)["http"] == "auto"
        assert [entry["event"] for entry in logs] == ["uvicorn_internals_changed"]
        with serve_gateway(config) as base:
            r = httpx.post(base + "/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
            assert r.status_code == 200 and "x-gateway-overhead-ms" in r.headers
