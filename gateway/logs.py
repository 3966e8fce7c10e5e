"""structlog set-up: JSON lines (orjson) in production, console on a TTY; one canonical line per request.

**Exceptions are rendered as fields**, so a 500's log line says what happened: ``log.exception(...)`` (or
any call with ``exc_info``) gives ``exc_type`` (qualified class name), ``exc_message`` and ``traceback``:
structlog's dict tracebacks (``structlog.tracebacks.ExceptionDictTransformer``), one entry per exception of
the chain (causes and contexts), each with its frames as file, line and function. Local variables are *not*
included (structlog's default would: their reprs carry settings objects, headers and keys). On a console
the same traceback is plain text under ``exception``, which ``ConsoleRenderer`` prints as a block.

**Secrets never reach a log line through an exception.** Exception messages (and so every traceback entry)
may quote a key: an upstream error echoed into a ``RuntimeError``, a URL with userinfo. The exception
fields are passed through ``backends.errors.scrub`` with the secrets registered by ``set_secrets`` (the app
registers the config's secrets at start: ``Config.secrets``, every value taken from ``${ENV}``) and its
credential patterns (``Bearer ...``, ``api_key=...``). Lines that carry an error (warning level and above,
an ``error`` field, an exception) get every string field scrubbed the same way; plain info lines — the
access line of a successful request — are left as they are, so the request path pays nothing for this.
"""

from __future__ import annotations

import logging
import sys
import traceback
import types
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog
import structlog.tracebacks

from backends.errors import scrub

_secrets: tuple[str, ...] = ()
_ERROR_METHODS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
_LIMIT = 4000  # per string field: room for a long message, not for a megabyte of upstream body
_TRACEBACKS = structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False, max_frames=40)


def set_secrets(secrets: Iterable[str]) -> None:
    """Register the values to scrub from exception fields and error lines (``Config.secrets``). Replaces
    what was registered before; takes effect at once, also for loggers already in use."""
    global _secrets
    _secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def configure(json: bool | None = None, level: int = logging.INFO, *, secrets: Iterable[str] | None = None) -> None:
    """Configure structlog for the process: lines to stdout. ``secrets``: as ``set_secrets`` (left as they
    are when None)."""
    if json is None:
        json = not sys.stdout.isatty()
    if secrets is not None:
        set_secrets(secrets)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        render_exceptions if json else render_exceptions_as_text,
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory()
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


# -- processors -------------------------------------------------------------------------------------------


def render_exceptions(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``exc_info`` → ``exc_type``, ``exc_message``, ``traceback`` (structured);
    secrets scrubbed (see the module docstring)."""
    return _render(method, event, structured=True)


def render_exceptions_as_text(logger: Any, method: str,
                              event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """As ``render_exceptions``, with the traceback as text under ``exception`` (for ``ConsoleRenderer``)."""
    return _render(method, event, structured=False)


def _render(method: str, event: MutableMapping[str, Any], *, structured: bool) -> MutableMapping[str, Any]:
    raw = event.pop("exc_info", None)
    exc_info = _exc_info(raw) if raw else None
    if exc_info is not None:
        exc = exc_info[1]
        event["exc_type"] = _qualname(exc_info[0])
        event["exc_message"] = str(exc)
        if structured:
            event["traceback"] = _TRACEBACKS(exc_info)
        else:
            event["exception"] = "".join(traceback.format_exception(*exc_info))
    elif method not in _ERROR_METHODS and "error" not in event:
        return event
    for key, value in event.items():
        if key != "timestamp" and isinstance(value, (str, list, dict)):
            event[key] = _clean(value)
    return event


def _exc_info(value: Any) -> tuple[type[BaseException], BaseException, types.TracebackType | None] | None:
    """``exc_info`` as structlog accepts it (True, an exception, a sys.exc_info() tuple) → a tuple or None."""
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and value[1] is not None:
        return value  # type: ignore[return-value]
    info = sys.exc_info()
    return info if info[1] is not None else None  # type: ignore[return-value]


def _qualname(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _clean(value: Any) -> Any:
    """Scrub every string in ``value`` (nested lists and dicts too). Multi-line text keeps its lines."""
    if isinstance(value, str):
        if "\n" in value:  # a text traceback: scrub line by line, keeping each line's indentation
            return "\n".join(line[:len(line) - len(line.lstrip())] + scrub(line, _secrets, limit=_LIMIT)
                             for line in value.split("\n"))
        return scrub(value, _secrets, limit=_LIMIT)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value
