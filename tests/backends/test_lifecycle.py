"""Every remote backend type, asked to generate before ``start()`` (or after ``aclose()``), answers with the
same error class: ``BackendUnavailable`` — no work can have started, so the dispatcher may retry or fall back."""

from __future__ import annotations

import pytest

from backends import registry
from backends.base import ImageRequest, StageClock
from backends.errors import BackendUnavailable
from gateway.config import load_config_text

DEAD = "http://127.0.0.1:9"
CONFIG = f"""
backends:
  openai: {{type: openai, settings: {{base_url: "{DEAD}/v1"}}}}
  replicate: {{type: replicate, settings: {{api_token: t, base_url: "{DEAD}", model: a/b, family: flux_schnell}}}}
  cog: {{type: cog, settings: {{base_url: "{DEAD}"}}}}
  fal: {{type: fal, settings: {{key: k, app: fal-ai/fast-sdxl}}}}
  triton: {{type: triton, settings: {{base_url: "{DEAD}", model: image, inputs: {{prompt: {{name: prompt}}}}}}}}
routes:
  - name: main
    candidates: [{{backend: openai}}, {{backend: replicate}}, {{backend: cog}}, {{backend: fal}}, {{backend: triton}}]
"""
REMOTE_TYPES = sorted(set(registry.BACKEND_TYPES) - {"local_sdxl"})


def test_the_config_covers_every_remote_type():
    assert sorted(load_config_text(CONFIG, "lifecycle.yaml").backends) == REMOTE_TYPES


@pytest.mark.parametrize("name", REMOTE_TYPES)
async def test_generate_before_start_and_after_close_is_unavailable(name):
    spec = load_config_text(CONFIG, "lifecycle.yaml").backends[name].spec
    backend = registry.create(spec)
    request = ImageRequest(prompt="p")
    with pytest.raises(BackendUnavailable, match="not started"):
        await backend.generate(request, StageClock())
    assert not backend.ready()
    await backend.aclose()  # closing a backend that never started is fine
    with pytest.raises(BackendUnavailable, match="not started"):
        await backend.generate(request, StageClock())
