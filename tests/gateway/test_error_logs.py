"""A 500 is debuggable (issue #8 item 17): its log line carries the exception's type, message and traceback
as structured fields, scrubbed of the config's secrets, without local variables."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from gateway import api, logs
from gateway.config import load_config_text
from tests.fakes.log_sink import json_logs
from tests.fakes.openai_stub import OpenAIStub
from tests.servers import post_generation, serve_app, serve_gateway, with_env

SECRET = "sk-errlog-SECRET-4b5c6d7e8f"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """``json_logs`` configures the process's logging, root handler included: undone after each test."""
    with logs.isolated():
        yield


def _fail_with_the_key(*args: object, **kwargs: object) -> bytes:
    try:
        raise KeyError(f"no slot for {SECRET}")
    except KeyError as exc:
        raise RuntimeError(f"boom while rendering for {SECRET}") from exc


def test_a_500_logs_type_message_and_traceback_without_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = OpenAIStub()
    with serve_app(stub) as upstream, json_logs() as sink:
        config = with_env(
            lambda: load_config_text(
                f"""
backends:
  up: {{type: openai, settings: {{base_url: "{upstream}/v1", api_key: "${{ERRLOG_KEY}}"}}}}
routes:
  - name: main
    candidates: [{{backend: up}}]
""",
                "errlog.yaml",
            ),
            {"ERRLOG_KEY": SECRET},
        )
        logs.set_secrets(config.secrets)  # what the app does at start (see gateway.logs)
        # The dispatcher contains a backend's exceptions (BackendFailed): a real 500 comes from the handler.
        monkeypatch.setattr(api, "render_images", _fail_with_the_key)
        with serve_gateway(config) as gateway:
            response = post_generation(gateway, {"prompt": "a cat"})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert request_id in orjson.loads(response.content)["error"]["message"]
    (line,) = [entry for entry in sink.lines() if entry["event"] == "unhandled_error"]
    assert line["request_id"] == request_id and line["level"] == "error"
    assert line["exc_type"] == "RuntimeError"
    assert line["exc_message"] == "boom while rendering for [redacted]"
    raised, cause = line["traceback"]  # the exception, then its cause
    assert raised["exc_type"] == "RuntimeError" and cause["exc_type"] == "KeyError" and cause["is_cause"]
    assert raised["frames"][-1]["name"] == "_fail_with_the_key"
    assert raised["frames"][-1]["filename"].endswith("test_error_logs.py")
    assert any(frame["name"] == "__call__" and frame["filename"].endswith("handler.py") for frame in raised["frames"])
    assert all("locals" not in frame for stack in line["traceback"] for frame in stack["frames"])
    assert SECRET not in sink.text()


def test_exception_fields_on_any_level_and_secret_patterns_without_registration() -> None:
    with json_logs() as sink:
        log = logs.get_logger("test")
        try:
            raise ValueError("upstream said: bad token=abcdef0123456789 (Bearer abcdef0123456789)")
        except ValueError:
            log.warning("odd_answer", backend="up", exc_info=True)
    (line,) = sink.lines()
    assert line["exc_type"] == "ValueError" and line["backend"] == "up"
    assert "abcdef0123456789" not in sink.text() and "[redacted]" in line["exc_message"]
