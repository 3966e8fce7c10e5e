"""No input of any shape yields a 500 or a traceback: arbitrary bodies and headers against the ASGI app."""

from __future__ import annotations

import asyncio

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.http import make_client
from gateway.app import create_app
from gateway.config import load_config_text
from tests.fakes.openai_stub import OpenAIStub

CONFIG = """
server: {max_body_bytes: 2048}
backends:
  stub: {type: openai, cost: {per_image: 0.01}, settings: {base_url: "http://stub.invalid/v1"}}
tiers: {standard: {}, preview: {}}
routes:
  - {name: main, candidates: [{backend: stub}]}
default_tier: standard
"""

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
              st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=10,
)
fields = st.sampled_from(["prompt", "n", "size", "model", "tier", "seed", "steps", "quality", "response_format",
                          "output_format", "output_compression", "guidance_scale", "max_cost_usd", "stream"])
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(fields, json_values, max_size=6).map(orjson.dumps),
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)},
                          optional={"n": st.integers(-3, 30), "size": st.text(max_size=12),
                                    "tier": st.sampled_from(["standard", "preview", "gold"])}).map(orjson.dumps),
)
headers = st.dictionaries(
    st.sampled_from(["content-type", "x-request-id", "x-imagegate-seed", "x-imagegate-tier", "x-imagegate-steps",
                     "x-imagegate-max-cost-usd"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=4,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, extra=headers)
def test_arbitrary_requests_get_a_well_formed_answer(body, extra):
    cfg = load_config_text(CONFIG, "fuzz")
    stub = OpenAIStub()
    app = create_app(cfg)

    async def run() -> httpx.Response:
        # In place of start(): the backend's client talks to the in-process stub app, not the network.
        backend = app.backends["stub"]
        backend._client = make_client(backend.spec, transport=httpx.ASGITransport(stub))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            try:
                return await client.post("/v1/images/generations", content=body, headers=extra)
            finally:
                await backend._client.aclose()

    resp = asyncio.run(run())
    assert resp.status_code != 500 and resp.status_code in (200, 400, 402, 404, 413, 415, 422, 502, 503)
    payload = orjson.loads(resp.content)
    if resp.status_code == 200:
        assert payload["data"]
    else:
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
        assert "Traceback" not in payload["error"]["message"]
    assert "server-timing" in resp.headers and "x-gateway-overhead-ms" in resp.headers
