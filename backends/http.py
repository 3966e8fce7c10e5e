"""Shared HTTP plumbing for remote backends.

* ``make_client``: one pooled ``httpx.AsyncClient`` per backend, timeouts and pool size from config.
* ``send``: send a request, read the body, record *wire time* on the attempt's ``StageClock`` and map
  transport failures into the error vocabulary.
* ``raise_for_status``: map an upstream HTTP status (and Retry-After) into the error vocabulary.
* ``OutputFetcher`` and ``fetch_output``: fetch an output image from a URL or ``data:`` URI, only from allowed
  hosts, size-capped, through a client that holds no credential (see ``OutputFetcher``).
* ``passable_link``: whether an upstream's output URL may be handed to our client as it is.
* ``credentials``: the secret values in a backend's settings, for ``scrub``.

Credentials and output hosts, by construction: the remote backends' API clients hold no credential
(``backends.remote.RemoteBackend.send`` adds it to each API request), and ``fetch_output`` only accepts an
``OutputFetcher``, whose own client is built without default headers, cookies, redirects or environment
credentials (netrc, proxies) and is never handed to anything else. An output host (a blob store, a CDN, any
allow-listed host) therefore cannot receive a credential, whatever an API client or request carries.

Why wire time from httpcore's trace events rather than timing ``await client.send()``: the client
library's own CPU work (building the request, parsing the response) happens inside that await, and is
gateway overhead, not backend time. We count from the first byte of the request written (or the TCP
connect, when a new connection is needed) to the last byte of the response read.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import http.cookiejar
import ipaddress
import os
import socket
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from backends.base import BackendSpec, StageClock
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendOverloaded,
    BackendProtocolError,
    BackendQueueFull,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    OutputFetchError,
    OutputNotAllowed,
    scrub,
)
from backends.fast_transport import FastTransport

_START_EVENTS = frozenset(
    {"connection.connect_tcp.started", "http11.send_request_headers.started", "http2.send_request_headers.started"}
)
_END_EVENTS = frozenset(
    {
        "http11.receive_response_body.complete",
        "http2.receive_response_body.complete",
        "http11.receive_response_body.failed",
        "http2.receive_response_body.failed",
    }
)


def make_client(
    spec: BackendSpec,
    base_url: str = "",
    headers: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A backend's pooled API client (and, without headers, the inside of its ``OutputFetcher``). Keep-alive
    connections are sized to ``max_concurrency`` so a burst never waits for the pool before the router's own
    concurrency limit kicks in. The transport is ``backends.fast_transport.FastTransport`` (set
    ``IMAGEGATE_HTTP_TRANSPORT=httpcore`` for httpx's own)."""
    t = spec.timeouts
    limits = httpx.Limits(
        max_connections=spec.max_concurrency,
        max_keepalive_connections=spec.max_concurrency,
        # Below uvicorn's and cog's 5 s idle timeout: a POST on a connection the server is closing cannot be
        # resent safely (it may have started a billed generation), so we close idle connections first.
        keepalive_expiry=4.0,
    )
    fast = None
    # FastTransport.supported(): the httpx internals it relies on were checked once at first use; if they
    # differ (a newer httpx), httpx builds its own transport and one warning line says so.
    if (
        transport is None
        and os.environ.get("IMAGEGATE_HTTP_TRANSPORT", "fast") != "httpcore"
        and FastTransport.supported()
    ):
        transport = fast = FastTransport(limits, trust_env=False)
    client = httpx.AsyncClient(
        base_url=base_url,
        headers=dict(headers or {}),
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.connect),
        limits=limits,
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        # One client serves every caller of a backend: never carry cookies from one request to the next.
        cookies=_NoCookies(),
    )
    if fast is not None:
        _FAST[client] = fast
    return client


class _NoCookies(http.cookiejar.CookieJar):
    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


# Clients whose transport ``send`` may call directly (see there).
_FAST: weakref.WeakKeyDictionary[httpx.AsyncClient, FastTransport] = weakref.WeakKeyDictionary()


class _WireTimer:
    """httpcore ``trace`` callback: remembers the first start event and the last body event."""

    __slots__ = ("end", "start")

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0

    async def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        if name in _START_EVENTS:
            if not self.start:
                self.start = time.perf_counter()
        elif name in _END_EVENTS:
            # The fast transport passes the instant the last byte was parsed; httpcore does not.
            self.end = info.get("at") or time.perf_counter()

    def seconds(self) -> float:
        if not self.start:
            return 0.0
        return (self.end or time.perf_counter()) - self.start


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    clock: StageClock,
    *,
    backend: str,
    secrets: tuple[str, ...] = (),
) -> httpx.Response:
    """Send ``request`` and read the whole body. Transport failures become vocabulary errors; HTTP error
    statuses are returned as-is (see ``raise_for_status``)."""
    timer = _WireTimer()
    request.extensions["trace"] = timer
    response: httpx.Response | None = None
    try:
        transport = _FAST.get(client)
        if transport is not None and not client.is_closed:
            # Straight to our own transport: the client's send() would only add auth and redirect
            # machinery we do not use, cookie handling we do not want, and a stream wrapper (~25 µs).
            response = await transport.handle_async_request(request)
            response.request = request
        else:
            response = await client.send(request, stream=True)
        await response.aread()
        return response
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise BackendUnavailable(
            f"{backend}: cannot connect: {scrub(str(exc) or type(exc).__name__, secrets)}"
        ) from exc
    except httpx.PoolTimeout as exc:
        # Our own pool is exhausted: this backend's queue is full here, so the request moves on now.
        raise BackendQueueFull(f"{backend}: no free connection in the pool") from exc
    except httpx.TimeoutException as exc:
        raise BackendTimeout(f"{backend}: {type(exc).__name__} after {timer.seconds():.1f}s") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise BackendProtocolError(
            f"{backend}: connection broke: {scrub(str(exc) or type(exc).__name__, secrets)}"
        ) from exc
    finally:
        clock.add_wait(timer.seconds())
        if response is not None:
            await response.aclose()


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP-date). None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(response: httpx.Response, secrets: tuple[str, ...] = ()) -> str:
    """A short, scrubbed description of an upstream error body (JSON ``error``/``detail`` or text)."""
    text = response.text
    try:
        body = response.json()
    except ValueError:
        return scrub(text, secrets) or response.reason_phrase
    if isinstance(body, Mapping):
        for key in ("error", "detail", "message", "title"):
            if key in body:
                inner = body[key]
                if isinstance(inner, Mapping) and "message" in inner:
                    inner = inner["message"]
                return scrub(inner if isinstance(inner, str) else str(inner), secrets)
    return scrub(text, secrets)


def raise_for_status(response: httpx.Response, *, backend: str, secrets: tuple[str, ...] = ()) -> None:
    """Map an HTTP error status into the vocabulary; return quietly on 2xx/3xx."""
    status = response.status_code
    if status < 400:
        return
    detail = f"{backend}: HTTP {status}: {error_detail(response, secrets)}"
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    if status == 429:
        raise BackendOverloaded(detail, retry_after=retry_after)
    if status == 503:
        raise BackendOverloaded(detail, retry_after=retry_after)
    if status == 504:
        raise BackendTimeout(detail)
    if status >= 500:
        raise BackendFailed(detail)
    if status in (401, 403, 404, 405):
        # Our credentials or configuration are wrong for this backend; another backend may be fine.
        raise BackendFailed(detail)
    if status == 408:
        raise BackendTimeout(detail)
    raise BackendRejected(detail)


def json_body(response: httpx.Response, *, backend: str) -> Any:
    """Parse a JSON body or raise ``BackendProtocolError``."""
    try:
        return response.json()
    except ValueError:
        raise BackendProtocolError(f"{backend}: response is not valid JSON") from None


def host_allowed(url: str, allowed_hosts: tuple[str, ...]) -> bool:
    """``allowed_hosts`` entries are host names, ``host:port``, or ``*.suffix`` wildcards."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    for pattern in allowed_hosts:
        pattern = pattern.lower()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif pattern in (host, with_port):
            return True
    return False


def _non_public_address(host: str) -> bool:
    """Whether ``host`` is an IP literal that is not a public unicast address (loopback, private,
    link-local such as the 169.254.169.254 metadata service, unspecified, multicast, reserved...).
    Legacy IPv4 spellings that clients still resolve (``2130706433``, ``0x7f.1``, ``127.1``) count."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False  # a name: its owner is named in allowed_output_hosts and trusted with it
    return not address.is_global or address.is_multicast


def passable_link(url: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether an output URL from an upstream may be handed to our client as it is (``response_format:
    url``): http(s), no userinfo, a host in ``allowed_hosts``, and not a non-public IP literal. A link to a
    private, loopback or link-local address is never passed on, even from an allow-listed host: the client
    cannot reach it (or reaches something of its own), and it tells the client about our network. Such a
    URL is fetched and re-hosted instead; anything that is not allow-listed is refused."""
    parts = urlsplit(url)
    return (
        host_allowed(url, allowed_hosts) and "@" not in parts.netloc and not _non_public_address(parts.hostname or "")
    )


_MIN_HEADER_SECRET = 6


def credentials(
    *values: str | None, headers: Mapping[str, str] | None = None, urls: Iterable[str] = ()
) -> tuple[str, ...]:
    """The secret values of a backend's settings, for ``scrub``: the given credentials, every header value
    (a header configured on a backend is there to authenticate, whatever its name) and the userinfo of
    every URL. Longest first, so a secret that contains another is replaced whole."""
    found = [v for v in values if v]
    # Not the short ones ("1", "on"): scrubbing them would mangle every message, and they are no credential.
    found += [v for v in (headers or {}).values() if len(v) >= _MIN_HEADER_SECRET]
    for url in urls:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            userinfo = parts.netloc.rpartition("@")[0]
            found += [userinfo, *(p for p in (parts.password,) if p)]
    return tuple(sorted(set(found), key=len, reverse=True))


_CONTENT_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp"}


def sniff_format(data: bytes, content_type: str | None = None) -> str:
    """Image format from magic bytes (falling back to the content type)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if content_type:
        return _CONTENT_TYPES.get(content_type.split(";")[0].strip().lower(), "png")
    return "png"


class OutputFetcher:
    """The only client output images are fetched with (``fetch_output`` accepts nothing else).

    Its pooled client is built here, with no default headers, a cookie jar that keeps nothing, no
    redirects and no environment credentials, and it is never handed out: no API credential can reach an
    output host through it, however the backend's API client is set up. One per backend, started and
    closed with it, so each backend's fetches have their own pool (sized like its API pool)."""

    __slots__ = ("_client",)

    def __init__(self, spec: BackendSpec) -> None:
        self._client = make_client(spec)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, url: str, *, timeout: float, trace: _WireTimer) -> httpx.Response:
        """Stream ``GET url`` (the caller reads and closes it). Nothing of ours goes out with it: no cookie,
        no auth, no redirect followed. (httpx would turn a URL's own userinfo into Basic auth: ``fetch_output``
        refuses such URLs before they get here.)"""
        request = self._client.build_request("GET", url, timeout=timeout, extensions={"trace": trace})
        return await self._client.send(request, stream=True, auth=None, follow_redirects=False)


async def fetch_output(
    fetcher: OutputFetcher,
    url: str,
    clock: StageClock,
    *,
    backend: str,
    allowed_hosts: tuple[str, ...],
    max_bytes: int = 50 * 1024 * 1024,
    timeout: float = 30.0,
) -> tuple[bytes, str]:
    """Fetch one output image; returns ``(bytes, format)``.

    ``data:`` URIs are decoded in place. HTTP(S) URLs are fetched only from ``allowed_hosts`` (never an
    arbitrary URL from a response: that would let an upstream make us fetch internal addresses), through
    ``fetcher`` (no credential, no cookie), without following redirects, and abandoned past ``max_bytes``.
    """
    if not isinstance(fetcher, OutputFetcher):  # an API client here would send its credential along
        raise TypeError("fetch_output needs an OutputFetcher, not an API client")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise BackendProtocolError(f"{backend}: unsupported data URI encoding")
        if len(payload) * 3 // 4 > max_bytes:
            raise OutputFetchError(f"{backend}: output larger than {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BackendProtocolError(f"{backend}: malformed base64 in data URI") from None
        return data, sniff_format(data, header[5:].split(";")[0])
    if not host_allowed(url, allowed_hosts):
        host = urlsplit(url).hostname or "?"
        raise OutputNotAllowed(f"{backend}: output URL host {host!r} is not in allowed_output_hosts")
    if "@" in urlsplit(url).netloc:
        raise OutputNotAllowed(f"{backend}: output URL carries credentials (user info)")
    timer = _WireTimer()
    chunks: list[bytes] = []
    size = 0
    response: httpx.Response | None = None
    try:
        response = await fetcher.get(url, timeout=timeout, trace=timer)
        if response.status_code != 200:
            raise OutputFetchError(f"{backend}: output URL answered HTTP {response.status_code}")
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise OutputFetchError(f"{backend}: output larger than {max_bytes} bytes")
            chunks.append(chunk)
        content_type = response.headers.get("content-type")
    except BackendError:
        raise
    except httpx.TimeoutException:
        raise OutputFetchError(f"{backend}: output fetch timed out") from None
    except httpx.HTTPError as exc:
        raise OutputFetchError(f"{backend}: output fetch failed: {type(exc).__name__}") from None
    finally:
        if response is not None:
            await response.aclose()
        clock.add_wait(timer.seconds())
    data = b"".join(chunks)
    return data, sniff_format(data, content_type)
