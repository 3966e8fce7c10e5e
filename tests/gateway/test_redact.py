"""``/v1/config`` redaction by value and position, not only by key name (issue #8 item 16; rules in
``gateway/redact.py``)."""

from __future__ import annotations

import orjson
import pytest

from gateway.config import load_config_text
from gateway.redact import REDACTED, looks_like_credential, redact_config

ENV = {"RD_KEY": "sk-rd-env-key-0a1b2c3d", "RD_PROXY_PASS": "rd-proxy-pass-77aa", "RD_TOKEN": "rd-token-5e6f7a8b"}
LITERALS = {
    "userinfo": "pa55-literal-userinfo",
    "header": "org-literal-header-1234",
    "query": "q-literal-apikey-9876",
    "body_named": "body-named-literal-secret",
    "body_prefixed": "sk-body-prefixed-literal-4242",
    "body_random": "Zx81kQ7vTq3LmN9pW2rY",
    "default": "default-literal-secret-31",
    "input_token": "hf_inputTokenLiteral0001",
    "option": "r8_routeOptionLiteral0002",
}
CONFIG = f"""
server: {{public_url: "https://gw:{LITERALS["userinfo"]}@images.example.com"}}
backends:
  up:
    type: openai
    description: "copy of the key: {ENV["RD_KEY"]}"
    settings:
      base_url: "https://proxy-user:{LITERALS["userinfo"]}@proxy.example.com/v1?api_key={LITERALS["query"]}&region=eu"
      api_key: "${{RD_KEY}}"
      model: gpt-image-1
      extra_headers:
        X-Org-Id: "{LITERALS["header"]}"
        Authorization: "Bearer ${{RD_TOKEN}}"
        X-Fallback: "${{RD_UNSET:-{LITERALS["default"]}}}"
      extra_body:
        style: vivid
        moderation: low
        lora: flux-1.1-pro-ultra-raw-v2
        seed_offset: 3
        provider_api_token: "{LITERALS["body_named"]}"
        auth: "{LITERALS["body_prefixed"]}"
        webhook: "{LITERALS["body_random"]}"
        reference: "${{RD_TOKEN}}"
  proxied:
    type: openai
    settings: {{base_url: "https://${{RD_PROXY_USER:-gw}}:${{RD_PROXY_PASS}}@proxy.example.com/v1"}}
  hosted:
    type: replicate
    settings:
      api_token: "${{RD_TOKEN}}"
      version: 7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc
      extra_input: {{hf_token_value: "{LITERALS["input_token"]}", scheduler: K_EULER}}
  kserve:
    type: triton
    settings:
      base_url: http://triton.internal:8000
      model: sdxl
      api_key_header: X-Api-Key
      api_key_prefix: ""
      headers: {{X-Tenant: tenant-a-0001}}
routes:
  - name: main
    candidates:
      - {{backend: up}}
      - {{backend: proxied}}
      - {{backend: hosted, options: {{input: {{key: "{LITERALS["option"]}"}}}}}}
"""


@pytest.fixture
def view(monkeypatch: pytest.MonkeyPatch) -> dict:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RD_UNSET", raising=False)
    monkeypatch.delenv("RD_PROXY_USER", raising=False)
    return load_config_text(CONFIG, "redact.yaml").redacted()


def test_no_secret_in_the_config_view(view: dict) -> None:
    text = orjson.dumps(view).decode()
    shown = [name for name, value in {**ENV, **LITERALS}.items() if value in text]
    assert not shown, f"{shown} in {text}"


def test_what_users_need_to_see_stays(view: dict) -> None:
    up = view["backends"]["up"]["settings"]
    # References and where things go.
    assert up["api_key"] == "${RD_KEY}"
    assert up["base_url"] == f"https://{REDACTED}@proxy.example.com/v1?api_key={REDACTED}&region=eu"
    assert view["server"]["public_url"] == f"https://{REDACTED}@images.example.com"
    assert (
        view["backends"]["proxied"]["settings"]["base_url"]
        == "https://${RD_PROXY_USER:-gw}:${RD_PROXY_PASS}@proxy.example.com/v1"
    )  # only references: shown
    assert view["backends"]["up"]["description"] == f"copy of the key: {REDACTED}"
    # Header names are shown, values only as references.
    assert up["extra_headers"] == {
        "X-Org-Id": REDACTED,
        "Authorization": "Bearer ${RD_TOKEN}",
        "X-Fallback": f"${{RD_UNSET:-{REDACTED}}}",
    }
    # Model options stay readable; credentials in the same map do not.
    assert up["extra_body"] == {
        "style": "vivid",
        "moderation": "low",
        "lora": "flux-1.1-pro-ultra-raw-v2",
        "seed_offset": 3,
        "provider_api_token": REDACTED,
        "auth": REDACTED,
        "webhook": REDACTED,
        "reference": "${RD_TOKEN}",
    }
    hosted = view["backends"]["hosted"]["settings"]
    assert hosted["version"] == "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc"
    assert hosted["extra_input"] == {"hf_token_value": REDACTED, "scheduler": "K_EULER"}
    kserve = view["backends"]["kserve"]["settings"]
    assert kserve["api_key_header"] == "X-Api-Key" and kserve["headers"] == {"X-Tenant": REDACTED}
    assert view["routes"][0]["candidates"][2] == {"backend": "hosted", "options": {"input": {"key": REDACTED}}}


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Zx81kQ7vTq3LmN9pW2rY", True),
        ("3f1c2b4e9a7d6c5b8e0f1a2b3c4d5e6f", True),
        ("sk-short", True),
        ("AKIAIOSFODNN7EXAMPLE", True),
        ("Bearer abc", True),
        ("flux-1.1-pro-ultra-raw-v2", False),
        ("stabilityai/stable-diffusion-xl-base-1.0", False),
        ("a watercolor of a fox, 4k", False),
        ("DPMSolverMultistep", False),
        ("https://example.com/x1y2z3a4b5c6", False),
        ("12345678901234567890123", False),
    ],
)
def test_looks_like_credential(text: str, secret: bool) -> None:
    assert looks_like_credential(text) is secret


def test_short_environment_values_do_not_garble_the_view() -> None:
    assert redact_config({"server": {"host": "http://127.0.0.1:8000"}}, ("1", "8000x")) == {
        "server": {"host": "http://127.0.0.1:8000"}
    }
