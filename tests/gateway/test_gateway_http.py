"""The gateway end to end over real HTTP on 127.0.0.1: fallback on every retryable failure class, none
on caller errors, truthful headers, no secrets anywhere, metrics that count."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

import httpx
import orjson
import pytest
import structlog
from PIL import Image as PILImage
from prometheus_client.parser import text_string_to_metric_families

from backends.base import Image, ImageRequest, ImageResult, Load, StageClock
from gateway.config import load_config_text
from tests.fakes.openai_stub import OpenAIStub, tiny_png
from tests.fakes.raw_server import serve_raw
from tests.servers import free_port, serve_app, serve_gateway
from tests.servers import post_generation as _post

SECRET = "sk-test-SECRET-0123456789abcdef"


def config(bad_url: str, good_url: str, *, extra: str = "", strategy: str = "fallback", cooldown: int = 0):
    return load_config_text(
        f"""
server: {{max_body_bytes: 4096, default_deadline_s: 20, max_retries: 1, retry_backoff_s: 0.01,
          timing_allow_origin: "*", cooldown_failures: {cooldown}, cooldown_s: 30}}
backends:
  bad:
    type: openai
    cost: {{per_image: 0.04}}
    timeouts: {{connect: 1, read: 0.4, total: 2}}
    settings: {{base_url: "{bad_url}/v1", api_key: "{SECRET}"}}
  good:
    type: openai
    cost: {{per_megapixel: 0.01}}
    settings: {{base_url: "{good_url}/v1"}}
  unpriced:
    type: openai
    settings: {{base_url: "{good_url}/v1"}}
tiers:
  standard: {{quality_floor: 0.0}}
routes:
  - name: free
    match: {{models: [free]}}
    candidates: [{{backend: unpriced}}]
  - name: main
    strategy: {strategy}
    candidates: [{{backend: bad}}, {{backend: good}}]
default_tier: standard
{extra}
""",
        "test-routes.yaml",
    )


@pytest.fixture(scope="module")
def stubs():
    bad, good = OpenAIStub(), OpenAIStub()
    with serve_app(bad) as bad_url, serve_app(good) as good_url:
        yield bad, bad_url, good, good_url


@pytest.fixture(scope="module")
def gateway(stubs):
    _, bad_url, _, good_url = stubs
    with serve_gateway(config(bad_url, good_url)) as base:
        yield base


@pytest.fixture(autouse=True)
def reset(stubs):
    bad, _, good, _ = stubs
    bad.script.clear(), good.script.clear(), bad.seen.clear(), good.seen.clear()


def post(base: str, body: dict | bytes, **kwargs: Any) -> httpx.Response:
    """``post_generation``, with the round trip the client measured (ms) in ``extensions["client_ms"]``."""
    began = time.perf_counter()
    resp = _post(base, body, **kwargs)
    resp.extensions["client_ms"] = (time.perf_counter() - began) * 1e3
    return resp


def server_timing(resp: httpx.Response) -> dict[str, float]:
    out = {}
    for part in resp.headers["server-timing"].split(","):
        name, *params = [p.strip() for p in part.split(";")]
        out[name] = float(next(p for p in params if p.startswith("dur="))[4:])
    return out


EPS_MS = 0.002  # the headers are rounded to 0.001 ms


def assert_consistent_headers(resp: httpx.Response) -> None:
    """The timing headers against what the client itself measured: the gateway's clock runs from the request's
    arrival to the response's hand-over, inside the client's round trip, so neither its total nor the time it
    says it waited on backends can exceed that round trip; its own overhead is never negative."""
    st = server_timing(resp)
    client_ms = resp.extensions["client_ms"]
    assert 0 <= st["total"] <= client_ms + EPS_MS
    assert 0 <= st["backend"] <= st["total"] + EPS_MS
    assert st["gateway"] >= 0
    assert resp.headers["x-gateway-overhead-ms"] == f"{st['gateway']:.3f}"
    for name in ("x-request-id", "x-backend", "x-route", "x-attempts", "x-cost-usd"):
        assert name in resp.headers
    assert resp.headers["timing-allow-origin"] == "*"


class BurningBackend:
    """Spends ``burn_s`` of blocking work on the gateway's event loop (as slow parsing or a decode in the
    gateway would: not backend time), then waits ``wait_s`` on "the backend" (counted on its StageClock).
    Records both as it measured them itself."""

    Settings = object

    def __init__(self, spec: Any, burn_s: float, wait_s: float) -> None:
        self.spec = spec
        self.burn_s, self.wait_s = burn_s, wait_s
        self.burned: list[float] = []
        self.waited: list[float] = []
        self.b64 = base64.b64encode(tiny_png()).decode()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        began = time.perf_counter()
        time.sleep(self.burn_s)  # noqa: ASYNC251 - on purpose: blocks the loop, the gateway's own time
        self.burned.append(time.perf_counter() - began)
        with clock.waiting():
            began = time.perf_counter()
            await asyncio.sleep(self.wait_s)
            self.waited.append(time.perf_counter() - began)
        return ImageResult(tuple(Image(format="png", b64=self.b64) for _ in range(request.n)))


ONE_BACKEND = """
server: {timing_allow_origin: "*"}
backends:
  up:
    type: openai
    settings: {base_url: "http://127.0.0.1:9/v1"}
tiers:
  standard: {quality_floor: 0.0}
routes:
  - name: main
    candidates: [{backend: up}]
default_tier: standard
"""


def test_timing_headers_against_the_latency_the_client_measures():
    config = load_config_text(ONE_BACKEND, "test-one-backend.yaml")
    backend = BurningBackend(config.backends["up"].spec, burn_s=0.02, wait_s=0.03)
    with serve_gateway(config, {"up": backend}) as base:
        for _ in range(3):
            resp = post(base, {"prompt": "a cat", "size": "64x64"})
            assert resp.status_code == 200, resp.text
            assert_consistent_headers(resp)
            st = server_timing(resp)
            client_ms = resp.extensions["client_ms"]
            burned_ms, waited_ms = backend.burned[-1] * 1e3, backend.waited[-1] * 1e3
            # The backend's wait is backend time; the blocking work is the gateway's, however it is awaited.
            assert st["backend"] >= waited_ms - EPS_MS
            assert st["backend"] <= client_ms - burned_ms + EPS_MS
            assert float(resp.headers["x-gateway-overhead-ms"]) >= burned_ms - EPS_MS
            assert float(resp.headers["x-gateway-overhead-ms"]) <= client_ms - waited_ms + EPS_MS
            assert st["total"] >= burned_ms + waited_ms - EPS_MS


def test_success_headers_and_body(gateway, stubs):
    resp = post(gateway, {"prompt": "a cat", "size": "512x512"}, headers={"x-request-id": "abc-123"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.headers["x-backend"] == "bad" and resp.headers["x-attempts"] == "1"
    assert resp.headers["x-cost-usd"] == "0.040000"
    assert resp.headers["x-route"] == "main"
    assert_consistent_headers(resp)
    data = orjson.loads(resp.content)["data"]
    assert PILImage.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).format == "PNG"


@pytest.mark.parametrize("failure", ["status:500", "status:503", "retry-after:0", "hang:1.0", "badjson", "status:401"])
def test_falls_back_on_each_retryable_failure(gateway, stubs, failure):
    bad, _, _, _ = stubs
    bad.script.extend([failure, failure])
    resp = post(gateway, {"prompt": "a cat", "size": "512x512"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-backend"] == "good"
    assert int(resp.headers["x-attempts"]) >= 2
    assert resp.headers["x-cost-usd"] == f"{0.01 * 512 * 512 / 1e6:.6f}"
    assert_consistent_headers(resp)


def test_retry_after_is_honoured_on_the_same_backend(gateway, stubs):
    bad, _, good, _ = stubs
    bad.script.extend(["retry-after:0"])
    resp = post(gateway, {"prompt": "a cat"})
    assert resp.status_code == 200
    assert resp.headers["x-backend"] == "bad" and resp.headers["x-attempts"] == "2"
    assert len(good.seen) == 0


def test_connection_refused_and_reset_mid_body_fall_back(stubs):
    _, _, _, good_url = stubs
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_gateway(config(dead, good_url)) as base:
        resp = post(base, {"prompt": "a cat"})
        assert resp.status_code == 200 and resp.headers["x-backend"] == "good"
        assert resp.headers["x-attempts"] == "3"  # refused twice (connect errors are safe to retry), then good
    lie = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{"data": ['
    with serve_raw(lie) as liar, serve_gateway(config(liar, good_url)) as base:
        resp = post(base, {"prompt": "a cat"})
        assert resp.status_code == 200 and resp.headers["x-backend"] == "good"
        assert resp.headers["x-attempts"] == "2"  # broken mid-body: may have run, not retried on the same


def test_caller_error_from_a_backend_does_not_fall_back(gateway, stubs):
    bad, _, good, _ = stubs
    bad.script.append("status:400")
    resp = post(gateway, {"prompt": "a cat"})
    assert resp.status_code == 422
    err = orjson.loads(resp.content)["error"]
    assert err["code"] == "backend_rejected" and "upstream says 400" in err["message"]
    assert len(good.seen) == 0
    assert_consistent_headers(resp)


def test_all_failed_lists_attempts_without_secrets(gateway, stubs):
    bad, _, good, _ = stubs
    bad.script.extend(["status:500", "status:500"])
    good.script.extend(["status:502"])
    resp = post(gateway, {"prompt": "a cat"})
    assert resp.status_code == 502
    err = orjson.loads(resp.content)["error"]
    assert err["code"] == "all_backends_failed"
    assert "bad: HTTP 500" in err["message"] and "good: HTTP 502" in err["message"]
    assert SECRET not in resp.text and SECRET not in str(resp.headers)
    assert_consistent_headers(resp)
    # The upstream did receive the key: it is used, just never shown.
    assert bad.headers_seen[-1]["authorization"] == f"Bearer {SECRET}"


def test_all_overloaded_is_503_with_retry_after(gateway, stubs):
    bad, _, good, _ = stubs
    bad.script.extend(["status:503", "status:503"])
    good.script.extend(["retry-after:3", "retry-after:3"])
    resp = post(gateway, {"prompt": "a cat"})
    assert resp.status_code == 503
    assert orjson.loads(resp.content)["error"]["code"] == "all_backends_overloaded"
    assert resp.headers["retry-after"] == "3"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{bad", {"content-type": "application/json"}, 400, "invalid_request"),
        ({"prompt": ""}, {}, 400, "invalid_request"),
        ({"prompt": "x", "n": 50}, {}, 400, "invalid_request"),
        ({"prompt": "x", "size": "12x"}, {}, 400, "invalid_request"),
        ({"prompt": "x", "model": "dall-e-9"}, {}, 404, "model_not_found"),
        ({"prompt": "x", "tier": "gold"}, {}, 400, "invalid_request"),
        ({"prompt": "x" * 5000}, {}, 413, "payload_too_large"),
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ({"prompt": "x", "max_cost_usd": 0.000001}, {}, 402, "budget_exceeded"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(gateway, stubs, body, headers, status, code):
    bad, _, good, _ = stubs
    resp = post(gateway, body, headers=headers)
    assert resp.status_code == status, resp.text
    err = orjson.loads(resp.content)["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in resp.text
    assert_consistent_headers(resp)
    assert not bad.seen and not good.seen


def test_unknown_price_is_reported_as_unknown(gateway):
    resp = post(gateway, {"prompt": "a cat", "model": "free"})
    assert resp.status_code == 200 and resp.headers["x-cost-usd"] == "unknown"


def test_output_format_is_transcoded_and_url_responses_served(gateway):
    resp = post(gateway, {"prompt": "a cat", "output_format": "jpeg", "response_format": "url"})
    assert resp.status_code == 200
    url = orjson.loads(resp.content)["data"][0]["url"]
    assert url.startswith(gateway + "/v1/images/files/")
    img = httpx.get(url)
    assert img.headers["content-type"] == "image/jpeg"
    assert PILImage.open(io.BytesIO(img.content)).format == "JPEG"
    assert httpx.get(gateway + "/v1/images/files/nope.png").status_code == 404


def test_openai_sdk_talks_to_the_gateway(gateway):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a cat", size="1024x1024", extra_headers={"X-Imagegate-Seed": "3"})
    assert result.data[0].b64_json
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a cat", n=20)
    assert "between 1 and 10" in str(err.value)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_attempts_and_spend(stubs):
    bad, bad_url, good, good_url = stubs
    with serve_gateway(config(bad_url, good_url)) as base:  # a fresh app: its own registry, all counts zero
        for _ in range(3):
            assert post(base, {"prompt": "a cat"}).headers["x-backend"] == "bad"
        bad.script.append("status:500")
        assert post(base, {"prompt": "a cat"}).headers["x-backend"] == "good"  # served by the fallback
        bad.script.append("status:500")
        good.script.append("status:502")
        assert post(base, {"prompt": "a cat"}).status_code == 502  # every backend failed
        text = httpx.get(base + "/metrics").text
    got = samples(text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("imagegate_requests_total", route="main", backend="bad", outcome="ok") == 3.0
    assert value("imagegate_requests_total", route="main", backend="good", outcome="ok") == 1.0
    failures = {
        labels: v
        for (name, labels), v in got.items()
        if name == "imagegate_requests_total" and ("outcome", "ok") not in labels
    }
    assert list(failures.values()) == [1.0]
    assert dict(next(iter(failures)))["backend"] == "none" and dict(next(iter(failures)))["route"] == "main"
    assert value("imagegate_backend_attempts_total", backend="bad", outcome="ok") == 3.0
    assert value("imagegate_backend_attempts_total", backend="bad", outcome="backend.backend_failed") == 2.0
    assert value("imagegate_backend_attempts_total", backend="good", outcome="ok") == 1.0
    assert value("imagegate_backend_attempts_total", backend="good", outcome="backend.backend_failed") == 1.0
    assert value("imagegate_fallbacks_total", route="main") == 1.0
    assert value("imagegate_estimated_spend_usd_total", backend="bad") == pytest.approx(3 * 0.04)
    assert value("imagegate_estimated_spend_usd_total", backend="good") == pytest.approx(0.01 * 1024 * 1024 / 1e6)
    assert value("imagegate_request_duration_seconds_count", route="main", outcome="ok") == 4.0
    assert value("imagegate_gateway_overhead_seconds_count", route="main") == 5.0
    assert value("imagegate_backend_latency_seconds_count", backend="bad", outcome="ok") == 3.0
    assert value("imagegate_backend_ready", backend="good") == 1.0
    assert "a cat" not in text and SECRET not in text


def test_one_json_log_line_per_request_without_prompt_or_secret(gateway, stubs):
    bad, _, _, _ = stubs
    bad.script.extend(["status:500", "status:500"])
    with structlog.testing.capture_logs() as logs:
        post(gateway, {"prompt": "a very secret prompt"})
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["backend"] == "good" and line["attempts"] == 2 and line["status"] == 200
    assert line["gateway_ms"] >= 0 and line["backend_ms"] > 0 and line["cost_usd"] > 0
    assert "a very secret prompt" not in repr(logs) and SECRET not in repr(logs)


def test_health_models_config_endpoints(gateway):
    assert httpx.get(gateway + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway + "/readyz").json()
    assert ready["ready"] and ready["backends"]["good"]["state"] == "started"
    models = httpx.get(gateway + "/v1/models").json()
    ids = {m["id"]: m for m in models["data"]}
    assert set(ids) == {"free", "standard"}
    assert {b["name"] for b in ids["standard"]["backends"]} == {"bad", "good"}
    cfg = httpx.get(gateway + "/v1/config")
    assert cfg.status_code == 200 and SECRET not in cfg.text
    resp = httpx.get(gateway + "/nope")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = httpx.get(gateway + "/v1/images/generations")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_repeated_failures_cool_a_backend_down(stubs):
    bad, bad_url, _, good_url = stubs
    with serve_gateway(config(bad_url, good_url, cooldown=2)) as base:
        bad.script.extend(["status:500"] * 4)
        for _ in range(2):
            assert post(base, {"prompt": "a cat"}).headers["x-backend"] == "good"
        served_by_bad = len(bad.seen)
        resp = post(base, {"prompt": "a cat"})
        # Demoted: good is tried first now, bad is not even attempted.
        assert resp.headers["x-backend"] == "good" and resp.headers["x-attempts"] == "1"
        assert len(bad.seen) == served_by_bad


def test_policy_errors_still_name_the_route(gateway):
    with structlog.testing.capture_logs() as logs:
        resp = post(gateway, {"prompt": "x", "max_cost_usd": 0.000001})
    assert resp.status_code == 402 and resp.headers["x-route"] == "main"
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["route"] == "main" and line["outcome"] == "policy.budget_exceeded"
