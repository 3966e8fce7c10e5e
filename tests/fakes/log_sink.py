"""The gateway's production logging (``gateway.logs.configure(json=True)``), written to a buffer instead of
stdout, for tests that check what actually ends up in the log: rendered lines, tracebacks included.
(``structlog.testing.capture_logs`` shows the event dicts *before* the processors run, so it cannot.)"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import orjson
import structlog

from gateway import logs


class LogSink:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def text(self) -> str:
        return self.buffer.getvalue().decode("utf-8", "replace")

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.buffer.getvalue().splitlines() if line.strip()]


@contextlib.contextmanager
def json_logs() -> Iterator[LogSink]:
    """Production JSON logging into a ``LogSink`` for the duration; the previous set-up is restored after."""
    sink = LogSink()
    with logs.isolated():  # structlog's config, secrets, the root handler, warnings capture
        logs.configure(json=True)
        structlog.configure(logger_factory=structlog.BytesLoggerFactory(sink.buffer))
        yield sink
