"""One request's context, from the handler to the dispatcher and back.

The handler creates a ``RequestContext`` when a request arrives (its id and timing), sets ``request`` once
the body is parsed, and passes the context to ``Dispatcher.dispatch``. Each stage reads what it needs from
here and writes what it decides here, so nothing travels in pieces:

* ``request``: what the caller asked, ``max_cost_usd`` and the deadline included (``ImageRequest``);
* ``timing``: the request's clock; every attempt's backend time is folded into it;
* ``route`` / ``tier``: set by the dispatcher from the router's plan (``route`` also on a policy error);
* ``attempts``: the failed attempts, in order (retries and fallbacks);
* ``backend`` / ``result`` / ``cost_usd``: who served, what, at what settled price.

The handler renders the response headers, the log line and the metrics from the context alone.
Backends never see it: they keep their contract, ``generate(request, clock)``.
"""

from __future__ import annotations

from backends.base import ImageRequest, ImageResult
from backends.errors import AttemptRecord
from gateway.timing import RequestTiming


class RequestContext:
    # Slots, no dataclass machinery: one is created per request on the hot path.
    __slots__ = ("attempts", "backend", "cost_usd", "request", "request_id", "result", "route", "tier", "timing")

    def __init__(self, request_id: str, timing: RequestTiming, request: ImageRequest | None = None) -> None:
        self.request_id = request_id
        self.timing = timing
        self.request = request  # None until the body is parsed
        self.route: str | None = None
        self.tier: str | None = None
        self.attempts: list[AttemptRecord] = []
        self.backend: str | None = None  # set only when a backend served
        self.result: ImageResult | None = None
        self.cost_usd: float | None = None  # None: unknown (no price configured), never a made-up 0

    @property
    def served(self) -> bool:
        return self.result is not None

    @property
    def attempt_count(self) -> int:
        """Every attempt made: the failed ones plus the one that served, if any."""
        return len(self.attempts) + (self.result is not None)

    @property
    def last_backend(self) -> str | None:
        """Who served, else the last backend tried (``X-Backend``)."""
        if self.backend is not None:
            return self.backend
        return self.attempts[-1].backend if self.attempts else None
