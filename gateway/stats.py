"""Live per-backend statistics behind the router's immutable ``BackendStats`` snapshots.

Updated by the dispatcher after each attempt; read by the router through ``snapshot()``. EWMA latency
(and billed seconds per image, for time-priced backends) and a consecutive-failure cooldown: after
``cooldown_failures`` retryable failures in a row a backend is demoted for ``cooldown_s``. A new failure
never shortens an active cooldown; a success ends it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from backends.base import Backend
from gateway.router import BackendStats

_ALPHA = 0.2  # EWMA weight of the newest sample: smooths jitter, still follows a change within ~10 requests


@dataclass(slots=True)
class _Live:
    ewma_latency_s: float | None = None
    ewma_seconds_per_image: float | None = None
    consecutive_failures: int = 0
    cooling_until: float = 0.0


class StatsBook:
    def __init__(self, backends: Mapping[str, Backend], cooldown_failures: int, cooldown_s: float) -> None:
        self._backends = backends
        self._live = {name: _Live() for name in backends}
        self._cooldown_failures = cooldown_failures
        self._cooldown_s = cooldown_s

    def record_success(self, name: str, seconds: float, images: int, billed_seconds: float | None = None) -> None:
        """``seconds``: the attempt's latency; ``billed_seconds``: the GPU or predict time the backend reported
        (what time-based prices charge for, without queueing), if it reported one."""
        live = self._live[name]
        live.ewma_latency_s = (
            seconds if live.ewma_latency_s is None else (_ALPHA * seconds + (1 - _ALPHA) * live.ewma_latency_s)
        )
        per_image = (seconds if billed_seconds is None else billed_seconds) / max(images, 1)
        live.ewma_seconds_per_image = (
            per_image
            if live.ewma_seconds_per_image is None
            else (_ALPHA * per_image + (1 - _ALPHA) * live.ewma_seconds_per_image)
        )
        live.consecutive_failures = 0
        live.cooling_until = 0.0

    def record_failure(self, name: str) -> None:
        live = self._live[name]
        live.consecutive_failures += 1
        if self._cooldown_failures and live.consecutive_failures >= self._cooldown_failures:
            live.cooling_until = max(live.cooling_until, time.monotonic() + self._cooldown_s)

    def snapshot(self) -> dict[str, BackendStats]:
        out = {}
        for name, backend in self._backends.items():
            live = self._live[name]
            load = backend.load()
            out[name] = BackendStats(
                ready=backend.ready(),
                est_wait_s=load.est_wait_s,
                ewma_latency_s=live.ewma_latency_s,
                ewma_seconds_per_image=live.ewma_seconds_per_image,
                cooling_until=live.cooling_until,
            )
        return out
