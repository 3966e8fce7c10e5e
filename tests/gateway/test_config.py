from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.config import ConfigError, load_config, load_config_text

BASE = """
backends:
  up:
    type: openai
    quality: 0.7
    cost: {per_image: 0.02}
    settings: {base_url: "http://127.0.0.1:9/v1", api_key: "${TEST_KEY}"}
tiers:
  standard: {quality_floor: 0.5, latency_budget_s: 30}
routes:
  - name: default
    candidates: [{backend: up}]
default_tier: standard
"""


def test_parses_into_frozen_typed_objects(monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-live-abcdef123456")
    cfg = load_config_text(BASE, "routes.yaml")
    up = cfg.backends["up"]
    assert up.type == "openai" and up.quality == 0.7 and up.cost.per_image == 0.02
    assert up.spec.settings.api_key == "sk-live-abcdef123456"
    assert cfg.tiers["standard"].latency_budget_s == 30.0
    assert cfg.routes[0].strategy == "fallback"
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]  # frozen: the assignment must fail
    assert "sk-live-abcdef123456" in cfg.secrets


def test_redacted_view_never_shows_secrets(monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-live-abcdef123456")
    doc = BASE.replace("settings: {base_url", 'settings: {extra_headers: {x-api-key: "literal-secret-999"}, base_url')
    cfg = load_config_text(doc, "routes.yaml")
    text = repr(cfg.redacted())
    assert "sk-live-abcdef123456" not in text and "literal-secret-999" not in text
    assert "${TEST_KEY}" in text


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda d: d.replace("quality: 0.7", "qualty: 0.7"), "backends.up.qualty", "unknown key"),
        (lambda d: d.replace("quality: 0.7", "quality: 7"), "backends.up.quality", "between 0 and 1"),
        (lambda d: d.replace("type: openai", "type: dalle"), "backends.up.type", "unknown backend type"),
        (lambda d: d.replace("base_url:", "base_ur:"), "backends.up.settings.base_ur", "unknown key"),
        (lambda d: d.replace("{backend: up}", "{backend: nope}"), "routes[0].candidates[0].backend", "no backend"),
        (lambda d: d.replace("default_tier: standard", "default_tier: gold"), "default_tier", "not a tier"),
        (
            lambda d: d.replace(
                "standard: {quality_floor: 0.5, latency_budget_s: 30}",
                "standard: {qualities: [low]}\n  preview: {qualities: [low]}",
            ),
            "tiers.preview.qualities",
            "already selects tier 'standard'",
        ),
        (lambda d: d.replace("per_image: 0.02", "per_image: cheap"), "backends.up.cost.per_image", "number"),
        (lambda d: d + "\nextra: 1\n", "extra", "unknown key"),
        (
            lambda d: d.replace("    candidates: [{backend: up}]", "    candidates: []"),
            "routes[0].candidates",
            "at least one",
        ),
        (
            lambda d: d.replace("name: default", "name: default\n    strategy: random"),
            "routes[0].strategy",
            "must be one of",
        ),
        # Issue #9 item 4: every accepted key means something; the rest are refused.
        (
            lambda d: d.replace("quality: 0.7", "quality: 0.7\n    capabilities: {output_formats: [gif]}"),
            "backends.up.capabilities.output_formats[0]",
            "must be one of 'png', 'jpeg', 'webp'",
        ),
        (
            lambda d: d.replace("quality: 0.7", "quality: 0.7\n    capabilities: {output_formats: []}"),
            "backends.up.capabilities",
            "at least one format",
        ),
        (
            lambda d: d.replace("quality: 0.7", "quality: 0.7\n    capabilities: {seed: maybe}"),
            "backends.up.capabilities.seed",
            "true or false",
        ),
        (
            lambda d: d.replace("{quality_floor: 0.5,", "{name: gold, quality_floor: 0.5,"),
            "tiers.standard.name",
            "unknown key",
        ),
        (lambda d: "server: {startup_wait_s: -1}\n" + d, "server.startup_wait_s", "0 or more"),
    ],
)
def test_invalid_config_names_file_key_and_reason(monkeypatch, mutate, path, reason):
    monkeypatch.setenv("TEST_KEY", "k")
    with pytest.raises(ConfigError) as err:
        load_config_text(mutate(BASE), "my-routes.yaml")
    assert err.value.source == "my-routes.yaml"
    assert err.value.path == path
    assert reason in err.value.reason
    assert str(err.value).startswith("my-routes.yaml: ")


def test_missing_environment_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TEST_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config_text(BASE, "r.yaml")
    assert err.value.path == "backends.up.settings.api_key"
    assert "TEST_KEY is not set" in err.value.reason


OPTIONAL = """
backends:
  up:
    type: openai
    settings: {base_url: "http://127.0.0.1:9/v1", api_key: "${TEST_KEY:-}"}
  paid:
    type: openai
    enabled_if_env: OPTIONAL_KEY
    settings: {base_url: "http://127.0.0.1:9/v1", api_key: "${OPTIONAL_KEY}"}
routes:
  - name: default
    candidates: [{backend: up}, {backend: paid}]
"""


def test_env_default_and_enabled_if_env(monkeypatch):
    monkeypatch.delenv("OPTIONAL_KEY", raising=False)
    monkeypatch.delenv("TEST_KEY", raising=False)
    cfg = load_config_text(OPTIONAL, "r.yaml")
    assert cfg.backends["up"].spec.settings.api_key == ""
    assert "paid" not in cfg.backends and "OPTIONAL_KEY" in cfg.disabled["paid"]
    assert [c.backend for c in cfg.routes[0].candidates] == ["up"]
    monkeypatch.setenv("OPTIONAL_KEY", "sk-opt-0000000")
    cfg = load_config_text(OPTIONAL, "r.yaml")
    assert [c.backend for c in cfg.routes[0].candidates] == ["up", "paid"]


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("backends: [\n  oops: {\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.source == str(path) and "line" in err.value.path


def test_repo_default_config_is_valid():
    cfg = load_config("routes.yaml")
    assert cfg.routes and cfg.tiers


# -- route options and capabilities are the router's business, checked at load (issue #8 item 6) --------

LOCAL = """
backends:
  local:
    type: local_sdxl
    capabilities: {max_n: 4}
    settings: {preset: tiny, shapes: [{width: 64, height: 64, batch: 2}, {width: 64, height: 64, batch: 4},
               {width: 96, height: 64, batch: 1}], unlisted_shape: UNLISTED}
routes:
  - name: preview
    candidates: [{backend: local, options: OPTIONS}]
"""


def local_config(options: str = "{decoder: taesd}", unlisted: str = "eager", caps: str = "{max_n: 4}"):
    text = LOCAL.replace("OPTIONS", options).replace("UNLISTED", unlisted).replace("{max_n: 4}", caps)
    return load_config_text(text, "local.yaml")


@pytest.mark.parametrize(
    ("options", "path", "reason"),
    [
        ("{decoder: tiny}", "routes[0].candidates[0].options.decoder", "must be one of 'full', 'taesd', got 'tiny'"),
        ("{decodr: taesd}", "routes[0].candidates[0].options.decodr", "unknown key (allowed: decoder)"),
        ("{decoder: 3}", "routes[0].candidates[0].options.decoder", "must be one of 'full', 'taesd'"),
    ],
)
def test_route_options_are_typed_and_checked_at_load(options, path, reason):
    with pytest.raises(ConfigError) as err:
        local_config(options)
    assert err.value.source == "local.yaml" and err.value.path == path
    assert reason in err.value.reason


def test_valid_route_options_reach_the_candidate():
    cfg = local_config("{decoder: taesd}")
    assert dict(cfg.routes[0].candidates[0].options) == {"decoder": "taesd"}
    assert dict(local_config("{}").routes[0].candidates[0].options) == {}


def test_imagegate_check_names_file_key_and_allowed_values(tmp_path, capsys):
    from gateway.cli import main

    path = tmp_path / "routes.yaml"
    path.write_text(LOCAL.replace("OPTIONS", "{decoder: vqgan}").replace("UNLISTED", "eager"))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: routes[0].candidates[0].options.decoder: must be one of 'full', 'taesd', got 'vqgan'" in err


class HookedBackend:
    """A backend class with the config-time hooks, to test the mechanism apart from any real backend."""

    @dataclass(frozen=True)
    class Settings:
        styles: tuple[str, ...] = ("plain",)

    @dataclass(frozen=True)
    class Options:
        style: str = "plain"

    @staticmethod
    def check_options(settings, options) -> None:
        if options.style not in settings.styles:
            raise ValueError(f"style {options.style!r} is not configured (configured: {', '.join(settings.styles)})")


def test_options_are_checked_against_the_backends_settings(monkeypatch):
    from backends import registry

    monkeypatch.setitem(registry.BACKEND_TYPES, "hooked", f"{__name__}:HookedBackend")
    doc = """
backends:
  h: {type: hooked, settings: {styles: [plain, sketch]}}
routes:
  - name: r
    candidates: [{backend: h, options: {style: STYLE}}]
"""
    assert load_config_text(doc.replace("STYLE", "sketch"), "h.yaml").routes[0].candidates[0].options == {
        "style": "sketch"
    }
    with pytest.raises(ConfigError) as err:
        load_config_text(doc.replace("STYLE", "oil"), "h.yaml")
    assert err.value.path == "routes[0].candidates[0].options"
    assert "style 'oil' is not configured (configured: plain, sketch)" in err.value.reason


def test_refusing_unlisted_shapes_narrows_the_capabilities():
    caps = local_config(unlisted="refuse").backends["local"].capabilities
    assert caps.sizes == ("64x64", "96x64")
    assert dict(caps.max_n_per_size) == {"64x64": 4, "96x64": 1}
    # Declared capabilities still bound it: max_n 3 caps the 64x64 batch of 4; 96x64 is not declared.
    caps = local_config(unlisted="refuse", caps='{max_n: 3, sizes: ["64x64"]}').backends["local"].capabilities
    assert caps.sizes == ("64x64",) and dict(caps.max_n_per_size) == {"64x64": 3}
    # Eager runs anything: the declared capabilities stand.
    assert local_config(unlisted="eager").backends["local"].capabilities.sizes == ()


def test_refusing_every_listed_shape_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        local_config(unlisted="refuse", caps='{sizes: ["1024x1024"]}')
    assert err.value.path == "backends.local.settings.shapes"
    assert "no listed shape (64x64, 96x64) is within the declared capabilities" in err.value.reason
