"""Which backends may serve a request, in which order. A pure function; no I/O, no HTTP.

``plan(request, config, stats, now)`` → ``Plan`` is the router's API (the dispatcher calls it once per
request): the matched route, the tier, the ordered candidates and the backends left out with the reason.
Rules, in order:

1. Tier: the request's ``tier``, else a ``model`` naming a tier, else the tier claiming its OpenAI
   ``quality``, else the default tier.
2. Route: the first route whose ``match`` accepts the request's model, tier and size.
3. Filter: a candidate is dropped if its declared capabilities refuse the request (size, n, steps, a
   negative prompt or seed it would drop) — an image request is never sent to something that cannot
   make it — if its quality is below the tier's floor, or if the request set ``max_cost_usd`` and its
   estimate is above it (or unknown).
4. Order by strategy: ``fallback`` keeps the configured order; ``cheapest`` sorts by estimated cost
   (unknown last); ``fastest`` by observed latency (EWMA, plus the backend's estimated queue wait;
   unmeasured backends first, so they get measured).
5. Demote (move to the end, keep as last resort): backends not ready, cooling down after repeated
   failures, or whose estimated queue wait exceeds the tier's latency budget — this is how local GPU work
   spills over to remote backends under load.

Errors: ``InvalidRequest`` (unknown tier) and ``UnknownModel`` before a route is matched; after it, the
``PolicyError`` raised when no candidate survives (``NoCapableBackend``, ``BudgetExceeded``) names the route.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from backends.base import EMPTY, ImageRequest
from backends.errors import BudgetExceeded, InvalidRequest, NoCapableBackend, UnknownModel
from gateway.config import Config, Route, Tier
from gateway.cost import estimate


@dataclass(frozen=True, slots=True)
class BackendStats:
    """What the router may know about a backend's recent behaviour (a snapshot)."""

    ready: bool = True
    est_wait_s: float = 0.0
    ewma_latency_s: float | None = None
    ewma_seconds_per_image: float | None = None
    cooling_until: float = 0.0


NO_STATS = BackendStats()


@dataclass(frozen=True, slots=True)
class Candidate:
    backend: str
    options: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    est_cost: float | None = None
    demoted: str | None = None  # why it was moved to the end, if it was


@dataclass(frozen=True, slots=True)
class Plan:
    route: Route
    tier: Tier | None
    candidates: tuple[Candidate, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def _resolve_tier(request: ImageRequest, config: Config) -> Tier | None:
    """Rule 1: the explicit tier, else a ``model`` that names a tier, else the tier claiming the request's
    OpenAI ``quality``, else the default tier."""
    if request.tier is not None:
        tier = config.tiers.get(request.tier)
        if tier is None:
            raise InvalidRequest(
                f"unknown tier {request.tier!r}; tiers: {', '.join(config.tiers) or 'none'}", param="tier"
            )
        return tier
    if request.model is not None and request.model in config.tiers:
        return config.tiers[request.model]
    if request.quality is not None:
        for tier in config.tiers.values():
            if request.quality in tier.qualities:
                return tier
    return config.tiers.get(config.default_tier) if config.default_tier else None


def _select_route(request: ImageRequest, tier: Tier | None, config: Config) -> Route:
    """Rule 2: the first route matching the request's model, tier and size."""
    model = request.model
    if model is not None and model not in config.models:
        raise UnknownModel(
            f"model {model!r} is not served here; models: {', '.join(config.models) or 'none'}", param="model"
        )
    tier_name = tier.name if tier else None
    # A model that names a tier asks for the tier, not for a specific model.
    wanted = None if model in config.tiers else model
    for route in config.routes:
        m = route.match
        if m.models and wanted not in m.models:
            continue
        if m.tiers and tier_name not in m.tiers:
            continue
        if m.sizes and request.size not in m.sizes:
            continue
        return route
    raise UnknownModel(f"no route serves model={model!r} tier={tier_name!r} size={request.size}", param="model")


def plan(
    request: ImageRequest,
    config: Config,
    stats: Mapping[str, BackendStats] = MappingProxyType({}),
    now: float = 0.0,
) -> Plan:
    """The plan for ``request`` (rules 1-5 of the module docstring). ``now`` is the ``time.monotonic()``
    instant cooldowns in ``stats`` are compared with."""
    tier = _resolve_tier(request, config)
    return _rank(request, _select_route(request, tier, config), tier, config, stats, now)


def _rank(
    request: ImageRequest,
    route: Route,
    tier: Tier | None,
    config: Config,
    stats: Mapping[str, BackendStats] = MappingProxyType({}),
    now: float = 0.0,
) -> Plan:
    """Rules 3-5 for an already matched route: filter, order by strategy, demote."""
    max_cost_usd = request.max_cost_usd
    floor = tier.quality_floor if tier else 0.0
    budget_s = tier.latency_budget_s if tier else None

    kept: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    over_budget = 0
    for cand in route.candidates:
        backend = config.backends[cand.backend]
        why = backend.capabilities.refusal(request)
        if why is None and backend.quality < floor:
            why = f"quality {backend.quality} below tier floor {floor}"
        s = stats.get(cand.backend, NO_STATS)
        cost = estimate(backend.cost, request, s.ewma_seconds_per_image)
        if why is None and max_cost_usd is not None:
            if cost is None:
                why, over_budget = "price unknown, cannot honour max_cost_usd", over_budget + 1
            elif cost > max_cost_usd:
                why, over_budget = f"estimated ${cost:.4f} exceeds max_cost_usd", over_budget + 1
        if why is not None:
            skipped.append((cand.backend, why))
            continue
        demoted = None
        if not s.ready:
            demoted = "not ready"
        elif s.cooling_until > now:
            demoted = "cooling down after failures"
        elif budget_s is not None and s.est_wait_s > budget_s:
            demoted = f"estimated wait {s.est_wait_s:.1f}s exceeds tier budget {budget_s:.1f}s"
        kept.append(Candidate(cand.backend, cand.options, cost, demoted))

    if not kept:
        detail = "; ".join(f"{name}: {why}" for name, why in skipped)
        if over_budget and over_budget == len(skipped):
            raise BudgetExceeded(
                f"no backend fits max_cost_usd={max_cost_usd}: {detail}", param="max_cost_usd", route=route.name
            )
        raise NoCapableBackend(f"no backend of route {route.name!r} can serve this request: {detail}", route=route.name)

    if route.strategy == "cheapest":
        kept.sort(key=lambda c: (c.est_cost is None, c.est_cost or 0.0))
    elif route.strategy == "fastest":
        kept.sort(key=lambda c: _expected_latency(stats.get(c.backend, NO_STATS)))
    # Stable partition: healthy first, demoted after, each group keeping the strategy's order.
    ordered = [c for c in kept if c.demoted is None] + [c for c in kept if c.demoted is not None]
    return Plan(route, tier, tuple(ordered), tuple(skipped))


def _expected_latency(s: BackendStats) -> float:
    if s.ewma_latency_s is None:
        return -1.0  # unmeasured: try it first so it gets a measurement
    return s.ewma_latency_s + s.est_wait_s
