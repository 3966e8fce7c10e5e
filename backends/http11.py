"""One HTTP/1.1 client connection for ``backends.fast_transport``: an asyncio protocol feeding the httptools
(llhttp) response parser. It only collects what arrives — status, headers, body chunks, completion, errors —
and wakes the request waiting on it; the transport owns pooling, timeouts and the request flow (this module
also serialises the request head, :func:`request_head`, and streams a body, :class:`BodyStream`).

Errors are httpx's own types: ``ReadError`` for a reset, ``RemoteProtocolError`` for a close before the
response was complete or an unparseable response.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast

import httptools
import httpx

_perf = time.perf_counter
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_GOOD_NAMES: set[bytes] = set()  # header names already validated (a small, fixed vocabulary in practice)
# Reading pauses when this much of a response body is buffered and not yet consumed (streamed downloads).
MAX_BUFFER = 4 * 1024 * 1024


class Connection(asyncio.Protocol):
    """One TCP connection; receives at most one response at a time (no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.requests = 0  # requests sent on this connection so far
        self.rx_at = 0.0  # when the latest data_received began
        self.counted = False  # counted in the transport's open connections
        self.in_use = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[bool] | None = None
        self.write_paused = False
        self.reading_paused = False
        self._reset()

    def _reset(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_length = False
        self.encoded = False
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.complete_at = 0.0
        self.informational = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.keep_alive = False
        self.error: httpx.RequestError | None = None

    # -- asyncio protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's: a full Transport

    def data_received(self, data: bytes) -> None:
        self.rx_at = _perf()
        if not self.in_use or self.complete:
            # Bytes nobody asked for (after a complete response, or on an idle connection): unusable.
            self.abort()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("unexpected protocol upgrade in response"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))
        else:
            if self.waiter is not None:
                self._wake(True)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_use and not self.complete and self.error is None:
            if self.headers_done and exc is None and self._until_close():
                # No Content-Length, not chunked: the body ends with the connection (HTTP/1.1 §6.3 rule 8).
                self.complete = True
                self.complete_at = _perf()
                self.keep_alive = False
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            elif not self.received:
                self.error = httpx.RemoteProtocolError("Server disconnected without sending a response.")
            else:
                self.error = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        if self.waiter is not None:
            self._wake(True)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.waiter is not None:
            self._wake(True)

    # -- httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.has_length = False
        self.encoded = False

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self.has_length = True
        elif len(name) == 16 and name.lower() == b"content-encoding":
            self.encoded = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.informational = True  # 1xx (e.g. 103 Early Hints): skip it, the real response follows
            return
        self.status = status
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > MAX_BUFFER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        # The last byte arrived when this data_received began; parsing it is our work, not the backend's.
        self.complete_at = self.rx_at
        self.keep_alive = self.parser.should_keep_alive()

    # -- helpers -------------------------------------------------------------------------------------

    def _until_close(self) -> bool:
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def _fail(self, error: httpx.RequestError) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        if self.waiter is not None:
            self._wake(True)

    def _wake(self, value: bool) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def wait(self, timeout: float | None) -> bool:
        """Wait for something to happen on the connection; False when ``timeout`` passed first."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self.waiter = waiter
        handle = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            self.waiter = None
            if handle is not None:
                handle.cancel()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def take_body(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


class BodyStream(httpx.AsyncByteStream):
    """A response body as it arrives on ``conn``; hands the connection back to ``owner`` (the pool:
    ``_release`` once fully read, ``_discard`` on any failure or an early close)."""

    __slots__ = ("_conn", "_owner", "_request", "_timeout", "_trace")

    def __init__(self, owner: Any, conn: Connection, trace: Any, timeout: float | None, request: httpx.Request) -> None:
        self._owner = owner
        self._conn: Connection | None = conn
        self._trace = trace
        self._timeout = timeout
        self._request = request

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            if conn.chunks:
                return conn.take_body()
            if conn.complete:
                self._conn = None
                self._owner._release(conn)
                if self._trace is not None:
                    await self._trace(
                        "http11.receive_response_body.complete", {"request": self._request, "at": conn.complete_at}
                    )
                raise StopAsyncIteration
            if conn.error is not None:
                self._conn = None
                self._owner._discard(conn)
                raise attach(conn.error, self._request)
            try:
                woke = await conn.wait(self._timeout)
            except BaseException:
                self._conn = None
                self._owner._discard(conn)
                raise
            if not woke:
                self._conn = None
                self._owner._discard(conn)
                raise httpx.ReadTimeout(
                    f"no data for {self._timeout}s while reading the response body", request=self._request
                )

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # closed before the end: the rest of the body is still on its way, drop it
            self._owner._discard(conn)


def attach(exc: httpx.RequestError, request: httpx.Request) -> httpx.RequestError:
    """Set ``exc.request`` (as httpx's own client does) so error handlers can read it."""
    try:
        exc.request  # noqa: B018 - raises when unset
    except RuntimeError:
        exc.request = request
    return exc


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def request_head(request: httpx.Request) -> bytes:
    """Request line and headers. Refuses header names that are not tokens and CR/LF/NUL in values
    (header injection), as h11 does."""
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        if name not in _GOOD_NAMES:
            if not _TOKEN.match(name):
                raise httpx.LocalProtocolError(f"illegal header name {name!r}")
            if len(_GOOD_NAMES) < 1024:
                _GOOD_NAMES.add(name)
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Every line break must be one of ours: one per header plus the request line and the blank line.
    lines = len(parts) // 4 + 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        raise httpx.LocalProtocolError("illegal character in request line or header value")
    return head
