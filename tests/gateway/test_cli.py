from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from gateway import __version__
from gateway.cli import main

CONFIG = """
backends:
  up:
    type: openai
    cost: {per_image: 0.02}
    settings: {base_url: "http://127.0.0.1:9/v1", api_key: "${CLI_TEST_KEY}"}
  later:
    type: openai
    enabled_if_env: CLI_UNSET_VAR
    settings: {base_url: "http://127.0.0.1:9/v1"}
tiers:
  standard: {quality_floor: 0.2, latency_budget_s: 10}
routes:
  - name: main
    strategy: cheapest
    candidates: [{backend: up, options: {decoder: taesd}}, {backend: later}]
default_tier: standard
"""


def test_check_prints_resolved_routes_without_secrets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-secret-99999")
    monkeypatch.delenv("CLI_UNSET_VAR", raising=False)
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "up" in out and "type=openai" in out and "per_image=0.02" in out and "$0.0200" in out
    assert "later            disabled: CLI_UNSET_VAR is not set" in out
    assert "standard         quality_floor=0.2 latency_budget_s=10.0 (default)" in out
    assert "strategy cheapest: up{'decoder': 'taesd'}" in out
    assert "sk-cli-secret-99999" not in out


def test_check_refuses_invalid_config_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLI_TEST_KEY", "k")
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG.replace("strategy: cheapest", "strategy: cheepest"))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: routes[0].strategy: must be one of" in err


def test_version():
    out = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"imagegate {__version__}"


def test_gateway_package_never_imports_torch():
    code = (
        "import sys, gateway.app, gateway.cli, gateway.config, backends.registry; "
        "from gateway.config import load_config; load_config('routes.yaml'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- serve (issue 8: items 7, 12, 13) ------------------------------------------------------------------------

LOCAL = """
backends:
  gpu: {type: local_sdxl, settings: {preset: tiny}}
tiers: {standard: {}}
routes:
  - {name: main, candidates: [{backend: gpu}]}
default_tier: standard
"""
REMOTE = """
server: {{keep_alive_s: 7, limit_concurrency: 123, header_timeout_s: 3, body_timeout_s: 4}}
backends:
  up: {{type: openai, settings: {{base_url: "{base}/v1"}}}}
tiers: {{standard: {{}}}}
routes:
  - {{name: main, candidates: [{{backend: up}}]}}
default_tier: standard
"""


def quiet_serve(monkeypatch) -> None:
    """``serve`` configures process-wide logging; not in the middle of a test session."""
    import gateway.logs

    monkeypatch.setattr(gateway.logs, "configure", lambda *args, **kwargs: None)


def record_uvicorn_run(monkeypatch) -> list[tuple[tuple, dict]]:
    import uvicorn

    quiet_serve(monkeypatch)
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_serve_refuses_several_workers_with_a_local_sdxl_backend(tmp_path, monkeypatch, capsys):
    calls = record_uvicorn_run(monkeypatch)
    path = tmp_path / "routes.yaml"
    path.write_text(LOCAL)
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--workers 2 cannot be used with a local_sdxl backend (gpu)" in err and "copy of the model" in err
    assert calls == []


def test_serve_runs_uvicorn_with_the_production_settings(tmp_path, monkeypatch):
    from gateway.app import Gateway
    from gateway.server import GatewayHttpProtocol, uvicorn_settings

    calls = record_uvicorn_run(monkeypatch)
    path = tmp_path / "routes.yaml"
    path.write_text(REMOTE.format(base="http://127.0.0.1:9"))
    assert main(["serve", "--config", str(path), "--port", "8123"]) == 0
    (app,), kwargs = calls[0]
    assert isinstance(app, Gateway)
    assert kwargs == uvicorn_settings(app.config, port=8123)  # one function for `serve` and the tests
    assert kwargs["http"] is GatewayHttpProtocol and kwargs["port"] == 8123
    assert (kwargs["timeout_keep_alive"], kwargs["limit_concurrency"]) == (7, 123)


def test_serve_with_workers_gives_them_one_image_directory(tmp_path, monkeypatch):
    from gateway.images import IMAGE_DIR_ENV

    seen: dict[str, Any] = {}

    def run(app, **kwargs):
        seen.update(app=app, workers=kwargs["workers"], image_dir=os.environ[IMAGE_DIR_ENV])
        assert os.path.isdir(seen["image_dir"])

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", run)
    quiet_serve(monkeypatch)
    monkeypatch.delenv(IMAGE_DIR_ENV, raising=False)
    monkeypatch.delenv("IMAGEGATE_CONFIG", raising=False)
    path = tmp_path / "routes.yaml"
    path.write_text(REMOTE.format(base="http://127.0.0.1:9"))
    assert main(["serve", "--config", str(path), "--workers", "3"]) == 0
    assert seen["app"] == "gateway.app:app_from_env" and seen["workers"] == 3
    assert not os.path.exists(seen["image_dir"])  # removed when the server stops


@pytest.mark.slow
def test_two_worker_processes_serve_each_others_url_images(tmp_path):
    """``imagegate serve --workers 2`` for real: every link handed out is served, whichever worker made it
    and whichever answers the GET (each request on a new connection, so both workers take turns)."""
    from tests.fakes.openai_stub import OpenAIStub
    from tests.servers import free_port, run_process, serve_app

    with serve_app(OpenAIStub()) as upstream:
        path = tmp_path / "routes.yaml"
        path.write_text(REMOTE.format(base=upstream))
        port = free_port()
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port), "--workers", "2"]
        with run_process(argv, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120):
            base = f"http://127.0.0.1:{port}"
            urls = []
            for _ in range(16):
                r = httpx.post(
                    base + "/v1/images/generations",
                    json={"prompt": "a fox", "size": "64x64", "response_format": "url"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                urls.append(r.json()["data"][0]["url"])
            statuses = [httpx.get(url, timeout=30).status_code for url in urls for _ in range(2)]
    assert statuses == [200] * len(statuses)
