"""The router is a pure function: these tests build configs and stats by hand, no HTTP anywhere."""

from __future__ import annotations

import pytest

from backends.base import ImageRequest
from backends.errors import BudgetExceeded, InvalidRequest, NoCapableBackend, UnknownModel
from gateway.config import load_config_text
from gateway.router import BackendStats, Plan, plan

CONFIG = """
backends:
  local:
    type: openai
    quality: 0.6
    cost: {per_gpu_second: 0.001, est_seconds_per_image: 2}
    capabilities: {sizes: ["512x512", "1024x1024"], max_n: 4, max_steps: 50}
    settings: {base_url: "http://127.0.0.1:9/v1"}
  cheap:
    type: openai
    quality: 0.4
    cost: {per_image: 0.001}
    capabilities: {max_width: 1024, max_height: 1024, max_n: 1}
    settings: {base_url: "http://127.0.0.1:9/v1"}
  premium:
    type: openai
    quality: 0.9
    cost: {per_megapixel: 0.04}
    capabilities: {max_width: 2048, max_height: 2048, max_n: 4}
    settings: {base_url: "http://127.0.0.1:9/v1"}
  mystery:
    type: openai
    quality: 0.9
    settings: {base_url: "http://127.0.0.1:9/v1"}
tiers:
  preview: {quality_floor: 0.0, latency_budget_s: 5, qualities: [low]}
  standard: {quality_floor: 0.5, latency_budget_s: 30}
  premium: {quality_floor: 0.8, latency_budget_s: 60, qualities: [high, hd]}
routes:
  - name: flux
    match: {models: [flux-schnell]}
    candidates: [{backend: premium}]
  - name: preview
    match: {tiers: [preview]}
    strategy: cheapest
    candidates: [{backend: local, options: {decoder: taesd}}, {backend: cheap}, {backend: premium}]
  - name: standard
    match: {tiers: [standard]}
    strategy: cheapest
    candidates: [{backend: premium}, {backend: mystery}, {backend: local, options: {decoder: full}}]
  - name: fast
    match: {tiers: [premium]}
    strategy: fastest
    candidates: [{backend: premium}, {backend: mystery}]
default_tier: standard
"""
cfg = load_config_text(CONFIG, "test")


def req(**kw) -> ImageRequest:
    kw.setdefault("prompt", "a lighthouse")
    kw.setdefault("width", 1024)
    kw.setdefault("height", 1024)
    return ImageRequest(**kw)


def names(p) -> list[str]:
    return [c.backend for c in p.candidates]


def tier_of(p: Plan) -> str:
    assert p.tier is not None
    return p.tier.name


def test_cheapest_orders_by_estimated_cost_and_carries_options():
    p = plan(req(tier="preview"), cfg)
    assert p.route.name == "preview"
    # cheap: $0.001; local: 2 s x $0.001 = $0.002; premium: 1.048576 MP x $0.04
    assert names(p) == ["cheap", "local", "premium"]
    assert p.candidates[1].options == {"decoder": "taesd"}
    assert p.candidates[0].est_cost == pytest.approx(0.001)


def test_observed_seconds_per_image_replace_the_configured_estimate():
    stats = {"local": BackendStats(ewma_seconds_per_image=0.5)}
    assert names(plan(req(tier="preview"), cfg, stats)) == ["local", "cheap", "premium"]


def test_unknown_price_sorts_last_under_cheapest():
    p = plan(req(), cfg)  # default tier: standard
    assert tier_of(p) == "standard"
    assert names(p) == ["local", "premium", "mystery"]
    assert p.candidates[-1].est_cost is None


def test_fallback_keeps_configured_order():
    assert names(plan(req(model="flux-schnell"), cfg)) == ["premium"]


def test_fastest_prefers_unmeasured_then_lowest_latency_plus_queue_wait():
    p = plan(req(tier="premium"), cfg, {"premium": BackendStats(ewma_latency_s=3.0)})
    assert names(p) == ["mystery", "premium"]  # mystery unmeasured: measure it
    stats = {"premium": BackendStats(ewma_latency_s=3.0), "mystery": BackendStats(ewma_latency_s=4.0)}
    assert names(plan(req(tier="premium"), cfg, stats)) == ["premium", "mystery"]
    stats["premium"] = BackendStats(ewma_latency_s=3.0, est_wait_s=2.0)
    assert names(plan(req(tier="premium"), cfg, stats)) == ["mystery", "premium"]


def test_capabilities_filter_size_n_and_steps():
    p = plan(req(tier="preview", width=768, height=768), cfg)
    assert names(p) == ["cheap", "premium"]
    assert ("local", "size 768x768 not in 512x512, 1024x1024") in p.skipped
    assert names(plan(req(tier="preview", n=2), cfg)) == ["local", "premium"]
    assert names(plan(req(tier="preview", steps=80), cfg)) == ["cheap", "premium"]
    assert names(plan(req(tier="preview", width=2048, height=2048), cfg)) == ["premium"]


def test_nothing_capable_is_a_policy_error_naming_the_reasons():
    with pytest.raises(NoCapableBackend) as err:
        plan(req(tier="preview", width=4096, height=4096), cfg)
    assert "cheap: size 4096x4096 exceeds 1024x1024" in err.value.message
    assert err.value.route == "preview"  # policy errors name the route they were decided in


def test_quality_floor_removes_low_quality_backends():
    p = plan(req(tier="standard"), cfg)
    assert "cheap" not in names(p)
    custom = load_config_text(
        CONFIG.replace(
            "candidates: [{backend: premium}, {backend: mystery}, {backend: local",
            "candidates: [{backend: cheap}, {backend: local",
        ),
        "t",
    )
    p = plan(req(tier="standard"), custom)
    assert names(p) == ["local"] and p.skipped == (("cheap", "quality 0.4 below tier floor 0.5"),)


def test_budget_filters_and_unknown_price_cannot_promise_a_budget():
    p = plan(req(tier="preview", max_cost_usd=0.0015), cfg)
    assert names(p) == ["cheap"]
    with pytest.raises(BudgetExceeded) as err:
        plan(req(tier="preview", max_cost_usd=0.0001), cfg)
    assert err.value.status == 402 and err.value.route == "preview"
    p = plan(req(tier="standard", max_cost_usd=10), cfg)
    assert "mystery" not in names(p)
    assert ("mystery", "price unknown, cannot honour max_cost_usd") in p.skipped


def test_unready_and_cooling_backends_are_demoted_not_dropped():
    stats = {"cheap": BackendStats(ready=False)}
    p = plan(req(tier="preview"), cfg, stats)
    assert names(p) == ["local", "premium", "cheap"] and p.candidates[-1].demoted == "not ready"
    stats = {"cheap": BackendStats(cooling_until=100.0)}
    assert names(plan(req(tier="preview"), cfg, stats, now=50.0))[-1] == "cheap"
    assert names(plan(req(tier="preview"), cfg, stats, now=150.0))[0] == "cheap"


def test_local_queue_spills_over_when_wait_exceeds_tier_budget():
    stats = {"local": BackendStats(ewma_seconds_per_image=0.1, est_wait_s=1.0)}
    assert names(plan(req(tier="preview"), cfg, stats))[0] == "local"
    stats = {"local": BackendStats(ewma_seconds_per_image=0.1, est_wait_s=9.0)}  # budget 5 s
    p = plan(req(tier="preview"), cfg, stats)
    assert names(p) == ["cheap", "premium", "local"]
    assert "exceeds tier budget" in (p.candidates[-1].demoted or "")


def test_model_naming_a_tier_selects_that_tier():
    assert plan(req(model="preview"), cfg).route.name == "preview"


def test_unknown_model_and_tier():
    with pytest.raises(UnknownModel) as err:
        plan(req(model="dall-e-9"), cfg)
    assert err.value.status == 404 and "flux-schnell" in err.value.message
    with pytest.raises(InvalidRequest):
        plan(req(tier="gold"), cfg)


def test_plan_is_pure_and_repeatable():
    stats = {"local": BackendStats(ewma_seconds_per_image=0.5)}
    assert plan(req(tier="preview"), cfg, stats) == plan(req(tier="preview"), cfg, stats)


def test_openai_quality_selects_a_tier_unless_one_is_named():
    assert tier_of(plan(req(quality="low"), cfg)) == "preview"
    assert tier_of(plan(req(quality="hd"), cfg)) == "premium"
    assert tier_of(plan(req(quality="medium"), cfg)) == "standard"  # unclaimed: the default
    assert tier_of(plan(req(quality="low", tier="standard"), cfg)) == "standard"


STRICT_LOCAL = """
backends:
  gpu:
    type: local_sdxl
    cost: {per_gpu_second: 0.0001, est_seconds_per_image: 1}
    settings: {preset: tiny, unlisted_shape: refuse,
               shapes: [{width: 64, height: 64, batch: 1}, {width: 64, height: 64, batch: 2}]}
  remote:
    type: openai
    cost: {per_image: 0.05}
    settings: {base_url: "http://127.0.0.1:9/v1"}
routes:
  - name: r
    strategy: cheapest
    candidates: [{backend: gpu, options: {decoder: taesd}}, {backend: remote}]
"""


def test_shapes_a_strict_local_backend_cannot_serve_go_elsewhere():
    strict = load_config_text(STRICT_LOCAL, "t")
    assert names(plan(req(width=64, height=64, n=2), strict)) == ["gpu", "remote"]
    p = plan(req(width=48, height=32), strict)
    assert names(p) == ["remote"] and p.skipped == (("gpu", "size 48x32 not in 64x64"),)
    p = plan(req(width=64, height=64, n=3), strict)
    assert names(p) == ["remote"] and p.skipped == (("gpu", "n=3 exceeds max_n=2 for 64x64"),)


PLAIN = """
backends:
  plain:
    type: openai
    cost: {per_image: 0.001}
    capabilities: {negative_prompt: false, seed: false, output_formats: [png]}
    settings: {base_url: "http://127.0.0.1:9/v1"}
  full:
    type: openai
    cost: {per_image: 0.01}
    settings: {base_url: "http://127.0.0.1:9/v1"}
routes:
  - {name: r, strategy: cheapest, candidates: [{backend: plain}, {backend: full}]}
"""


def test_negative_prompt_and_seed_go_only_where_they_are_taken():
    """Issue #9 item 4: ``negative_prompt: false`` / ``seed: false`` are read, not silently accepted."""
    plain = load_config_text(PLAIN, "t")
    assert names(plan(req(), plain)) == ["plain", "full"]
    p = plan(req(negative_prompt="blurry"), plain)
    assert names(p) == ["full"] and p.skipped == (("plain", "takes no negative_prompt"),)
    p = plan(req(seed=7), plain)
    assert names(p) == ["full"] and p.skipped == (("plain", "takes no seed"),)
    assert names(plan(req(negative_prompt=""), plain)) == ["plain", "full"]  # an empty one asks for nothing
    with pytest.raises(NoCapableBackend, match="plain: takes no seed"):
        plan(req(seed=7), load_config_text(PLAIN.replace("{backend: plain}, {backend: full}", "{backend: plain}"), "t"))


def test_output_formats_are_what_a_backend_produces_not_a_refusal():
    plain = load_config_text(PLAIN, "t")
    assert plain.backends["plain"].capabilities.output_formats == ("png",)
    assert names(plan(req(output_format="webp"), plain)) == ["plain", "full"]  # the gateway converts
