"""Properties of the router over generated configs, requests and stats (hypothesis), checked against an
independent oracle: whether each backend may serve a request, and in which order, is re-derived here from
the generated numbers and the documented rules (README "How a request is routed"), never by asking the
router's own code (``Capabilities.refusal``, ``gateway.cost``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

import backends.openai_compat  # noqa: F401 - httpx touches `random` at import: not inside a strategy
from backends.base import ImageRequest
from backends.errors import BudgetExceeded, NoCapableBackend
from gateway.config import Config, load_config_text
from gateway.router import BackendStats, plan

NAMES = ("a", "b", "c", "d")
LATENCY_BUDGET_S = 5.0


@dataclass(frozen=True)
class Generated:
    """One backend as generated (numbers as written into the YAML, i.e. already rounded)."""

    quality: float
    price_kind: str | None
    price: float
    sizes: tuple[str, ...]
    max_n: int
    max_steps: int


@dataclass(frozen=True)
class Case:
    config: Config
    request: ImageRequest
    stats: dict[str, BackendStats]
    budget: float | None
    backends: dict[str, Generated]
    route: tuple[str, ...]
    strategy: str
    floor: float


@st.composite
def scenario(draw) -> Case:
    lines = ["backends:"]
    generated = {}
    for name in NAMES:
        kind = draw(st.one_of(st.none(), st.sampled_from(["per_image", "per_megapixel", "per_step"])))
        price = float(f"{draw(st.floats(0.0001, 1.0)):.4f}")
        g = Generated(
            quality=float(f"{draw(st.floats(0, 1)):.2f}"),
            price_kind=kind,
            price=price,
            sizes=tuple(draw(st.lists(st.sampled_from(["512x512", "1024x1024", "768x1344"]), max_size=2, unique=True))),
            max_n=draw(st.integers(1, 4)),
            max_steps=draw(st.integers(4, 60)),
        )
        generated[name] = g
        cost = f"{{{kind}: {price:.4f}}}" if kind else "{}"
        lines.append(
            f"  {name}: {{type: openai, quality: {g.quality:.2f}, cost: {cost}, "
            f"capabilities: {{sizes: {list(g.sizes)}, max_n: {g.max_n}, max_steps: {g.max_steps}}}, "
            f"settings: {{base_url: 'http://127.0.0.1:9/v1'}}}}"
        )
    strategy = draw(st.sampled_from(["fallback", "cheapest", "fastest"]))
    cands = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    floor = float(f"{draw(st.floats(0, 1)):.2f}")
    candidates = ", ".join(f"{{backend: {c}}}" for c in cands)
    lines += [
        f"tiers: {{t: {{quality_floor: {floor:.2f}, latency_budget_s: {LATENCY_BUDGET_S}}}}}",
        "routes:",
        f"  - {{name: r, strategy: {strategy}, candidates: [{candidates}]}}",
        "default_tier: t",
    ]
    cfg = load_config_text("\n".join(lines), "generated")
    # Listed sizes, unlisted ones, and ones past the default 2048 limit or off the multiple of 8 (for sizes: []).
    w, h = draw(
        st.sampled_from([(512, 512), (1024, 1024), (768, 1344), (640, 640), (2056, 512), (516, 512), (512, 516)])
    )
    request = ImageRequest(
        prompt="p", width=w, height=h, n=draw(st.integers(1, 4)), steps=draw(st.one_of(st.none(), st.integers(1, 60)))
    )
    stats = {
        name: BackendStats(
            ready=draw(st.booleans()),
            est_wait_s=draw(st.floats(0, 10)),
            ewma_latency_s=draw(st.one_of(st.none(), st.floats(0.01, 30))),
        )
        for name in NAMES
    }
    budget = draw(st.one_of(st.none(), st.floats(0.0, 2.0)))
    return Case(cfg, request, stats, budget, generated, tuple(cands), strategy, floor)


# -- the oracle ------------------------------------------------------------------------------------------------


def price(g: Generated, r: ImageRequest) -> float | None:
    """Per image, per megapixel of each image, or per denoising step of each image (30 steps when the request
    does not say); unknown without a price. Estimates are rounded to 1e-8 USD."""
    if g.price_kind is None:
        return None
    if g.price_kind == "per_image":
        total = g.price * r.n
    elif g.price_kind == "per_megapixel":
        total = g.price * (r.width * r.height / 1_000_000) * r.n
    else:
        total = g.price * (r.steps if r.steps is not None else 30) * r.n
    return round(total, 8)


def refusal(case: Case, name: str) -> str | None:
    """Why ``name`` may not serve the request: 'capability', 'quality' or 'budget'; None if it may."""
    g, r = case.backends[name], case.request
    if g.sizes:
        fits = f"{r.width}x{r.height}" in g.sizes
    else:  # any size within 2048x2048 whose sides are multiples of 8 (the defaults)
        fits = r.width <= 2048 and r.height <= 2048 and r.width % 8 == 0 and r.height % 8 == 0
    if not fits or r.n > g.max_n or (r.steps is not None and r.steps > g.max_steps):
        return "capability"
    if g.quality < case.floor:
        return "quality"
    if case.budget is not None:
        p = price(g, r)
        if p is None or p > case.budget:
            return "budget"
    return None


def expected_order(case: Case, servable: list[str]) -> list[str]:
    def demoted(name: str) -> bool:
        s = case.stats[name]
        return not s.ready or s.est_wait_s > LATENCY_BUDGET_S

    def key(name: str) -> tuple:
        if case.strategy == "cheapest":
            p = price(case.backends[name], case.request)
            return (p is None, p or 0.0)  # unknown price last
        if case.strategy == "fastest":
            s = case.stats[name]
            return (-1.0 if s.ewma_latency_s is None else s.ewma_latency_s + s.est_wait_s,)  # unmeasured first
        return ()  # fallback: the configured order

    healthy = sorted((n for n in servable if not demoted(n)), key=key)
    return healthy + sorted((n for n in servable if demoted(n)), key=key)


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_plan_matches_an_independent_oracle(case: Case) -> None:
    reasons = {name: refusal(case, name) for name in case.route}
    servable = [name for name in case.route if reasons[name] is None]
    try:
        p = plan(dataclasses.replace(case.request, max_cost_usd=case.budget), case.config, case.stats, now=0.0)
    except BudgetExceeded as exc:
        # Only when price is what excluded every candidate.
        assert not servable and set(reasons.values()) == {"budget"}, (reasons, exc)
        assert exc.status == 402
        return
    except NoCapableBackend as exc:
        assert not servable and set(reasons.values()) != {"budget"}, (reasons, exc)
        assert exc.status == 400
        return
    assert servable, f"planned {[c.backend for c in p.candidates]} although the oracle refuses all: {reasons}"
    names = [c.backend for c in p.candidates]
    assert names == expected_order(case, servable)
    assert sorted(name for name, _ in p.skipped) == sorted(set(case.route) - set(servable))
    for cand in p.candidates:
        assert cand.est_cost == price(case.backends[cand.backend], case.request)
        assert (cand.demoted is not None) == (
            not case.stats[cand.backend].ready or case.stats[cand.backend].est_wait_s > LATENCY_BUDGET_S
        )
