"""Properties of the router over generated configs, requests and stats (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import backends.openai_compat  # noqa: F401 - httpx touches `random` at import: not inside a strategy
from backends.base import ImageRequest
from backends.errors import BudgetExceeded, NoCapableBackend
from gateway.config import load_config_text
from gateway.router import BackendStats, plan

NAMES = ("a", "b", "c", "d")


@st.composite
def scenario(draw):
    lines = ["backends:"]
    for name in NAMES:
        price = draw(st.one_of(st.none(), st.sampled_from(["per_image", "per_megapixel", "per_step"])))
        cost = f"{{{price}: {draw(st.floats(0.0001, 1.0)):.4f}}}" if price else "{}"
        sizes = draw(st.lists(st.sampled_from(["512x512", "1024x1024", "768x1344"]), max_size=2, unique=True))
        lines.append(
            f"  {name}: {{type: openai, quality: {draw(st.floats(0, 1)):.2f}, cost: {cost}, "
            f"capabilities: {{sizes: {sizes}, max_n: {draw(st.integers(1, 4))}, max_steps: {draw(st.integers(4, 60))}}}, "
            f"settings: {{base_url: 'http://127.0.0.1:9/v1'}}}}"
        )
    strategy = draw(st.sampled_from(["fallback", "cheapest", "fastest"]))
    cands = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    floor = draw(st.floats(0, 1))
    lines += [f"tiers: {{t: {{quality_floor: {floor:.2f}, latency_budget_s: 5}}}}", "routes:",
              f"  - {{name: r, strategy: {strategy}, candidates: [{', '.join('{backend: %s}' % c for c in cands)}]}}",
              "default_tier: t"]
    cfg = load_config_text("\n".join(lines), "generated")
    w, h = draw(st.sampled_from([(512, 512), (1024, 1024), (768, 1344), (640, 640)]))
    request = ImageRequest(prompt="p", width=w, height=h, n=draw(st.integers(1, 4)),
                           steps=draw(st.one_of(st.none(), st.integers(1, 60))))
    stats = {name: BackendStats(ready=draw(st.booleans()), est_wait_s=draw(st.floats(0, 10)),
                                ewma_latency_s=draw(st.one_of(st.none(), st.floats(0.01, 30))))
             for name in NAMES}
    budget = draw(st.one_of(st.none(), st.floats(0.0, 2.0)))
    return cfg, request, stats, budget


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_every_planned_candidate_can_serve_and_fits_tier_and_budget(case):
    cfg, request, stats, budget = case
    try:
        p = plan(request, cfg, stats, now=0.0, max_cost_usd=budget)
    except (NoCapableBackend, BudgetExceeded) as exc:
        # Nothing was capable: every route candidate must really have been refused.
        assert exc.status in (400, 402)
        return
    names = [c.backend for c in p.candidates]
    route = [c.backend for c in cfg.routes[0].candidates]
    assert len(names) == len(set(names)) and set(names) <= set(route)
    assert set(names) | {n for n, _ in p.skipped} == set(route)
    for cand in p.candidates:
        backend = cfg.backends[cand.backend]
        assert backend.capabilities.refusal(request) is None
        assert backend.quality >= cfg.tiers["t"].quality_floor
        if budget is not None:
            assert cand.est_cost is not None and cand.est_cost <= budget
    # Demoted candidates come after every healthy one.
    flags = [c.demoted is not None for c in p.candidates]
    assert flags == sorted(flags)
    if cfg.routes[0].strategy == "cheapest":
        healthy = [c.est_cost for c in p.candidates if c.demoted is None]
        known = [c for c in healthy if c is not None]
        assert known == sorted(known) and healthy[: len(known)] == known
