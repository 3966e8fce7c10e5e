"""``GET /v1/models`` lists, per tier, only the backends that can ever serve it (issue #8 item 8): the
offline default must not offer ``local`` under ``premium``, whose quality floor it fails."""

from __future__ import annotations

import httpx
import pytest

from backends.base import ImageRequest, ImageResult, Load, StageClock
from gateway.app import create_app
from gateway.config import DEFAULT_CONFIG, load_config

KEYS = ("FAL_KEY", "REPLICATE_API_TOKEN", "OPENAI_API_KEY")


class Idle:
    Settings = object

    def __init__(self, spec) -> None:
        self.spec = spec

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        raise AssertionError("/v1/models generates nothing")


async def models(config) -> dict:
    app = create_app(config, backends={name: Idle(b.spec) for name, b in config.backends.items()})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        response = await client.get("/v1/models")
    assert response.status_code == 200
    return {m["id"]: m for m in response.json()["data"]}


async def test_offline_default_says_premium_has_no_backend(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    by_id = await models(load_config(DEFAULT_CONFIG))
    assert by_id["premium"]["backends"] == []
    assert by_id["premium"]["note"] == "no backend meets quality_floor 0.8"
    assert [b["name"] for b in by_id["standard"]["backends"]] == ["local"]
    assert [b["name"] for b in by_id["preview"]["backends"]] == ["local"]
    assert "note" not in by_id["standard"]


@pytest.mark.parametrize("key", ["OPENAI_API_KEY", "REPLICATE_API_TOKEN"])
async def test_a_tier_lists_only_backends_above_its_floor(monkeypatch, key):
    for other in KEYS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(key, "sk-test-0000")
    by_id = await models(load_config(DEFAULT_CONFIG))
    premium = [b["name"] for b in by_id["premium"]["backends"]]
    assert premium == [{"OPENAI_API_KEY": "openai", "REPLICATE_API_TOKEN": "replicate"}[key]]
    assert "note" not in by_id["premium"]
    assert all(b["quality"] >= 0.8 for b in by_id["premium"]["backends"])
