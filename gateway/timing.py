"""Per-request timing: one small object created when the app sees the request, closed at send.

``gateway`` time is ``total - backend``: everything the gateway itself did (parsing, routing, the HTTP
client's CPU work, rendering the response) — backend time comes from the wire or the device worker (see
``backends.base.StageClock``), never from "time spent in an await".
"""

from __future__ import annotations

import time

from backends.base import StageClock


class RequestTiming:
    """The request's clock (``gateway.context.RequestContext.timing``): started on arrival, fed each
    attempt's ``StageClock`` by the dispatcher, closed by the handler just before the response is sent."""

    __slots__ = ("backend_s", "end", "stages", "start")

    def __init__(self, start: float | None = None) -> None:
        # ``start``: when the server received the request (``gateway.server``), if it says; else now.
        self.start = start or time.perf_counter()
        self.backend_s = 0.0
        self.stages: dict[str, float] = {}
        self.end = 0.0

    def absorb(self, clock: StageClock) -> None:
        """Fold one attempt's clock into the request's totals."""
        self.backend_s += clock.backend_s
        for name, seconds in clock.stages.items():
            self.stages[name] = self.stages.get(name, 0.0) + seconds

    def close(self) -> float:
        """Stop the clock (just before the response starts going out); returns total seconds."""
        self.end = time.perf_counter()
        return self.end - self.start

    @property
    def total_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    @property
    def gateway_s(self) -> float:
        return max(0.0, self.total_s - self.backend_s)

    def server_timing(self) -> str:
        """``Server-Timing`` value: gateway, backend, total, then the backend's stages (milliseconds)."""
        parts = [
            f'gateway;dur={self.gateway_s * 1e3:.3f};desc="gateway overhead"',
            f'backend;dur={self.backend_s * 1e3:.3f};desc="awaiting backends (all attempts)"',
            f"total;dur={self.total_s * 1e3:.3f}",
        ]
        parts.extend(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in self.stages.items())
        return ", ".join(parts)
