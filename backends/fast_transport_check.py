"""Does this process's httpx (and httptools) still work the way ``backends.fast_transport`` relies on?

The fast transport builds ``httpx.Response`` objects itself and presets their private ``_content``;
``backends.http.send`` bypasses ``AsyncClient.send`` for it. httpx is pinned below 0.29, but a pin can be
overridden (or an older release installed), so :func:`check_internals` exercises each of those internals
once per process, exactly the way they are used, and says what differs. ``FastTransport.supported()`` and
``make_transport()`` then fall back to httpx's own ``AsyncHTTPTransport`` with one warning line.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import structlog

try:
    from backends.http11 import Connection, request_head
except ImportError as _missing:  # httptools not installed
    _IMPORT_ERROR: str | None = f"{type(_missing).__name__}: {_missing}"
else:
    _IMPORT_ERROR = None


class _Differs(Exception):
    """An internal does not behave as relied upon."""


def _expect(ok: bool, what: str) -> None:
    if not ok:  # not ``assert``: the check must also run under ``python -O``
        raise _Differs(what)


class _Unread(httpx.AsyncByteStream):
    """A response stream that must not be iterated (its body was preset)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise _Differs("the preset body was ignored: the stream was read")
        yield b""  # pragma: no cover - makes this an async generator


class _NoTransport(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:  # pragma: no cover
        raise _Differs("only building requests")


def _run(coro: Any) -> Any:
    """Run a coroutine that must finish without suspending (no event loop needed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise _Differs(f"{coro.__qualname__} suspended: it would have done I/O")


@functools.cache
def check_internals() -> str | None:
    """Why this process's httpx/httptools cannot be driven the way this module and ``backends.http`` drive
    them, or None when they can. Run once (cached); costs well under a millisecond.

    What is relied upon, and checked here by using it exactly that way:
    the httptools parser behind ``backends.http11.Connection``; ``Request.url.raw_path``, ``headers.raw``
    and ``content`` (raising ``RequestNotRead`` for a streamed body); a ``Response`` built from raw header
    pairs whose private ``_content``, preset, serves ``content``/``aread()`` without reading the stream;
    ``RequestError.request`` raising ``RuntimeError`` until set; ``Response.request`` settable; and, for
    ``backends.http.send``'s shortcut past ``AsyncClient.send``, ``AsyncClient.build_request`` putting the
    client's timeouts into ``request.extensions["timeout"]`` (else that shortcut would send with none).
    """
    if _IMPORT_ERROR is not None:
        return f"backends.http11 cannot be imported ({_IMPORT_ERROR})"
    try:
        conn = Connection(None, ("check", 80))  # type: ignore[arg-type]  # no loop: nobody waits on it
        conn.in_use = True
        conn.data_received(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
        got = (conn.status, conn.reason, conn.headers, conn.complete, conn.keep_alive, b"".join(conn.chunks))
        want = (201, b"Created", [(b"Content-Length", b"2"), (b"X-A", b"b")], True, True, b"ok")
        _expect(got == want, f"httptools parsed {got!r}, expected {want!r}")

        request = httpx.Request("POST", "http://check:1/p?q=1", headers={"X-A": "b"}, content=b"{}")
        _expect(request.url.raw_path == b"/p?q=1", f"url.raw_path is {request.url.raw_path!r}")
        _expect(request.content == b"{}", "Request.content does not return the buffered body")
        head = b"POST /p?q=1 HTTP/1.1\r\nHost: check:1\r\nX-A: b\r\nContent-Length: 2\r\n\r\n"
        _expect(request_head(request) == head, f"headers.raw gave {request.headers.raw!r}")

        async def chunks() -> AsyncIterator[bytes]:  # pragma: no cover - never iterated
            yield b"x"

        try:
            httpx.Request("POST", "http://check:1/", content=chunks()).content  # noqa: B018 - must raise
        except httpx.RequestNotRead:
            pass
        else:
            raise _Differs("Request.content of a streamed body does not raise RequestNotRead")

        response = httpx.Response(
            200,
            headers=[(b"content-length", b"2")],
            stream=_Unread(),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": b"OK"},
        )
        response._content = b"ok"
        response.request = request
        _expect(response.request is request, "Response.request cannot be set")
        _expect(_run(response.aread()) == b"ok" and response.content == b"ok", "a preset _content is not used")
        _expect(
            response.headers["content-length"] == "2" and response.reason_phrase == "OK",
            "Response from raw header pairs and extensions differs",
        )
        _run(response.aclose())

        error = httpx.ReadError("check")
        try:
            error.request  # noqa: B018 - raises until set
        except RuntimeError:
            pass
        else:
            raise _Differs("RequestError.request does not raise RuntimeError while unset")

        timeout = httpx.Timeout(1.0, read=2.0)
        client = httpx.AsyncClient(transport=_NoTransport(), timeout=timeout, trust_env=False)
        built = client.build_request("GET", "http://check/")
        got_timeout = built.extensions.get("timeout")
        _expect(got_timeout == timeout.as_dict(), f"build_request set extensions['timeout'] = {got_timeout!r}")
    except Exception as exc:  # noqa: BLE001 - any difference means: do not use the fast path
        return f"{type(exc).__name__}: {exc}"
    return None


_warned = False


def fast_path_ok() -> bool:
    """:func:`check_internals` as a yes/no; on the first no, one warning line (structlog) with the reason."""
    global _warned
    reason = check_internals()
    if reason is None:
        return True
    if not _warned:
        _warned = True
        # A logger of its own, bound now: once per process, and never one cached before logging was set up.
        structlog.get_logger("imagegate.http").warning(
            "fast_transport.disabled", reason=reason, httpx=httpx.__version__, using="httpx.AsyncHTTPTransport"
        )
    return False
