"""Slow and idle clients cannot hold connections (issue 8, item 13: 40 connections that sent a head and 3
bytes of a 100-byte body were all still open after 20 s).

The gateway runs as ``imagegate serve`` runs it (``tests.servers`` → ``gateway.server.uvicorn_settings``)
with deadlines of a fraction of a second. Every check is on events — an answer, the server closing the
socket — with a generous guard against hanging, never a bound on how fast it happened; the only timing
asserted is that nobody was cut off *before* their deadline."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from gateway.config import load_config_text
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import serve_app, serve_gateway

HEADER_S = BODY_S = 0.3
GUARD_S = 30.0  # only so that a broken server fails the test instead of hanging it
# uvloop (libuv) rounds timers to milliseconds against a loop clock cached at the start of each iteration,
# so a deadline may fire a few milliseconds before it is due by the test's clock.
SLACK_S = 0.05

CONFIG = """
server: {{header_timeout_s: {header}, body_timeout_s: {body}, max_header_bytes: 4096,
          limit_concurrency: {limit}}}
backends:
  stub: {{type: openai, cost: {{per_image: 0.01}}, settings: {{base_url: "{base}/v1"}}}}
tiers: {{standard: {{}}}}
routes:
  - {{name: main, candidates: [{{backend: stub}}]}}
default_tier: standard
"""
HEAD = (
    b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
)


@contextlib.contextmanager
def gateway(
    *, header: float = HEADER_S, body: float = BODY_S, limit: int = 1000, **uvicorn_options
) -> Iterator[tuple[str, int]]:
    with serve_app(OpenAIStub()) as upstream:
        config = load_config_text(CONFIG.format(header=header, body=body, limit=limit, base=upstream), "slow")
        if uvicorn_options:
            from gateway.app import create_app

            context = serve_app(create_app(config), **uvicorn_options)
        else:
            context = serve_gateway(config)
        with context as base:
            yield base, int(base.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, int]]:
    with gateway() as served:
        yield served


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``GUARD_S`` if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    return int(head.split(b" ", 2)[1]), orjson.loads(body)["error"]


def test_a_body_that_stops_coming_is_answered_408_and_the_connection_closed(served) -> None:
    base, port = served
    with connect(port) as sock:
        began = time.monotonic()
        sock.sendall(HEAD + b'{"p')
        answer = until_closed(sock)
        assert time.monotonic() - began >= BODY_S - SLACK_S  # not before its deadline
    status, error = status_and_error(answer)
    assert status == 408 and error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert "body" in error["message"]
    # The handler, which was waiting for that body, counts it as a timeout (not as a client that left).
    assert 'outcome="caller.request_timeout"' in httpx.get(base + "/metrics").text


def test_forty_slowloris_connections_are_all_closed(served) -> None:
    _, port = served
    socks = [connect(port) for _ in range(40)]
    answers: dict[socket.socket, bytearray] = {sock: bytearray() for sock in socks}
    selector = selectors.DefaultSelector()
    try:
        for sock in socks:
            sock.sendall(HEAD + b'{"p')
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        still_open = set(socks)
        guard = time.monotonic() + GUARD_S
        while still_open and time.monotonic() < guard:
            for key, _ in selector.select(timeout=1):
                assert isinstance(key.fileobj, socket.socket)
                sock = key.fileobj
                chunk = sock.recv(65536)
                answers[sock].extend(chunk)
                if not chunk:
                    selector.unregister(sock)
                    still_open.discard(sock)
        assert not still_open, f"{len(still_open)} of 40 connections still open"
        assert all(status_and_error(bytes(answer))[0] == 408 for answer in answers.values())
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def test_a_byte_every_little_while_does_not_extend_the_body_deadline(served) -> None:
    _, port = served
    with connect(port) as sock:
        sock.sendall(HEAD)
        sent = 0
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        # 100 bytes at one per 50 ms would take 5 s; each byte arrives well within any idle timeout.
        while sent < 100 and not selector.select(timeout=0.05):
            sock.sendall(b" ")
            sent += 1
        selector.close()
        status, _ = status_and_error(until_closed(sock))
    assert status == 408 and sent < 100


def test_a_head_that_stops_coming_is_answered_408_and_closed(served) -> None:
    _, port = served
    began = time.monotonic()  # the head is due from the connection on
    with connect(port) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
        answer = until_closed(sock)
        assert time.monotonic() - began >= HEADER_S - SLACK_S
    status, error = status_and_error(answer)
    assert status == 408 and "head" in error["message"]


def test_a_connection_that_never_asks_anything_is_closed_without_an_answer(served) -> None:
    _, port = served
    began = time.monotonic()
    with connect(port) as sock:
        assert until_closed(sock) == b""
        assert time.monotonic() - began >= HEADER_S - SLACK_S


def test_a_head_over_max_header_bytes_is_refused_431(served) -> None:
    _, port = served
    with connect(port) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n")
        status, error = status_and_error(until_closed(sock))
    assert status == 431 and error["code"] == "request_header_fields_too_large"


def test_kept_alive_connections_get_the_same_deadline_for_their_next_head(served) -> None:
    _, port = served
    body = b'{"prompt": "a fox", "size": "64x64"}'
    with connect(port) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        first = b""
        while b'"data"' not in first or not first.endswith(b"}"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and then nothing
        status, _ = status_and_error(until_closed(sock))
    assert status == 408


def test_whole_requests_are_never_cut_off(served) -> None:
    base, _ = served
    with httpx.Client(base_url=base) as client:
        for _ in range(3):
            r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
            assert r.status_code == 200
            time.sleep(HEADER_S + 0.1)  # idle past the head deadline, within keep-alive: still served
        assert client.get("/healthz").status_code == 200


def test_connections_over_limit_concurrency_are_answered_503() -> None:
    with gateway(header=GUARD_S, limit=3) as (_, port):
        idle = [connect(port) for _ in range(3)]
        try:
            with connect(port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in idle:
                sock.close()


def test_under_stock_uvicorn_the_handler_bounds_its_own_body_read() -> None:
    """If uvicorn's internals change, ``imagegate serve`` falls back to stock uvicorn, which has no read
    deadlines: the generations handler then still answers a stalled body with a 408."""
    with gateway(http="httptools") as (_, port), connect(port) as sock:
        sock.sendall(HEAD + b'{"p')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}}"):
            answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and orjson.loads(body)["error"]["code"] == "request_timeout"
