from __future__ import annotations

import subprocess
import sys

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
    code = ("import sys, gateway.app, gateway.cli, gateway.config, backends.registry; "
            "from gateway.config import load_config; load_config('routes.yaml'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
