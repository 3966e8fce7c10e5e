"""Session-wide test set-up."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(scope="session", autouse=True)
def _log_lines_stay_captured() -> Iterator[None]:
    """Log lines written between two tests land in pytest's capture, not in the middle of its progress output.

    Gateways under test run in server threads and write their access line just after the response went out,
    which can be after the test that asked has ended. Unconfigured, structlog prints (console renderer) to
    whatever ``sys.stdout`` is at that moment, and between two tests pytest has put the terminal back: the
    line showed up among the dots. Here the writer is bound to the stream pytest captures into, for the whole
    session (under ``-s`` that stream is the terminal). Only the writer changes; tests that configure logging
    still do it inside ``gateway.logs.isolated()``, which puts this back after them."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(sys.stdout))
    try:
        yield
    finally:
        structlog.configure(**saved)
