"""No credential ever reaches an output host, for every registered remote backend type.

Each backend type is configured the way users configure it (routes.yaml, every secret field from
``${ENV}``) against a fake of its API that answers with an output URL on a separate fake output host
(allow-listed). The output host records what it receives; none of the configured secret values may appear
in any request line or header it saw, and no cookie may come back (the host sets one on every answer, and
each backend fetches twice). The types come from the registry, so a new backend type is covered, or
fails here until it gets a case, automatically.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from backends import registry
from backends.base import BackendSpec, ImageRequest, StageClock, Timeouts
from backends.errors import OutputFetchError, OutputNotAllowed
from backends.http import OutputFetcher, fetch_output
from gateway.config import load_config_text
from tests.fakes.cog_fake import CogFake
from tests.fakes.fal_fake import FalFake
from tests.fakes.openai_stub import OpenAIStub
from tests.fakes.output_host import OutputHost
from tests.fakes.replicate_fake import FakeReplicate, Scenario
from tests.servers import serve_app, with_env

# Distinctive values, one per secret field of every backend type.
ENV = {
    "OC_OPENAI_KEY": "sk-oc-openai-key-5b1e0f9a",
    "OC_OPENAI_HEADER": "hdr-oc-openai-extra-77c2d1",
    "OC_REPLICATE_TOKEN": "r8_ocReplicateToken9d41be",
    "OC_COG_TOKEN": "cog-oc-proxy-token-3a8e55",
    "OC_FAL_KEY": "fal-oc-key-id:fal-oc-key-secret-c0de42",
}
SECRETS = tuple(ENV.values())
REMOTE_TYPES = sorted(set(registry.BACKEND_TYPES) - {"local_sdxl"})
FETCHES = 2  # two generations: a cookie kept from the first fetch would travel with the second


@dataclass
class Case:
    settings: dict[str, Any]
    api_saw_secret: Callable[[], bool]  # the API itself did get the credential (the test is not vacuous)


def _openai(output_url: str, allowed: str) -> Iterator[Case]:
    stub = OpenAIStub()
    stub.script = [f"url:{output_url}"] * FETCHES
    with serve_app(stub) as api:
        yield Case(
            {
                "base_url": f"{api}/v1",
                "api_key": "${OC_OPENAI_KEY}",
                "extra_headers": {"x-upstream-auth": "${OC_OPENAI_HEADER}"},
                "allowed_output_hosts": [allowed],
            },
            lambda: (
                stub.headers_seen[0].get("authorization") == f"Bearer {ENV['OC_OPENAI_KEY']}"
                and stub.headers_seen[0].get("x-upstream-auth") == ENV["OC_OPENAI_HEADER"]
            ),
        )


def _replicate(output_url: str, allowed: str) -> Iterator[Case]:
    fake = FakeReplicate(token=ENV["OC_REPLICATE_TOKEN"])  # answers 401 to any other token
    base = output_url.rsplit("/", 1)[0]
    fake.plan(*[Scenario(output_base=base) for _ in range(FETCHES)])
    with fake.serve() as api:
        yield Case(
            {
                "api_token": "${OC_REPLICATE_TOKEN}",
                "base_url": api,
                "model": "black-forest-labs/flux-schnell",
                "family": "flux_schnell",
                "poll_interval": 0.02,
                "allowed_output_hosts": [allowed],
            },
            lambda: len(fake.creates()) == FETCHES,
        )


def _cog(output_url: str, allowed: str) -> Iterator[Case]:
    fake = CogFake()
    fake.outputs = [output_url]  # as a container started with --upload-url answers
    with serve_app(fake) as api:
        yield Case(
            {"base_url": api, "api_token": "${OC_COG_TOKEN}", "allowed_output_hosts": [allowed], "health_interval": 60},
            lambda: any(h.get("authorization") == f"Bearer {ENV['OC_COG_TOKEN']}" for h in fake.headers_seen),
        )


def _fal(output_url: str, allowed: str) -> Iterator[Case]:
    fake = FalFake(key=ENV["OC_FAL_KEY"])  # answers 401 to any other key
    with fake.serve():
        fake.reset(output_base=output_url.rsplit("/", 1)[0])
        yield Case(
            {
                "key": "${OC_FAL_KEY}",
                "app": "fal-ai/fast-sdxl",
                "queue_base_url": fake.queue_url,
                "run_base_url": fake.run_url,
                "poll_interval": 0.01,
                "allowed_output_hosts": [allowed],
            },
            lambda: len(fake.jobs) == FETCHES,
        )


CASES: dict[str, Callable[[str, str], Iterator[Case]] | str] = {
    "openai": _openai,
    "replicate": _replicate,
    "cog": _cog,
    "fal": _fal,
    # KServe V2 answers with the tensor (or encoded image bytes) in the response body: there is no output
    # URL to fetch, so no request ever goes to a third host.
    "triton": "KServe V2 has no output URLs: images come back in the inference response itself",
}


def _config(type_name: str, settings: dict[str, Any]):
    yaml = (
        f"backends:\n  under_test:\n    type: {type_name}\n"
        f"    timeouts: {{connect: 2, read: 10, total: 20}}\n"
        f"    settings: {orjson.dumps(settings).decode()}\n"
        "routes:\n  - name: main\n    candidates: [{backend: under_test}]\n"
    )
    return with_env(lambda: load_config_text(yaml, f"{type_name}-credentials.yaml"), ENV)


@pytest.mark.parametrize("type_name", REMOTE_TYPES)
async def test_no_credential_reaches_the_output_host(type_name: str) -> None:
    case = CASES.get(type_name)
    assert case is not None, f"backend type {type_name!r} needs a case here (or a reason it has no output URLs)"
    if isinstance(case, str):
        pytest.skip(f"{type_name}: {case}")
    host = OutputHost()
    with serve_app(host) as output_base:
        allowed = output_base.split("://", 1)[1]
        with contextlib.contextmanager(case)(f"{output_base}/out/image.png", allowed) as c:
            config = _config(type_name, c.settings)
            assert set(config.secrets) <= set(SECRETS) and config.secrets, "the secrets come from ${ENV}"
            backend = registry.create(config.backends["under_test"].spec)
            await backend.start()
            try:
                for _ in range(FETCHES):
                    result = await backend.generate(
                        ImageRequest(prompt="a red fox", width=512, height=512), StageClock()
                    )
                    assert result.images and result.images[0].as_bytes() == host.image
            finally:
                await backend.aclose()
            assert c.api_saw_secret(), "the API did not receive the configured credential"
    assert len(host.requests) == FETCHES
    seen = host.header_text()
    leaked = [name for name, value in ENV.items() if value in seen]
    assert not leaked, f"{type_name} sent {leaked} to the output host:\n{seen}"
    assert not any(
        k in ("cookie", "authorization", "proxy-authorization") for r in host.requests for k, _ in r.headers
    ), seen


# -- the fetcher itself ----------------------------------------------------------------------------------


def _spec() -> BackendSpec:
    return BackendSpec(name="b", type="openai", settings=None, timeouts=Timeouts(connect=2, read=5, total=10))


async def test_fetch_output_takes_the_fetcher_only() -> None:
    png = "data:image/png;base64," + base64.b64encode(OutputHost().image).decode()
    async with httpx.AsyncClient(headers={"authorization": "Bearer api-key-0123456789"}) as api_client:
        with pytest.raises(TypeError, match="OutputFetcher"):
            # The API client where the fetcher belongs: refused.
            await fetch_output(api_client, png, StageClock(), backend="b", allowed_hosts=())  # type: ignore[arg-type]  # see above


async def test_output_urls_with_userinfo_and_redirects_are_not_followed() -> None:
    host = OutputHost()
    fetcher = OutputFetcher(_spec())
    with serve_app(host) as base:
        hostport = base.split("://", 1)[1]
        try:
            # httpx would turn userinfo into an Authorization header: refused before anything is sent.
            with pytest.raises(OutputNotAllowed, match="user info"):
                await fetch_output(
                    fetcher, f"http://u:pw@{hostport}/a.png", StageClock(), backend="b", allowed_hosts=(hostport,)
                )
            assert host.requests == []
            host.status = 302
            with pytest.raises(OutputFetchError, match="HTTP 302"):
                await fetch_output(fetcher, f"{base}/a.png", StageClock(), backend="b", allowed_hosts=(hostport,))
        finally:
            await fetcher.aclose()
    assert [r.path for r in host.requests] == ["/a.png"]  # the redirect's target was never asked for
