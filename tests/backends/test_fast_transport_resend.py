"""``FastTransport`` when things go wrong around the pool: the one resend on a stale keep-alive connection
(and when it must not happen), pool slots that come back whatever fails, and the start-up check of the httpx
internals it relies on (with the fallback to httpx's own transport)."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any, Self

import httpx
import pytest
import structlog

from backends import fast_transport
from backends import fast_transport_check as fast_check
from backends.fast_transport import FastTransport, make_transport
from tests.backends.test_fast_transport import RawServer, echo_forever, ok, read_request


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class IdleCloser:
    """Answers the first request of each connection, keep-alive; the next one on that connection arrives just
    as the server's keep-alive timer fires: it is read and dropped, and the connection closed (``fin``), reset
    (``reset``), or closed after half a status line (``partial``). Records what it saw."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.answered: list[bytes] = []  # request lines answered, in order
        self.dropped: list[bytes] = []  # request lines dropped unanswered

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        self.answered.append(line)
        writer.write(ok(b"answered on a new connection: " + line))
        await writer.drain()
        try:
            line, _, _ = await read_request(reader)
        except asyncio.IncompleteReadError:
            return  # the client closed it first
        self.dropped.append(line)
        if self.how == "reset":
            _reset_on_close(writer)
        elif self.how == "partial":
            writer.write(b"HTTP/1.1 200 O")
            await writer.drain()


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_stale_keep_alive_connection_resent_once_when_safe(how: str) -> None:
    server_side = IdleCloser(how)
    async with RawServer(server_side) as server, httpx.AsyncClient(transport=FastTransport(), timeout=5.0) as client:
        assert (await client.get(server.url + "/one")).status_code == 200
        # Reused connection, closed as the request arrived, nothing received: resent on a fresh connection.
        r = await client.get(server.url + "/two")
        assert r.content == b"answered on a new connection: GET /two HTTP/1.1"
        assert server_side.dropped == [b"GET /two HTTP/1.1"] and server.connections == 2
        r = await client.put(server.url + "/three", content=b"x")  # PUT is idempotent too
        assert r.content == b"answered on a new connection: PUT /three HTTP/1.1" and server.connections == 3

        # A POST that was written may have been applied (RFC 9112 §9.3.1): not resent, the error surfaces.
        error = httpx.RemoteProtocolError if how == "fin" else httpx.ReadError
        with pytest.raises(error) as info:
            await client.post(server.url + "/four", content=b"{}")
        assert info.value.request.url.path == "/four"
        assert server_side.dropped[-1] == b"POST /four HTTP/1.1" and server.connections == 3  # no resend

        # ...unless the caller vouches for it with an Idempotency-Key.
        assert (await client.get(server.url + "/five")).status_code == 200  # a new pooled connection
        r = await client.post(server.url + "/six", content=b"{}", headers={"Idempotency-Key": "k1"})
        assert r.content == b"answered on a new connection: POST /six HTTP/1.1" and server.connections == 5
        assert server_side.dropped == [
            b"GET /two HTTP/1.1",
            b"PUT /three HTTP/1.1",
            b"POST /four HTTP/1.1",
            b"POST /six HTTP/1.1",
        ]


async def test_no_resend_once_the_server_started_answering_or_on_a_fresh_connection() -> None:
    server_side = IdleCloser("partial")
    async with RawServer(server_side) as server, httpx.AsyncClient(transport=FastTransport()) as client:
        await client.get(server.url + "/one")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url + "/two")  # half a status line arrived: the server was answering
        assert server.connections == 1

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with RawServer(never_answers) as server, httpx.AsyncClient(transport=FastTransport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)  # a new connection that fails is a failing server, not a stale one
        assert server.connections == 1


class ResettingServer:
    """A blocking server in its own thread, i.e. not on the test's event loop: it can reset a connection while
    that loop is blocked, so the client's kernel knows of the reset before the client's event loop does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.reset_now = threading.Event()
        self.was_reset = threading.Event()
        self.requests: list[tuple[int, bytes]] = []  # (connection number, body) of every request answered
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset_now.set()
        self.listener.close()
        for conn in self._open:  # wakes a blocked recv
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)

    @staticmethod
    def _read(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(
            next(
                v
                for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
                if k.strip().lower() == b"content-length"
            )
        )
        while len(body) < length:
            body += conn.recv(65536)
        return body

    def _answer(self, conn: socket.socket, number: int) -> bool:
        body = self._read(conn)
        if body is None:
            return False
        self.requests.append((number, body))
        conn.sendall(ok(b"connection %d got %s" % (number, body)))
        return True

    def _run(self) -> None:
        first, _ = self.listener.accept()
        with first:
            self._answer(first, 1)
            self.reset_now.wait(10)
            first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.was_reset.set()  # closed with RST, before the client wrote its next request
        try:
            second, _ = self.listener.accept()
        except OSError:
            return
        self._open.append(second)
        with second, contextlib.suppress(OSError):
            while self._answer(second, 2):
                pass


async def test_a_request_that_could_not_be_written_is_resent_whatever_its_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decided: list[tuple[bool, bool]] = []
    real = fast_transport._resendable

    def spy(request: Any, body: Any, conn: Any, exc: Any, unsent: bool) -> bool:
        decided.append((unsent, answer := real(request, body, conn, exc, unsent)))
        return answer

    monkeypatch.setattr(fast_transport, "_resendable", spy)
    transport = FastTransport()
    with ResettingServer() as server:
        async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
            assert (await client.post(server.url, content=b"one")).content == b"connection 1 got one"
            server.reset_now.set()
            # Blocking on purpose: the event loop must not run (and learn of the reset) before the next write.
            assert server.was_reset.wait(10)
            (pooled,) = transport._idle[("127.0.0.1", int(server.url.rsplit(":", 1)[1]))]
            assert pooled.transport is not None
            readable, _, _ = select.select([pooled.transport.get_extra_info("socket")], [], [], 10)
            assert readable, "the reset never reached the client's socket"
            r = await client.post(server.url, content=b"two")  # POST: resent only because it never left
            assert r.content == b"connection 2 got two"
    assert server.requests == [(1, b"one"), (2, b"two")]  # applied once
    assert decided == [(True, True)]  # the send itself failed on the stale connection


# -- pool slots ---------------------------------------------------------------------------------------------


async def test_a_failing_trace_callback_gives_its_pool_slot_back() -> None:
    stop = asyncio.Event()

    async def failing_trace(name: str, info: dict[str, Any]) -> None:
        if name == "connection.connect_tcp.started":
            raise RuntimeError("trace callback failed")

    async def stuck_trace(name: str, info: dict[str, Any]) -> None:
        stop.set()
        await asyncio.Event().wait()  # until cancelled

    transport = FastTransport(httpx.Limits(max_connections=1))
    async with RawServer(echo_forever) as server, httpx.AsyncClient(transport=transport, timeout=5.0) as client:
        with pytest.raises(RuntimeError, match="trace callback failed"):
            await client.get(server.url, extensions={"trace": failing_trace})
        assert transport._open == 0
        task = asyncio.create_task(client.get(server.url, extensions={"trace": stuck_trace}))
        await stop.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert transport._open == 0
        # The only slot is free: no waiting for the pool (a leaked slot would make this a PoolTimeout).
        r = await client.get(server.url, timeout=httpx.Timeout(5.0, pool=0.5))
        assert r.status_code == 200 and server.connections == 1


# -- httpx internals: checked once, fallback with one warning line ------------------------------------------


@pytest.fixture
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The check runs again under this test's patches, and again (unpatched) after it."""
    monkeypatch.setattr(fast_check, "_warned", False)
    fast_check.check_internals.cache_clear()
    yield
    fast_check.check_internals.cache_clear()


def _content_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx keeps a read body somewhere else than ``_content``."""

    def content(self: httpx.Response) -> bytes:
        if not hasattr(self, "_body"):
            raise httpx.ResponseNotRead()
        return self._body

    async def aread(self: httpx.Response) -> bytes:
        if not hasattr(self, "_body"):
            self._body = b"".join([part async for part in self.aiter_bytes()])  # type: ignore[attr-defined]  # a new attribute
        return self._body  # type: ignore[attr-defined]  # set just above when it was not there

    async def aiter_bytes(self: httpx.Response, chunk_size: int | None = None) -> Any:
        if hasattr(self, "_body"):
            yield self._body
            return
        async for part in self.aiter_raw():
            yield part

    monkeypatch.setattr(httpx.Response, "content", property(content))
    monkeypatch.setattr(httpx.Response, "aread", aread)
    monkeypatch.setattr(httpx.Response, "aiter_bytes", aiter_bytes)


def _timeouts_set_at_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx attaches the timeouts in ``send`` instead of ``build_request`` (the send shortcut would lose them)."""
    build = httpx.AsyncClient.build_request

    def build_request(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Request:
        request = build(self, *args, **kwargs)
        request.extensions.pop("timeout", None)
        return request

    monkeypatch.setattr(httpx.AsyncClient, "build_request", build_request)


def _raw_headers_as_str(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Headers.raw`` yields str pairs."""
    monkeypatch.setattr(
        httpx.Headers, "raw", property(lambda self: [(k.decode(), v.decode()) for k, _, v in self._list])
    )


@pytest.mark.parametrize("change", [_content_renamed, _timeouts_set_at_send, _raw_headers_as_str])
def test_a_changed_httpx_internal_falls_back_to_httpx_transport_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, fresh_check: None, change: Any
) -> None:
    assert fast_check.check_internals() is None and FastTransport.supported()
    assert isinstance(make_transport(httpx.Limits()), FastTransport)
    fast_check.check_internals.cache_clear()
    change(monkeypatch)
    limits = httpx.Limits(max_connections=7, max_keepalive_connections=3)
    with structlog.testing.capture_logs() as logs:
        assert not FastTransport.supported()
        transport = make_transport(limits, trust_env=False)
        assert not FastTransport.supported()
    assert type(transport) is httpx.AsyncHTTPTransport
    assert transport._pool._max_connections == 7  # the same limits
    (line,) = logs  # one line however often asked
    assert line["log_level"] == "warning" and line["event"] == "fast_transport.disabled"
    assert line["reason"] and line["using"] == "httpx.AsyncHTTPTransport"


def test_missing_httptools_falls_back(monkeypatch: pytest.MonkeyPatch, fresh_check: None) -> None:
    monkeypatch.setattr(fast_check, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'httptools'")
    with structlog.testing.capture_logs() as logs:
        assert type(make_transport(httpx.Limits())) is httpx.AsyncHTTPTransport
    assert "httptools" in logs[0]["reason"]


async def test_make_client_uses_httpx_transport_when_internals_differ(monkeypatch, fresh_check):
    from backends import http
    from tests.backends.test_fast_transport import spec

    monkeypatch.delenv("IMAGEGATE_HTTP_TRANSPORT", raising=False)
    async with http.make_client(spec()) as client:
        assert isinstance(client._transport, FastTransport) and client in http._FAST
    fast_check.check_internals.cache_clear()
    _content_renamed(monkeypatch)
    with structlog.testing.capture_logs() as logs:
        async with http.make_client(spec()) as client:
            assert type(client._transport) is httpx.AsyncHTTPTransport and client not in http._FAST
    assert [e["event"] for e in logs] == ["fast_transport.disabled"]
