"""Secrets reach no sink (issue #8 item 2): every secret field of every remote backend type is set from
``${ENV}`` with a distinctive value, requests fail in every way that can carry a key back (an upstream 401
echoing it, an upstream 500 quoting it, a backend raising an unexpected exception with it in the message,
a 500 from the handler logged with its traceback), and no secret value may appear in the log lines, the
error bodies, the response headers, ``/v1/config``, ``/metrics``, ``/readyz``, ``/v1/models`` or the output
of ``imagegate check``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import backends.openai_compat
from backends import registry
from gateway import api, logs
from gateway.cli import main
from gateway.config import load_config_text
from tests.fakes.echo_upstream import EchoUpstream
from tests.fakes.log_sink import json_logs
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import post_generation, serve_app, serve_gateway

# A settings field whose name says it holds a credential (header maps count: see gateway/redact.py).
_SECRET_FIELD = re.compile(r"(key|token|secret|password|headers)$")

ENV = {
    "SINK_OPENAI_KEY": "sink-openai-key-a1b2c3d4e5",
    "SINK_OPENAI_HEADER": "sink-openai-header-f6a7b8c9",
    "SINK_REPLICATE_TOKEN": "sink-replicate-token-0d1e2f3a",
    "SINK_COG_TOKEN": "sink-cog-token-4b5c6d7e",
    "SINK_FAL_KEY": "sink-fal-key-id:sink-fal-key-secret-8f9a",
    "SINK_TRITON_KEY": "sink-triton-key-1b2c3d4e",
    "SINK_TRITON_HEADER": "sink-triton-header-5f6a7b8c",
    "SINK_OK_KEY": "sink-ok-key-9d0e1f2a3b",
}


def settings_for(type_name: str, upstream: str) -> dict[str, Any]:
    """Each remote type against the echoing upstream, every secret field from ${ENV}."""
    settings: dict[str, dict[str, Any]] = {
        "openai": {
            "base_url": f"{upstream}/v1",
            "api_key": "${SINK_OPENAI_KEY}",
            "extra_headers": {"X-Org-Id": "${SINK_OPENAI_HEADER}"},
        },
        "replicate": {
            "api_token": "${SINK_REPLICATE_TOKEN}",
            "base_url": upstream,
            "model": "a/b",
            "family": "flux_schnell",
        },
        "cog": {"base_url": upstream, "api_token": "${SINK_COG_TOKEN}", "health_interval": 60},
        "fal": {
            "key": "${SINK_FAL_KEY}",
            "app": "fal-ai/fast-sdxl",
            "queue_base_url": upstream,
            "run_base_url": upstream,
        },
        "triton": {
            "base_url": upstream,
            "model": "image",
            "api_key": "${SINK_TRITON_KEY}",
            "headers": {"X-Tenant-Token": "${SINK_TRITON_HEADER}"},
        },
    }
    return settings[type_name]


# The embedded SDXL backend runs in-process: it has no credential (model ids and paths only).
REMOTE_TYPES = sorted(set(registry.BACKEND_TYPES) - {"local_sdxl"})


def config_text(upstream: str, ok_upstream: str) -> str:
    backends = "".join(
        f"  {t}:\n    type: {t}\n    timeouts: {{connect: 2, read: 5, total: 10}}\n"
        f"    settings: {orjson.dumps(settings_for(t, upstream)).decode()}\n"
        for t in REMOTE_TYPES
    )
    return f"""
server: {{default_deadline_s: 20, max_retries: 0, cooldown_failures: 0}}
backends:
{backends}  ok:
    type: openai
    settings: {{base_url: "{ok_upstream}/v1", api_key: "${{SINK_OK_KEY}}"}}
routes:
  - name: failing
    match: {{models: [failing]}}
    candidates: [{", ".join(f"{{backend: {t}}}" for t in REMOTE_TYPES)}]
  - name: rendering
    match: {{models: [rendering]}}
    candidates: [{{backend: ok}}]
"""


def test_every_secret_field_of_every_remote_type_is_set() -> None:
    for type_name in REMOTE_TYPES:
        fields = {
            f.name
            for f in dataclasses.fields(registry.backend_class(type_name).Settings)
            if f.init and _SECRET_FIELD.search(f.name)
        }
        configured = settings_for(type_name, "http://127.0.0.1:9")
        assert fields and fields <= set(configured), f"{type_name}: set {sorted(fields - set(configured))} here"
        assert all("${SINK_" in orjson.dumps(configured[f]).decode() for f in fields)


def _leaks(text: str) -> list[str]:
    return [name for name, value in ENV.items() if value in text]


def test_no_secret_in_any_sink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    echo, ok = EchoUpstream(), OpenAIStub()
    seen: dict[str, str] = {}  # sink → what it showed
    with serve_app(echo) as upstream, serve_app(ok) as ok_upstream, json_logs() as sink:
        text = config_text(upstream, ok_upstream)
        config = load_config_text(text, "sinks.yaml")
        assert set(ENV.values()) <= set(config.secrets)
        logs.set_secrets(config.secrets)  # what the app does at start (see gateway.logs)
        path = tmp_path / "routes.yaml"
        path.write_text(text)
        assert main(["check", str(path)]) == 0
        seen["imagegate check"] = capsys.readouterr().out
        with serve_gateway(config) as gateway:

            def call(label: str, model: str) -> httpx.Response:
                response = post_generation(gateway, {"prompt": "a cat", "model": model})
                seen[f"{label}: body"] = response.text
                seen[f"{label}: headers"] = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
                return response

            for status in (401, 500):  # an upstream echoing the key back, in a rejection and in a 500
                echo.status = status
                response = call(f"upstream {status}", "failing")
                assert response.status_code == 502, response.text
                assert all(f"{t}: HTTP {status}" in response.text for t in REMOTE_TYPES), response.text
            with monkeypatch.context() as patch:  # a backend bug quoting the key

                def buggy(*args: object, **kwargs: object) -> dict:
                    raise RuntimeError(f"cannot build the body for {' '.join(ENV.values())}")

                patch.setattr(backends.openai_compat, "to_body", buggy)
                assert call("backend bug", "failing").status_code == 502
            with monkeypatch.context() as patch:  # a gateway bug quoting the key: 500, logged with a traceback

                def broken(*args: object, **kwargs: object) -> bytes:
                    raise RuntimeError(f"cannot render for {' '.join(ENV.values())}")

                patch.setattr(api, "render_images", broken)
                assert call("gateway bug", "rendering").status_code == 500
            for endpoint in ("/v1/config", "/metrics", "/readyz", "/v1/models"):
                seen[endpoint] = httpx.get(gateway + endpoint, timeout=10).text
        seen["log"] = sink.text()
    # The failures really went through every backend type with its credentials...
    sent = "\n".join(f"{k}: {v}" for _, _, headers in echo.seen for k, v in headers.items())
    assert not set(ENV) - {"SINK_OK_KEY"} - set(_leaks(sent)), "some credential was never sent upstream"
    assert any(line.get("exc_type") == "RuntimeError" for line in sink.lines()), "no traceback was logged"
    assert "[redacted]" in seen["upstream 401: body"] and "[redacted]" in seen["log"]
    # ...and came back from no sink.
    leaked = {where: _leaks(text) for where, text in seen.items() if _leaks(text)}
    assert not leaked, leaked
