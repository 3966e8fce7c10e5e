"""A lean HTTP/1.1 transport for httpx: an asyncio protocol, the httptools (llhttp) parser, a keep-alive pool.

Why not httpcore: profiling the gateway's hot path showed about half of its CPU per proxied request inside
httpcore and anyio — a per-request scan of every pooled connection (``has_expired`` → ``is_socket_readable``
through anyio's typed-attribute lookups), cancel scopes around every socket operation, h11's pure-Python
event machinery — and that cost grows with the number of pooled connections. Here a request costs one
``write``, the parser's C callbacks as data arrives, and an O(1) pool hand-over. httpx stays the client API:
this is an ``httpx.AsyncBaseTransport``; errors are httpx's own exception types (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``PoolTimeout``, ``ReadError``, ``WriteError``,
``RemoteProtocolError``, ``LocalProtocolError``), so callers map them exactly as before.

Scope: HTTP/1.1 over plain TCP (``http://``). Anything else — ``https://``, ``HEAD`` — goes to a regular
``httpx.AsyncHTTPTransport`` created on first use, so the transport is a drop-in replacement.

Timing: httpcore-style ``trace`` events, so ``backends.http`` measures wire time the same way with either
transport: ``connection.connect_tcp.started`` before connecting a new connection, or, on a reused one,
``http11.send_request_headers.started`` once the request has been handed to the kernel; then
``http11.receive_response_body.complete`` with ``at``: when the ``data_received`` call that delivered the
last byte began — not when the awaiting coroutine resumes. The gateway's own work around the wire (the send
call, parsing, a finished response waiting for the busy event loop) thus counts as gateway time.

Stale keep-alive connections: a request that dies on a *reused* connection before a single response byte
arrived is resent once on a fresh connection when that is safe (see ``_resendable`` for the rule).

httpx internals (a preset private ``_content``; ``backends.http`` bypassing ``AsyncClient.send``) are checked
once per process (``backends.fast_transport_check``): :meth:`FastTransport.supported` and
:func:`make_transport` fall back to httpx's own transport, with one warning line, when they differ.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, cast

import httpx

from backends.fast_transport_check import fast_path_ok

try:
    from backends.http11 import BodyStream as _Body
    from backends.http11 import Connection as _Conn
    from backends.http11 import attach as _attach
    from backends.http11 import request_head as _head
except ImportError:  # pragma: no cover - httptools missing: fast_path_ok() says so, callers fall back
    pass

_perf = time.perf_counter

# RFC 9110 §9.2.2: methods whose intended effect of several identical requests is that of one.
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# A connection that closed or reset before answering; timeouts are not among them (the server may be working).
_BROKEN = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class FastTransport(httpx.AsyncBaseTransport):
    """Drop-in ``httpx.AsyncBaseTransport`` for HTTP/1.1 over TCP with a keep-alive pool (see module doc).

    ``limits`` as for ``httpx.AsyncHTTPTransport``: ``max_connections`` open connections in total (a request
    waits up to the ``pool`` timeout for one), ``max_keepalive_connections`` idle ones kept, each for at most
    ``keepalive_expiry`` seconds.
    """

    def __init__(self, limits: httpx.Limits | None = None, *, verify: Any = True, trust_env: bool = True) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
        self._max_conns = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = float("inf") if limits.keepalive_expiry is None else limits.keepalive_expiry
        self._limits = limits
        self._verify = verify
        self._trust_env = trust_env
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._idle_count = 0
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._fallback: httpx.AsyncHTTPTransport | None = None

    @staticmethod
    def supported() -> bool:
        """True when this process's httpx and httptools work the way this transport relies on
        (:func:`check_internals`, run once). False otherwise, after one warning line: use httpx's own
        ``AsyncHTTPTransport`` then (see :func:`make_transport`)."""
        return fast_path_ok()

    # -- the request ---------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http" or request.method == "HEAD":
            return await self._other(request)
        if self._closed:
            raise RuntimeError("the transport is closed")
        ext = request.extensions
        timeouts = ext.get("timeout") or {}
        trace = ext.get("trace")
        head = _head(request)
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        key = (url.host, url.port or 80)
        read_timeout = timeouts.get("read")

        fresh = False  # True for the one resend, which never takes a pooled connection
        while True:
            conn = await self._acquire(key, timeouts, trace, request, fresh)
            reused = conn.requests > 0
            conn.requests += 1
            unsent = False
            try:
                conn._reset()
                conn.in_use = True
                transport = conn.transport
                assert transport is not None
                if body is None:
                    transport.write(head)
                    if trace is not None and reused:
                        await trace("http11.send_request_headers.started", {"request": request})
                    await self._send_stream(conn, request, timeouts.get("write"))
                else:
                    if len(body) < 65536:
                        transport.write(head + body if body else head)
                    else:
                        transport.writelines((head, body))
                    if transport.is_closing():
                        # The send itself failed (the peer had reset the connection before we wrote):
                        # asyncio closes the transport synchronously and not a byte left.
                        unsent = True
                        raise httpx.WriteError("connection closed by the server before the request was sent")
                    # Wire time starts once the request is handed to the kernel: the send itself is our CPU.
                    if trace is not None and reused:
                        await trace("http11.send_request_headers.started", {"request": request})
                if conn.write_paused:
                    await self._drain(conn, timeouts.get("write"))
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    if conn.closed and not conn.complete:
                        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
                    if not await conn.wait(read_timeout):
                        raise httpx.ReadTimeout(f"no response within {read_timeout}s")
            except BaseException as exc:
                self._discard(conn)
                if isinstance(exc, httpx.RequestError):
                    if not fresh and reused and _resendable(request, body, conn, exc, unsent):
                        fresh = True
                        continue
                    _attach(exc, request)
                raise
            break
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": conn.reason}
        if conn.complete and conn.has_length:
            # The whole response came with its head (the usual case for API answers): hand it over read,
            # so nobody iterates a stream for it, and give the connection back right away.
            body = conn.take_body() if conn.chunks else b""
            self._release(conn)
            if trace is not None:
                await trace("http11.receive_response_body.complete", {"request": request, "at": conn.complete_at})
            response = httpx.Response(
                conn.status, headers=conn.headers, stream=httpx.ByteStream(body), extensions=extensions
            )
            if not conn.encoded:
                # What Response.read() would store, minus three generator layers and an identity decoder.
                # (A private attribute: check_internals() verifies it still works this way.)
                response._content = body
            return response
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, trace, read_timeout, request),
            extensions=extensions,
        )

    async def _send_stream(self, conn: _Conn, request: httpx.Request, timeout: float | None) -> None:
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        assert conn.transport is not None
        # An AsyncClient's request: its stream is an async one.
        async for chunk in cast(httpx.AsyncByteStream, request.stream):
            if not chunk:
                continue
            if conn.closed:
                raise httpx.WriteError("connection closed while sending the request body")
            if chunked:
                conn.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                conn.transport.write(chunk)
            if conn.write_paused:
                await self._drain(conn, timeout)
        if chunked:
            conn.transport.write(b"0\r\n\r\n")

    async def _drain(self, conn: _Conn, timeout: float | None) -> None:
        while conn.write_paused:
            if conn.closed:
                raise conn.error or httpx.WriteError("connection closed while sending the request")
            if conn.headers_done:
                return  # the server answered early (e.g. 413): stop pushing, read the answer
            if not await conn.wait(timeout):
                raise httpx.WriteTimeout(f"could not send the request within {timeout}s")

    async def _other(self, request: httpx.Request) -> httpx.Response:
        if self._fallback is None:
            self._fallback = httpx.AsyncHTTPTransport(
                limits=self._limits, verify=self._verify, trust_env=self._trust_env
            )
        return await self._fallback.handle_async_request(request)

    # -- the pool ------------------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used first: the others age out
            self._idle_count -= 1
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                self._gone(conn)
                continue
            if _perf() - conn.idle_since > self._expiry:
                conn.abort()
                self._gone(conn)
                continue
            return conn
        return None

    async def _acquire(
        self, key: tuple[str, int], timeouts: dict[str, Any], trace: Any, request: httpx.Request, fresh: bool = False
    ) -> _Conn:
        """An idle keep-alive connection to ``key`` (unless ``fresh``), else a new one (waiting for room up to
        the pool timeout). For a new one, emits the wire-start trace event: waiting for the connect is waiting
        on the network."""
        deadline = None
        while True:
            conn = None if fresh else self._take_idle(key)
            if conn is not None:
                return conn  # the wire-start event follows the write (see handle_async_request)
            if self._max_conns is None or self._open < self._max_conns:
                # The slot is ours from here: every way out but a connection must give it back (_connect
                # does for its own failures; a trace callback may raise or be cancelled too).
                self._open += 1
                if trace is not None:
                    try:
                        await trace("connection.connect_tcp.started", {"request": request})
                    except BaseException:
                        self._gone(None)
                        raise
                return await self._connect(key, timeouts.get("connect"))
            if self._idle_count and self._evict_one():
                continue
            loop = asyncio.get_running_loop()
            if deadline is None:
                timeout = timeouts.get("pool")
                deadline = None if timeout is None else loop.time() + timeout
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._notify()  # woken, but leaving anyway: pass the wake-up on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no connection free within the pool timeout") from None
                raise

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Conn(loop, key), key[0], key[1])
        except TimeoutError:
            self._gone(None)
            raise httpx.ConnectTimeout(f"could not connect to {key[0]}:{key[1]} within {timeout}s") from None
        except OSError as exc:
            self._gone(None)
            raise httpx.ConnectError(f"{key[0]}:{key[1]}: {exc.strerror or exc}") from None
        except BaseException:
            self._gone(None)
            raise
        conn.counted = True
        return conn

    def _evict_one(self) -> bool:
        for idle in self._idle.values():
            if idle:
                conn = idle.pop(0)
                self._idle_count -= 1
                conn.abort()
                self._gone(conn)
                return True
        return False

    def _release(self, conn: _Conn) -> None:
        conn.in_use = False
        if (
            not conn.keep_alive
            or conn.closed
            or self._closed
            or conn.chunks
            or (self._max_idle is not None and self._idle_count >= self._max_idle)
        ):
            conn.abort()
            self._gone(conn)
            return
        conn.idle_since = _perf()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
        self._notify()

    def _discard(self, conn: _Conn) -> None:
        conn.in_use = False
        conn.abort()
        self._gone(conn)

    def _gone(self, conn: _Conn | None) -> None:
        """A connection (or, for None, a reserved slot whose connect failed) no longer counts as open."""
        if conn is not None:
            if not conn.counted:
                return
            conn.counted = False
        self._open -= 1
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
                self._gone(conn)
            idle.clear()
        self._idle_count = 0
        if self._fallback is not None:
            await self._fallback.aclose()


def _resendable(request: httpx.Request, body: bytes | None, conn: _Conn, exc: BaseException, unsent: bool) -> bool:
    """May a request that failed on a *reused* keep-alive connection be sent again on a fresh one?

    The race this is for: a server closes a connection that has been idle for its keep-alive timeout
    (uvicorn's default: 5 s; our pool keeps them longer) just as our next request goes out on it.

    How others decide. httpcore never resends (it only drops pooled connections whose socket turned
    readable). urllib3 resends after a connection broke only for idempotent methods (a "read error": "assume
    that the server began processing it"). aiohttp resends once, idempotent methods only, citing RFC 9112
    §9.3.1. Go's net/http resends idempotent requests (or ones with an ``Idempotency-Key`` or
    ``X-Idempotency-Key`` header) when the server closed before the first response byte, and any request it
    knows it never wrote. RFC 9112 §9.3.1: a client MUST NOT automatically retry a non-idempotent request
    unless it knows that the semantics are idempotent or that the original request was never applied.

    The conservative rule, then, all of:

    * the body is buffered bytes (a streamed body cannot be replayed) and the failure is the connection
      closing or resetting (not a timeout: the server may be working on it);
    * not one byte of a response arrived (the server had not started answering);
    * and either nothing was written (the send itself failed: never applied), or the method is idempotent,
      or the request carries an ``Idempotency-Key`` / ``X-Idempotency-Key`` (the caller vouches for it).

    So a POST that met a stale connection *after* it was written is not resent here, even though for
    uvicorn's idle close it never reached the application: from the client side that cannot be told apart
    from a server that read the request and died working on it, and resending would run (and bill) the
    generation twice. It fails as before, and the gateway's dispatcher decides (fall through to the next
    candidate). The caller (``handle_async_request``) adds the last conditions: the connection was reused
    (on a fresh connection the server really failed) and only one resend, on a fresh connection.
    """
    if body is None or not isinstance(exc, _BROKEN) or conn.received:
        return False
    headers = request.headers
    return unsent or request.method in _IDEMPOTENT or "idempotency-key" in headers or "x-idempotency-key" in headers


def make_transport(limits: httpx.Limits, *, trust_env: bool = True) -> httpx.AsyncBaseTransport:
    """A ``FastTransport`` when :func:`check_internals` passes, else httpx's own ``AsyncHTTPTransport`` with
    the same limits (and one warning line per process)."""
    if fast_path_ok():
        return FastTransport(limits, trust_env=trust_env)
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=trust_env)
