"""One logging system (issue #9 item 5): our dependencies' stdlib records come out as our lines — one JSON
object per line with ``event``, ``level``, ``timestamp`` (and ``logger``), exceptions as fields, secrets
scrubbed — on the same stream as our own lines, which keep their fast path and their format.

Every test restores the stdlib logging state it changes (root handlers and level, warnings capture, the
uvicorn loggers): a handler left on the root logger would write into other tests' captured output."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import structlog
import structlog.testing

from gateway import logs
from gateway.config import load_config_text
from tests.fakes.log_sink import LogSink, json_logs

SECRET = "sk-logs-SECRET-9a8b7c6d5e"
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@contextlib.contextmanager
def _uvicorn_loggers_as_with_log_config_none() -> Iterator[None]:
    """The uvicorn loggers as ``uvicorn.Config(log_config=None, log_level="warning")`` leaves them: no
    handlers, propagating. Other tests' servers run uvicorn's default config, which gives ``uvicorn`` a
    stderr handler and stops propagation for the rest of the session; put back as it was after."""
    saved = [
        (
            logging.getLogger(n),
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).propagate,
            logging.getLogger(n).level,
        )
        for n in _UVICORN
    ]
    for logger, _, _, _ in saved:
        logger.handlers, logger.propagate, logger.level = [], True, logging.NOTSET
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level


@pytest.fixture
def sink() -> Iterator[LogSink]:
    """Production logging (``configure(json=True)``) into a buffer; all logging state restored after."""
    with logs.isolated(), _uvicorn_loggers_as_with_log_config_none(), json_logs() as sink:
        logs.set_secrets([SECRET])
        yield sink


def _only(sink: LogSink, logger: str) -> dict[str, Any]:
    lines = [line for line in sink.lines() if line.get("logger") == logger]
    assert len(lines) == 1, f"{logger}: {lines}"
    return lines[0]


def test_a_uvicorn_error_record_is_one_json_line_with_our_fields(sink: LogSink) -> None:
    logging.getLogger("uvicorn.error").error("Invalid HTTP request received from %s", "10.0.0.1")
    logging.getLogger("httpx").info("HTTP Request: POST https://example/v1 200 OK")  # below WARNING: dropped
    raw = sink.buffer.getvalue()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    (line,) = sink.lines()
    assert line["event"] == "Invalid HTTP request received from 10.0.0.1"
    assert line["level"] == "error" and line["logger"] == "uvicorn.error"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
    assert not any(key.startswith("_") for key in line)  # no ProcessorFormatter internals (_record...)


def test_a_stdlib_exception_gets_exception_fields_scrubbed_of_secrets(sink: LogSink) -> None:
    try:
        try:
            raise KeyError(f"no slot for {SECRET}")
        except KeyError as exc:
            raise RuntimeError(f"upstream refused {SECRET}") from exc
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    # Dependencies' lines are scrubbed at every level, not only errors (httpx logs URLs with their query).
    logging.getLogger("httpx").warning("retrying https://api.example/v1?api_key=%s", SECRET)
    line = _only(sink, "uvicorn.error")
    assert line["event"] == "Exception in ASGI application" and line["level"] == "error"
    assert line["exc_type"] == "RuntimeError" and line["exc_message"] == "upstream refused [redacted]"
    raised, cause = line["traceback"]
    assert raised["exc_type"] == "RuntimeError" and cause["exc_type"] == "KeyError" and cause["is_cause"]
    assert raised["frames"][-1]["name"] == "test_a_stdlib_exception_gets_exception_fields_scrubbed_of_secrets"
    assert all("locals" not in frame for stack in line["traceback"] for frame in stack["frames"])
    assert "[redacted]" in _only(sink, "httpx")["event"]
    assert SECRET not in sink.text()


def test_asyncio_task_exception_never_retrieved(sink: LogSink) -> None:
    async def fail() -> None:
        raise RuntimeError(f"lost {SECRET}")

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.wait([task]))  # done, its exception never asked for
        del task
        gc.collect()  # the task's __del__ reports it through the loop's exception handler
    finally:
        loop.close()
    line = _only(sink, "asyncio")
    assert line["event"].startswith("Task exception was never retrieved") and line["level"] == "error"
    assert line["exc_type"] == "RuntimeError" and line["exc_message"] == "lost [redacted]"
    assert SECRET not in sink.text()


def test_captured_warnings_come_out_as_our_lines(sink: LogSink) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the suite turns warnings into errors
        warnings.warn(f"the key {SECRET} is deprecated", FutureWarning, stacklevel=1)
    line = _only(sink, "py.warnings")
    assert line["level"] == "warning" and "FutureWarning: the key [redacted] is deprecated" in line["event"]


def test_diffusers_and_transformers_records_reach_our_handler(sink: LogSink) -> None:
    """They log through loggers of their own, with a stderr handler and no propagation, until the local
    backend hands them over when it imports them."""
    pytest.importorskip("torch")
    from backends.local_sdxl import presets

    presets.import_model_classes()
    for name in ("diffusers.models.modeling_utils", "transformers.modeling_utils", "huggingface_hub.file_download"):
        logging.getLogger(name).warning("some weights of the model were not used")
        assert _only(sink, name)["level"] == "warning"
    for name in ("diffusers", "transformers", "huggingface_hub"):
        assert not [h for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler], name


def test_console_renderer_on_a_tty_for_stdlib_records_too() -> None:
    out = io.StringIO()
    with logs.isolated(), _uvicorn_loggers_as_with_log_config_none():
        logs.configure(json=False, secrets=[SECRET])
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
        try:
            raise RuntimeError(f"upstream refused {SECRET}")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logs.get_logger("imagegate").info("started")
    text = out.getvalue()
    first, *block = text.splitlines()
    assert "Exception in ASGI application" in first and "uvicorn.error" in first and not first.startswith("{")
    assert "Traceback (most recent call last):" in block and "RuntimeError: upstream refused [redacted]" in block
    assert "started" in text.splitlines()[-1] and SECRET not in text


class _ChoppyFile:
    """A binary stream that writes each line in two halves with a thread switch between: only one lock
    shared by every writer of the stream keeps lines whole."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        half = len(data) // 2
        self.parts.append(data[:half])
        time.sleep(0)
        self.parts.append(data[half:])
        return len(data)

    def flush(self) -> None:
        pass


class _RecordNames(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.name)


def test_our_lines_keep_their_fast_path_and_format_and_share_the_stream_whole() -> None:
    fields = {
        "request_id": "req-1",
        "route": "main",
        "backend": "up",
        "outcome": "ok",
        "status": 200,
        "attempts": 1,
        "total_ms": 12.5,
        "gateway_ms": 0.2,
        "backend_ms": 12.3,
        "cost_usd": 0.002,
        "images": 1,
        "size": "256x256",
        "n": 1,
        "tier": "preview",
    }
    stream, seen = _ChoppyFile(), _RecordNames()
    with logs.isolated(), _uvicorn_loggers_as_with_log_config_none():
        logs.configure(json=True)
        config = structlog.get_config()
        assert isinstance(config["logger_factory"], structlog.BytesLoggerFactory)  # orjson bytes, no stdlib
        structlog.configure(logger_factory=structlog.BytesLoggerFactory(stream))  # type: ignore[arg-type]  # a duck-typed BinaryIO
        logging.getLogger().addHandler(seen)
        access = logs.get_logger("imagegate.access")

        def ours() -> None:
            for _ in range(150):
                access.info("request", **fields)

        def theirs() -> None:
            for i in range(150):
                logging.getLogger("uvicorn.error").warning("slow client %d", i)

        threads = [threading.Thread(target=f) for f in (ours, theirs, ours, theirs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not [name for name in seen.names if name.startswith("imagegate")]  # our lines skip stdlib logging
    raw = b"".join(stream.parts)
    lines = raw.splitlines()
    assert len(lines) == 600 and raw.endswith(b"\n")
    parsed = [orjson.loads(line) for line in lines]  # each one whole: no halves of two lines glued
    ours_raw = [line for line, entry in zip(lines, parsed, strict=True) if entry["event"] == "request"]
    assert len(ours_raw) == 300 and sum(entry.get("logger") == "uvicorn.error" for entry in parsed) == 300
    # The access line exactly as before: its fields in order, then event, level, timestamp; compact orjson.
    entry = orjson.loads(ours_raw[0])
    assert ours_raw[0] == orjson.dumps({**fields, "event": "request", "level": "info", "timestamp": entry["timestamp"]})


def test_configure_twice_keeps_one_handler_and_isolated_undoes_it() -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level, warnings.showwarning)
    with logs.isolated():
        logs.configure(json=True)
        logs.configure(json=True)
        ours = [h for h in root.handlers if h not in before[0]]
        assert len(ours) == 1 and isinstance(ours[0].formatter, structlog.stdlib.ProcessorFormatter)
        assert root.level == logging.WARNING
        assert warnings.showwarning is not before[2]  # captured
    assert (root.handlers, root.level, warnings.showwarning) == before


def test_presets_log_through_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from backends.local_sdxl import presets

    # Only the logging: no model is built or verified here (test_presets.py covers that).
    monkeypatch.setattr(presets, "import_model_classes", lambda: None)
    monkeypatch.setattr(presets, "_preset", lambda name, **kw: SimpleNamespace(source=f"random {name}"))
    monkeypatch.setattr(presets, "verify_components", lambda *args, **kw: None)
    with structlog.testing.capture_logs() as captured:
        presets.load_components(
            preset="tiny", model=None, taesd=None, device="cpu", dtype=torch.float32, vae_dtype=torch.float32
        )
    assert [(e["event"], e["log_level"]) for e in captured] == [("local_sdxl.load_progress", "info")] * 2
    assert captured[0]["step"].startswith("building preset tiny on cpu")
    assert captured[1]["step"].startswith("components ready in") and "random tiny" in captured[1]["step"]


def test_uvicorn_as_served_logs_through_our_handler(sink: LogSink) -> None:
    """What ``imagegate serve`` passes to uvicorn must leave its loggers propagating to the root logger."""
    import uvicorn

    from gateway.server import uvicorn_settings

    config = load_config_text(
        """
backends:
  up: {type: openai, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - name: main
    candidates: [{backend: up}]
""",
        "served.yaml",
    )
    uvicorn.Config(lambda scope, receive, send: None, **uvicorn_settings(config))  # configures logging
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    assert _only(sink, "uvicorn.error")["event"] == "Invalid HTTP request received."
