"""``backends.fast_transport.FastTransport`` against real servers on 127.0.0.1: a scripted raw asyncio
server for the wire-level cases (chunked, close mid-body, hangs, 1xx, read-until-close) and uvicorn for
the ordinary ones. What is checked: bodies and headers arrive intact, keep-alive connections are reused,
failures raise the same httpx exception types httpcore raises (so ``backends.http`` maps them the same),
the pool honours its limits and timeouts, and wire time is reported through trace events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from backends.base import BackendSpec, StageClock, Timeouts
from backends.errors import BackendProtocolError, BackendTimeout, BackendUnavailable
from backends.fast_transport import FastTransport
from backends.http import make_client, send
from tests.servers import free_port, serve_app

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on 127.0.0.1 running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""
        self._server: asyncio.base_events.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One request: (request line, lower-cased headers, body). Understands Content-Length and chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(b":", 1) for x in lines)}
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive server: answers every request with its method, path and body."""
    while True:
        try:
            line, headers, body = await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(ok(line + b"|" + body, b"X-Seen-Host: " + headers.get(b"host", b"") + b"\r\n"))
        await writer.drain()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=FastTransport(), timeout=httpx.Timeout(5.0)) as c:
        yield c


async def test_post_round_trip_and_keep_alive_reuse(client: httpx.AsyncClient) -> None:
    async with RawServer(echo_forever) as server:
        for i in range(5):
            r = await client.post(server.url + f"/v1/x?i={i}", content=b"hello %d" % i)
            assert r.status_code == 200
            assert r.content == b"POST /v1/x?i=%d HTTP/1.1|hello %d" % (i, i)
            assert r.headers["x-seen-host"] == server.url.removeprefix("http://")
            assert r.reason_phrase == "OK" and r.http_version == "HTTP/1.1"
        assert server.connections == 1  # one keep-alive connection served all five


async def test_against_uvicorn_json_and_streamed_request_body(client: httpx.AsyncClient) -> None:
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = b'{"len": %d, "method": "%s"}' % (len(body), scope["method"].encode())
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))],
            }
        )
        await send({"type": "http.response.body", "body": out})

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"a" * 1000, b"", b"b" * 70000, b"c"):
            yield part

    with serve_app(app) as base:
        r = await client.post(base + "/", json={"x": 1})
        assert r.status_code == 201 and r.json() == {"len": 7, "method": "POST"}
        r = await client.post(base + "/", content=chunks())  # no length: sent chunked
        assert r.json() == {"len": 71001, "method": "POST"}
        r = await client.head(base + "/")  # HEAD goes to httpx's own transport
        assert r.status_code == 201 and r.content == b""


async def test_chunked_response_streams_before_the_end(client: httpx.AsyncClient) -> None:
    release = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep the connection open until the client is done

    async with RawServer(chunked) as server, client.stream("GET", server.url) as r:
        parts = r.aiter_bytes()
        assert await asyncio.wait_for(parts.__anext__(), 2) == b"hello"  # before the rest exists
        release.set()
        assert b"".join([p async for p in parts]) == b" world"


async def test_large_body_with_backpressure(client: httpx.AsyncClient) -> None:
    payload = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MB: above the pause threshold

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(payload))
        await writer.drain()
        await reader.read()

    async with RawServer(big) as server:
        async with client.stream("GET", server.url) as r:
            received = bytearray()
            async for part in r.aiter_bytes():
                received += part
                await asyncio.sleep(0)  # a slow reader: the transport has to pause and resume reading
        assert bytes(received) == payload


async def test_body_until_close_and_informational_responses(client: httpx.AsyncClient) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length, ends with the connection")
        await writer.drain()

    async with RawServer(until_close) as server:
        r = await client.get(server.url)
        assert r.status_code == 200 and r.content == b"no length, ends with the connection"
        assert "link" not in r.headers  # the 103's headers are not the response's
        r = await client.get(server.url)  # a new connection: the first one was closed
        assert r.status_code == 200 and server.connections == 2


async def test_close_mid_body_is_a_remote_protocol_error_and_not_reused(client: httpx.AsyncClient) -> None:
    calls = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        await read_request(reader)
        calls += 1
        if calls == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await writer.drain()
            return  # closes
        writer.write(ok(b"fine"))
        await writer.drain()

    async with RawServer(flaky) as server:
        with pytest.raises(httpx.RemoteProtocolError) as info:
            await client.get(server.url)
        assert info.value.request.url == server.url  # the request is attached, as httpx does
        r = await client.get(server.url)
        assert r.content == b"fine" and server.connections == 2


async def test_close_without_response_and_malformed_response(client: httpx.AsyncClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(silent) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get(server.url)
    async with RawServer(garbage) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await client.get(server.url)


async def test_connect_refused() -> None:
    port = free_port()  # nothing listens there
    async with httpx.AsyncClient(transport=FastTransport()) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/")


async def test_read_timeout_waiting_for_the_head_and_for_the_body(client: httpx.AsyncClient) -> None:
    client_left = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        await read_request(reader)
        writer.write(head)
        await writer.drain()
        try:
            await reader.read()  # never answers more; returns (or raises) when the client drops the connection
        finally:
            client_left.set()

    for head in (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"):
        client_left.clear()
        async with RawServer(functools.partial(stall, head=head)) as server:
            began = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):  # only the read timeout raises this (the others are 5 s)
                await client.get(server.url, timeout=httpx.Timeout(5.0, read=0.2))
            assert time.monotonic() - began >= 0.2 * 0.9  # not before the timeout (timers may fire a bit early)
            # The client, not the server, gave up: it dropped the connection the server was still holding.
            await asyncio.wait_for(client_left.wait(), 10)
            assert server.connections == 1


async def test_pool_limit_and_pool_timeout() -> None:
    active = 0
    peak = 0
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, peak
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            active += 1
            peak = max(peak, active)
            await gate.wait()
            active -= 1
            writer.write(ok(b"done"))
            await writer.drain()

    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with RawServer(slow) as server, httpx.AsyncClient(transport=FastTransport(limits)) as c:
        tasks = [asyncio.create_task(c.get(server.url, timeout=5.0)) for _ in range(6)]

        async def two_busy() -> None:  # two connections busy; the four other requests wait for one
            while active < 2:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(two_busy(), 10)
        with pytest.raises(httpx.PoolTimeout):
            await c.get(server.url, timeout=httpx.Timeout(5.0, pool=0.1))
        gate.set()
        results = await asyncio.gather(*tasks)
        assert [r.content for r in results] == [b"done"] * 6
        assert peak == 2 and server.connections == 2


async def test_cancelled_request_frees_its_connection() -> None:
    async def hang_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if b"/hang" in line:
            await reader.read()
            return
        writer.write(ok(b"ok"))
        await writer.drain()
        await reader.read()

    transport = FastTransport(httpx.Limits(max_connections=1))
    async with RawServer(hang_then_answer) as server, httpx.AsyncClient(transport=transport) as c:
        task = asyncio.create_task(c.get(server.url + "/hang"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The only connection slot came back: the next request gets a fresh connection at once.
        r = await c.get(server.url + "/", timeout=httpx.Timeout(2.0, pool=0.5))
        assert r.content == b"ok" and server.connections == 2


async def test_idle_connections_expire_and_server_side_closes_are_noticed() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"x"))  # keep-alive response, then the server drops the connection anyway
        await writer.drain()

    transport = FastTransport(httpx.Limits(keepalive_expiry=0.2))
    async with RawServer(once) as server, httpx.AsyncClient(transport=transport) as c:
        assert (await c.get(server.url)).content == b"x"
        await asyncio.sleep(0.05)  # the server's FIN is processed: the pooled connection is known dead
        assert (await c.get(server.url)).content == b"x"
        assert server.connections == 2
    async with (
        RawServer(echo_forever) as server,
        httpx.AsyncClient(transport=FastTransport(httpx.Limits(keepalive_expiry=0.1))) as c,
    ):
        await c.get(server.url)
        await asyncio.sleep(0.25)
        await c.get(server.url)
        assert server.connections == 2  # the idle one had expired


async def test_header_injection_is_refused(client: httpx.AsyncClient) -> None:
    async with RawServer(echo_forever) as server:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(server.url, headers={"x-evil": "a\r\nInjected: 1"})
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(server.url, headers={"bad name": "x"})
        assert (await client.get(server.url)).status_code == 200


async def test_aclose_closes_idle_connections() -> None:
    closed = asyncio.Event()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"x"))
        await writer.drain()
        await reader.read()  # returns at EOF: the client closed the connection
        closed.set()

    async with RawServer(watch) as server:
        transport = FastTransport()
        c = httpx.AsyncClient(transport=transport)
        await c.get(server.url)
        await c.aclose()
        await asyncio.wait_for(closed.wait(), 2)
        with pytest.raises(RuntimeError):
            await transport.handle_async_request(httpx.Request("GET", server.url))


# -- through backends.http: timing and error mapping ----------------------------------------------------


def spec(read: float = 5.0) -> BackendSpec:
    return BackendSpec(name="up", type="openai", settings=None, timeouts=Timeouts(connect=1, read=read, total=10))


async def test_make_client_uses_it_and_wire_time_reaches_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await asyncio.sleep(0.1)
            writer.write(ok(b"{}"))
            await writer.drain()

    monkeypatch.delenv("IMAGEGATE_HTTP_TRANSPORT", raising=False)
    async with RawServer(slow_answer) as server:
        client = make_client(spec())
        async with client:
            assert isinstance(client._transport, FastTransport)
            for _ in range(2):  # a new connection, then a reused one
                clock = StageClock()
                began = time.perf_counter()
                r = await send(client, client.build_request("GET", server.url), clock, backend="up")
                elapsed = time.perf_counter() - began
                assert r.status_code == 200 and r.content == b"{}"
                assert 0.1 <= clock.backend_s <= elapsed  # waiting on the server is backend time
        assert server.connections == 1
    monkeypatch.setenv("IMAGEGATE_HTTP_TRANSPORT", "httpcore")
    async with make_client(spec()) as other:
        assert not isinstance(other._transport, FastTransport)


async def test_backends_http_maps_transport_errors() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")
        await writer.drain()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with make_client(spec(read=0.2)) as client:
        with pytest.raises(BackendUnavailable):
            await send(
                client, client.build_request("GET", f"http://127.0.0.1:{free_port()}/"), StageClock(), backend="up"
            )
        async with RawServer(cut) as server:
            with pytest.raises(BackendProtocolError):
                await send(client, client.build_request("GET", server.url), StageClock(), backend="up")
        async with RawServer(stall) as server:
            clock = StageClock()
            with pytest.raises(BackendTimeout):
                await send(client, client.build_request("GET", server.url), clock, backend="up")
            assert clock.backend_s >= 0.2


async def test_no_cookies_carried_between_requests() -> None:
    async def cookie_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, headers, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(ok(headers.get(b"cookie", b"none"), b"Set-Cookie: session=abc\r\n"))
            await writer.drain()

    async with RawServer(cookie_server) as server, make_client(spec()) as client:
        for _ in range(2):
            r = await send(client, client.build_request("GET", server.url), StageClock(), backend="up")
            assert r.content == b"none"


def test_no_listener_port_is_really_free() -> None:
    # Guard for test_connect_refused: free_port() must hand out a port nobody listens on.
    port = free_port()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
