"""uvicorn's httptools protocol with two changes for the gateway's hot path (``imagegate serve`` uses it).

1. **One write per response.** uvicorn writes the status line and headers as soon as the app sends
   ``http.response.start`` and the body in a second ``write`` — two ``send`` syscalls, and on loopback or a
   fast LAN two TCP segments each processed in full by the kernel. Measured on the 2-core benchmark machine
   that second syscall was about 7% of the gateway's CPU per proxied request. Here the start message is held
   and written together with the first body chunk. (An app that sends ``start`` and then waits before its
   first body chunk delays its headers until then; the gateway never does that.)
2. **The clock starts when the request arrives**, not when the ASGI app is first scheduled: the parser's
   ``on_message_begin`` stamps ``time.perf_counter()`` into ``scope["extensions"]["imagegate.received_at"]``,
   which the generations handler uses as the start of its overhead measurement — so the
   ``X-Gateway-Overhead-Ms`` header also covers request parsing and task start-up in the server.

uvicorn's protocol classes are internal API; if they are missing or changed, ``protocol()`` returns
``"auto"`` and uvicorn runs as usual (headers then simply cover a little less).
"""

from __future__ import annotations

import time
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import (
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError:  # pragma: no cover - httptools not installed
    HttpToolsProtocol = RequestResponseCycle = None  # type: ignore[assignment,misc]

RECEIVED_AT = "imagegate.received_at"


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


if HttpToolsProtocol is not None:

    class CoalescingCycle(RequestResponseCycle):  # type: ignore[misc,valid-type]
        """A request/response cycle that writes the response head together with the first body chunk."""

        _held: dict[str, Any] | None = None

        async def send(self, message: Any) -> None:
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
            self.transport = capture
            try:
                await super().send(held)
                await super().send(message)
            finally:
                self.transport = real
                capture.flush()

    class GatewayHttpProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """``HttpToolsProtocol`` with an arrival stamp in the scope and coalesced response writes."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {RECEIVED_AT: time.perf_counter()}

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            # The cycle's task is scheduled but has not run yet: its first ``self.send`` lookup sees this.
            cycle = getattr(self, "cycle", None)
            if type(cycle) is RequestResponseCycle:
                cycle.__class__ = CoalescingCycle


def protocol() -> Any:
    """The ``http=`` argument for uvicorn: ``GatewayHttpProtocol`` when available, else ``"auto"``."""
    if HttpToolsProtocol is None or not hasattr(RequestResponseCycle, "send"):
        return "auto"
    return GatewayHttpProtocol
