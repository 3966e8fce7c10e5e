"""How ``imagegate serve`` runs uvicorn: ``uvicorn_settings(config)`` and the protocol class it selects.

``GatewayHttpProtocol`` is uvicorn's httptools protocol with three changes:

1. **One write per response.** uvicorn writes the status line and headers as soon as the app sends
   ``http.response.start`` and the body in a second ``write`` — two ``send`` syscalls, and on loopback or a
   fast LAN two TCP segments each processed in full by the kernel: a fixed cost per response, large next
   to the rest of the gateway's per-request CPU (benchmarks/README.md has the numbers). Here the start
   message is held and written together with the first body chunk. (An app that sends ``start`` and then
   waits before its first body chunk delays its headers until then; the gateway never does that.)
2. **The clock starts when the request arrives**, not when the ASGI app is first scheduled: the parser's
   ``on_message_begin`` stamps ``time.perf_counter()`` into ``scope["extensions"]["imagegate.received_at"]``,
   which the generations handler uses as the start of its overhead measurement — so the
   ``X-Gateway-Overhead-Ms`` header also covers request parsing and task start-up in the server.
3. **Slow clients cannot hold a connection** (uvicorn has no read timeouts at all: a client that sends half
   a head, or a head and 3 bytes of its body, keeps its connection and its task forever). A request's head
   must arrive within ``server.header_timeout_s`` (from the connection, or from its first byte on a kept-alive
   connection) and be at most ``server.max_header_bytes`` (httptools sets no limit; counted per read, so a
   head that arrives whole in one read may pass it by that read); its body must arrive within
   ``server.body_timeout_s`` of the head. These are deadlines, not idle timers, so a byte every few
   seconds does not extend them. A late request gets a 408 (an oversized head a 431) in OpenAI's error shape
   and the connection is closed; a connection that never sent a byte is just closed. A timer is armed only
   when a read is left incomplete by a ``data_received``: a request that arrives in one piece pays nothing.

uvicorn's protocol classes are internal API (pinned ``<0.55`` in pyproject). ``protocol()`` checks at
start-up that what this module relies on is still there (``check_internals``); if not, it logs one warning
line and returns ``"auto"``: stock uvicorn, whose responses then take two writes, whose overhead header
covers a little less, and which has no header/body read timeouts (the handler still bounds its own body read
with ``body_timeout_s``).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.config import Config, ServerConfig

try:
    from uvicorn.protocols.http.httptools_impl import (
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError:  # pragma: no cover - httptools not installed
    # The names stay defined, as None: check_internals reports it and protocol() falls back to stock uvicorn.
    HttpToolsProtocol = RequestResponseCycle = None  # type: ignore[assignment,misc]  # None for a class
if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent  # types only: no import of uvicorn's private module at run time

RECEIVED_AT = "imagegate.received_at"
# Set in ``scope["extensions"]`` when the protocol gave up on a request's body: the app then sees
# ``http.disconnect`` (its answer would go nowhere: the 408 is already written) and logs a timeout.
READ_TIMED_OUT = "imagegate.read_timed_out"

# What ``GatewayHttpProtocol`` and ``CoalescingCycle`` use of uvicorn's classes (checked at start-up).
_PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_message_complete",
)
_PROTOCOL_ATTRS = {
    "__init__": ("config", "app", "loop", "transport", "cycle", "scope", "server_state"),
    "on_message_begin": ("scope",),
    "on_headers_complete": ("cycle", "RequestResponseCycle"),
}
_CYCLE_ATTRS = ("scope", "transport", "response_started", "response_complete", "disconnected", "message_event")


def check_internals() -> str | None:
    """``None`` if uvicorn's httptools protocol still has what this module relies on, else what differs.

    Checked: the two classes import; the protocol's parser callbacks exist with the arguments we pass on;
    its ``__init__`` / ``on_message_begin`` / ``on_headers_complete`` still set the attributes we read
    (``cycle``, ``scope``, ``transport``...) and build a ``RequestResponseCycle``; a cycle, built with
    placeholders, has ``response_started``, ``transport``, ``disconnected``...; its ``send`` is a coroutine
    taking one message and writing through ``self.transport``."""
    if HttpToolsProtocol is None or RequestResponseCycle is None:
        return "uvicorn.protocols.http.httptools_impl has no HttpToolsProtocol / RequestResponseCycle"
    for name in _PROTOCOL_METHODS:
        if not callable(getattr(HttpToolsProtocol, name, None)):
            return f"HttpToolsProtocol.{name} is missing"
    for name, want in (
        ("connection_made", 1),
        ("connection_lost", 1),
        ("data_received", 1),
        ("on_message_begin", 0),
        ("on_headers_complete", 0),
        ("on_message_complete", 0),
    ):
        if len(inspect.signature(getattr(HttpToolsProtocol, name)).parameters) != want + 1:
            return f"HttpToolsProtocol.{name} takes other arguments"
    for method, names in _PROTOCOL_ATTRS.items():
        code = getattr(getattr(HttpToolsProtocol, method), "__code__", None)
        missing = [n for n in names if code is None or n not in code.co_names]
        if missing:
            return f"HttpToolsProtocol.{method} no longer uses {', '.join(missing)}"
    send, receive = getattr(RequestResponseCycle, "send", None), getattr(RequestResponseCycle, "receive", None)
    if not (inspect.iscoroutinefunction(send) and inspect.iscoroutinefunction(receive)):
        return "RequestResponseCycle.send / receive are not coroutines"
    if list(inspect.signature(send).parameters) != ["self", "message"]:
        return "RequestResponseCycle.send takes other arguments"
    if not {"transport", "response_started"} <= set(send.__code__.co_names):
        return "RequestResponseCycle.send no longer writes through self.transport"
    try:
        params = list(inspect.signature(RequestResponseCycle.__init__).parameters)[1:]
        # None for every argument: only to see which attributes __init__ sets.
        cycle = RequestResponseCycle(**dict.fromkeys(params))  # type: ignore[arg-type]  # placeholders
    except Exception as exc:  # noqa: BLE001 - any change that breaks building one is a change
        return f"RequestResponseCycle() cannot be built: {type(exc).__name__}: {exc}"
    missing = [n for n in _CYCLE_ATTRS if not hasattr(cycle, n)]
    if missing:
        return f"RequestResponseCycle has no {', '.join(missing)}"
    return None


class _Capture:
    """Stands in for the transport while uvicorn serialises a response: collects writes, defers close."""

    __slots__ = ("_real", "close_after", "parts")

    def __init__(self, real: Any) -> None:
        self._real = real
        self.parts: list[bytes] = []
        self.close_after = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def writelines(self, lines: Any) -> None:
        self.parts.extend(lines)

    def close(self) -> None:
        self.close_after = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def flush(self) -> None:
        parts = self.parts
        if self._real.is_closing():
            # The client is gone (uvicorn learns it a callback later): drop the answer, as uvicorn does
            # once it knows; writing would raise on uvloop's closed handle.
            return
        if len(parts) == 1:
            self._real.write(parts[0])
        elif sum(map(len, parts)) < 65536:
            self._real.write(b"".join(parts))
        elif parts:
            self._real.writelines(parts)  # one writev; no copy of a large body just to prepend the head
        if self.close_after:
            self._real.close()


def _refusal(status: int, reason: bytes, code: str, message: str, default_headers: Any) -> bytes:
    """A complete ``connection: close`` response in OpenAI's error shape, written by the protocol itself."""
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


def _server_config(app: Any) -> ServerConfig:
    """The ``server:`` section of the gateway behind ``app`` (through uvicorn's middleware wrappers, which
    keep the wrapped app in ``.app``); defaults for any other app."""
    for _ in range(8):
        config = getattr(app, "config", None)
        if isinstance(config, Config):
            return config.server
        app = getattr(app, "app", None)
        if app is None:
            break
    return ServerConfig()


# What the parser is reading on a connection: nothing it waits for, a request head, a request body.
_IDLE, _HEAD, _BODY = 0, 1, 2


if HttpToolsProtocol is not None:

    class CoalescingCycle(RequestResponseCycle):
        """A request/response cycle that writes the response head together with the first body chunk."""

        _held: ASGISendEvent | None = None

        async def send(self, message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and not self.response_started:
                # Held until the body. A second start replaces an unsent first one: that is uvicorn's own
                # 500 after the app failed between its start and its body.
                self._held = message
                return
            held = self._held
            if held is None:
                await super().send(message)
                return
            self._held = None
            if message["type"] != "http.response.body":
                await super().send(held)
                await super().send(message)
                return
            real = self.transport
            capture = _Capture(real)
            # Duck-typed: collects the writes, forwards the rest (no cast: this runs on every response).
            self.transport = capture  # type: ignore[assignment]  # a stand-in, see above
            try:
                await super().send(held)
                await super().send(message)
            finally:
                self.transport = real
                capture.flush()

    class GatewayHttpProtocol(HttpToolsProtocol):
        """``HttpToolsProtocol`` with an arrival stamp in the scope, coalesced response writes, and read
        deadlines for request heads and bodies."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Found once per server (on the app uvicorn loaded) and kept on uvicorn's config object.
            limits = getattr(self.config, "_imagegate_server", None)
            if limits is None:
                # An attribute of ours on uvicorn's Config, which has no such field.
                limits = self.config._imagegate_server = _server_config(self.app)  # type: ignore[attr-defined]  # ours
            self._limits: ServerConfig = limits
            self._reading = _HEAD  # the first head is due from the moment of connection
            self._timer: Any = None
            self._timer_phase = _IDLE
            self._head_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(_HEAD)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def data_received(self, data: bytes) -> None:
            if self._reading != _BODY:
                self._head_bytes += len(data)
            super().data_received(data)
            reading = self._reading
            if reading != self._timer_phase:
                self._arm(reading)
            if reading == _HEAD and self._head_bytes > self._limits.max_header_bytes:
                self._refuse(
                    431,
                    b"Request Header Fields Too Large",
                    "request_header_fields_too_large",
                    f"request head over {self._limits.max_header_bytes} bytes",
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading = _HEAD
            # ASGI's typing wants a dict under each extension name; ours hold a float (and READ_TIMED_OUT a status).
            self.scope["extensions"] = {RECEIVED_AT: time.perf_counter()}  # type: ignore[dict-item]  # see above

        def on_headers_complete(self) -> None:
            self._reading = _BODY
            self._head_bytes = 0
            super().on_headers_complete()
            # The cycle's task is scheduled but has not run yet: its first ``self.send`` lookup sees this.
            cycle = getattr(self, "cycle", None)
            if type(cycle) is RequestResponseCycle:
                cycle.__class__ = CoalescingCycle

        def on_message_complete(self) -> None:
            self._reading = _IDLE
            super().on_message_complete()

        # -- read deadlines ---------------------------------------------------------------------------

        def _arm(self, phase: int) -> None:
            """Replace the deadline: one for ``phase`` (from now), none when idle or closing."""
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_phase = phase
            if phase != _IDLE and not self.transport.is_closing():
                seconds = self._limits.header_timeout_s if phase == _HEAD else self._limits.body_timeout_s
                self._timer = self.loop.call_later(seconds, self._timed_out)

        def _timed_out(self) -> None:
            self._timer = None
            if self._timer_phase == _HEAD:
                if self._head_bytes == 0:  # an idle connection that never asked anything: just close it
                    self.transport.close()
                    return
                message = f"request head not received within {self._limits.header_timeout_s:g} s"
            else:
                message = f"request body not received within {self._limits.body_timeout_s:g} s"
            self._refuse(408, b"Request Timeout", "request_timeout", message)

        def _refuse(self, status: int, reason: bytes, code: str, message: str) -> None:
            """Answer ``status`` unless a response has begun, then close. An app still reading the body
            is told the client is gone (its answer would have nowhere to go)."""
            transport = self.transport
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if transport.is_closing():
                return
            cycle = self.cycle
            if self._reading == _BODY:  # ``cycle`` is this request's
                answer = not (cycle.response_started or getattr(cycle, "_held", None))
                if not cycle.response_complete:
                    cycle.scope.setdefault("extensions", {})[READ_TIMED_OUT] = status  # type: ignore[assignment]  # a status
                    cycle.disconnected = True
                    cycle.message_event.set()
            else:  # a head: a pipelined previous request may still be owed its answer; never write into it
                answer = cycle is None or cycle.response_complete
            if answer:
                transport.write(_refusal(status, reason, code, message, self.server_state.default_headers))
            self._reading = _IDLE
            transport.close()

else:  # pragma: no cover - httptools not installed
    GatewayHttpProtocol = None  # type: ignore[assignment,misc]  # None for a class, as above


def protocol(log: Any = None) -> Any:
    """The ``http=`` argument for uvicorn: ``GatewayHttpProtocol`` when uvicorn's internals are as expected,
    else ``"auto"`` (stock uvicorn) after one warning line saying what differs."""
    problem = check_internals()
    if problem is None:
        return GatewayHttpProtocol
    if log is None:
        from gateway.logs import get_logger

        log = get_logger("imagegate")
    log.warning(
        "uvicorn_internals_changed",
        detail=problem,
        fallback="stock uvicorn protocol: two writes per response, no header/body read deadlines",
    )
    return "auto"


def uvicorn_settings(config: Config, *, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """The keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: what ``imagegate serve`` runs and what
    the end-to-end tests run (``tests/servers.py``), so they cannot drift apart."""
    s = config.server
    grace = s.graceful_shutdown_s if s.graceful_shutdown_s is not None else s.default_deadline_s + 5
    return dict(
        host=host or s.host,
        port=port or s.port,
        loop="auto",  # uvloop when installed
        http=protocol(),
        ws="none",  # no WebSocket endpoints: an upgrade request is just an HTTP request
        access_log=False,  # the gateway writes its own line per request
        log_config=None,  # no logging config of uvicorn's own: its loggers propagate to ours (gateway.logs)
        log_level="warning",
        timeout_keep_alive=s.keep_alive_s,
        limit_concurrency=s.limit_concurrency,  # connections + tasks per process before uvicorn answers 503
        timeout_graceful_shutdown=math.ceil(grace),  # in-flight generations may finish, then they are cut
        h11_max_incomplete_event_size=s.max_header_bytes,  # the h11 fallback's own head-size cap
    )
