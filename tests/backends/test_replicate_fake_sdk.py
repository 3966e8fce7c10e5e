"""The Replicate fake speaks what the real world expects: the official ``replicate`` client (1.0.x), pointed at
it with ``base_url=`` or ``REPLICATE_BASE_URL``, creates, waits on, polls, cancels and reads predictions, and
sees the API's errors as the errors it knows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.replicate_fake import MODELS, TOKEN, FakeReplicate, Scenario

pytest.importorskip("replicate", reason="the official replicate client is not installed")
import replicate
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput

SDXL_VERSION = MODELS["stability-ai/sdxl"].version


@pytest.fixture(scope="module")
def served() -> Iterator[FakeReplicate]:
    fake = FakeReplicate()
    with fake.serve():
        yield fake


@pytest.fixture()
def fake(served: FakeReplicate) -> FakeReplicate:
    served.reset()
    return served


@pytest.fixture()
def client(fake: FakeReplicate) -> Iterator[replicate.Client]:
    c = replicate.Client(api_token=TOKEN, base_url=fake.base_url, timeout=10)
    c.poll_interval = 0.05
    yield c
    c._client.close()  # the client has no close() of its own


def test_official_model_create_with_wait_returns_terminal_prediction(fake, client):
    prediction = client.models.predictions.create(
        model="black-forest-labs/flux-schnell",
        input={"prompt": "a fox", "num_outputs": 2, "aspect_ratio": "16:9"},
        wait=5,
    )
    assert prediction.status == "succeeded"
    assert len(prediction.output) == 2
    assert all(url.startswith(f"{fake.base_url}/delivery/") and url.endswith(".webp") for url in prediction.output)
    assert prediction.metrics is not None and "predict_time" in prediction.metrics
    create = fake.creates()[-1]
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.headers["prefer"] == "wait=5"
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    again = client.predictions.get(prediction.id)
    assert again.id == prediction.id and again.output == prediction.output


def test_run_reads_outputs_as_data_uris_and_from_delivery(fake, client):
    # Sync-mode data: URIs become FileOutput objects that decode in place.
    fake.plan(Scenario(output="data"))
    outputs = client.run(
        "black-forest-labs/flux-schnell", input={"prompt": "a fox", "output_format": "png", "megapixels": "0.25"}
    )
    assert len(outputs) == 1 and isinstance(outputs[0], FileOutput)
    assert outputs[0].read()[:8] == b"\x89PNG\r\n\x1a\n"
    # Delivery URLs: the client wraps only https: URLs itself, so wrap the fake's http: URL the same way.
    urls = client.run(
        "black-forest-labs/flux-schnell", input={"prompt": "a fox", "output_format": "jpg"}, use_file_output=False
    )
    assert urls[0].startswith(f"{fake.base_url}/delivery/")
    assert FileOutput(urls[0], client).read()[:3] == b"\xff\xd8\xff"


def test_version_and_deployment_creates(fake, client):
    by_version = client.predictions.create(
        version=SDXL_VERSION, input={"prompt": "x", "width": 256, "height": 128}, wait=True
    )
    assert by_version.status == "succeeded" and by_version.version == SDXL_VERSION
    assert fake.creates()[-1].body == {"version": SDXL_VERSION, "input": {"prompt": "x", "width": 256, "height": 128}}
    by_deployment = client.deployments.predictions.create("acme/sdxl-prod", input={"prompt": "y"}, wait=True)
    assert by_deployment.status == "succeeded" and by_deployment.model == "stability-ai/sdxl"
    assert fake.creates()[-1].path == "/v1/deployments/acme/sdxl-prod/predictions"


def test_non_terminal_sync_answer_then_wait_polls_to_completion(fake, client):
    fake.plan(Scenario(queue_s=0.3, run_s=1.2))
    prediction = client.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "slow"}, wait=1)
    assert prediction.status in ("starting", "processing")
    assert prediction.output is None
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.started_at and prediction.completed_at and prediction.created_at
    assert len([r for r in fake.requests if r.method == "GET"]) >= 1


def test_cancel(fake, client):
    fake.plan(Scenario(run_s=5))
    prediction = client.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "long"})
    assert prediction.status in ("starting", "processing")
    prediction.cancel()
    assert fake.cancels == [prediction.id]
    prediction.reload()
    assert prediction.status == "canceled"


def test_failed_prediction_raises_model_error(fake, client):
    fake.plan(Scenario(outcome="failed", error="NSFW content detected"))
    with pytest.raises(ModelError) as info:
        client.run("stability-ai/sdxl", input={"prompt": "bad"})
    assert info.value.prediction.error == "NSFW content detected"


def test_errors_are_problem_details(fake, client):
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(
            model="black-forest-labs/flux-schnell", input={"prompt": "x", "num_outputs": 9}
        )
    assert info.value.status == 422 and info.value.title == "Input validation failed"
    assert "input.num_outputs" in (info.value.detail or "")
    fake.plan(Scenario(http_status=429, retry_after="1"))
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "x"})
    assert info.value.status == 429
    bad = replicate.Client(api_token="r8_wrong", base_url=fake.base_url)
    with pytest.raises(ReplicateError) as info:
        bad.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "x"})
    bad._client.close()
    assert info.value.status == 401


def test_poll_retries_on_429_like_the_real_client(fake, client):
    fake.plan(Scenario(run_s=0.3, poll_status=429, poll_errors=2))
    prediction = client.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "x"})
    prediction.wait()  # the client's transport retries GETs on 429, honouring Retry-After
    assert prediction.status == "succeeded"


def test_base_url_from_environment(fake, monkeypatch):
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.base_url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    client = replicate.Client()
    prediction = client.models.predictions.create(model="stability-ai/sdxl", input={"prompt": "env"}, wait=True)
    client._client.close()
    assert prediction.status == "succeeded"
    assert fake.creates()[-1].headers["authorization"] == f"Bearer {TOKEN}"


async def test_async_client(fake):
    client = replicate.Client(api_token=TOKEN, base_url=fake.base_url)
    client.poll_interval = 0.05
    output = await client.async_run("black-forest-labs/flux-1.1-pro", input={"prompt": "async", "aspect_ratio": "3:2"})
    # flux-1.1-pro answers a single URL, not a list.
    assert isinstance(output, str) and output.startswith(f"{fake.base_url}/delivery/")
    data = await FileOutput(output, client).aread()
    await client._async_client.aclose()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
