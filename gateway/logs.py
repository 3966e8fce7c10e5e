"""structlog set-up: JSON lines (orjson) in production, console on a TTY; one canonical line per request.

**One logging system.** Our own code logs through structlog (``get_logger``): the fast path, with no stdlib
``logging`` in between — a ``make_filtering_bound_logger`` drops lines below the level without building an
event dict, and a line is rendered by orjson and written as bytes (the access line is on every request).
Our dependencies log through stdlib ``logging`` (uvicorn's ``uvicorn.error``, httpx, asyncio's "Task
exception was never retrieved", diffusers and transformers once the local backend hands their loggers over,
``py.warnings`` for captured warnings): ``configure`` puts one handler on the root logger whose
``structlog.stdlib.ProcessorFormatter`` runs those records through the same processors (context variables,
level, timestamp, exception fields, scrubbing) and the same renderer, plus ``logger`` (the stdlib logger's
name, since they come from many places). So every line on stdout is one JSON object with ``event``,
``level`` and ``timestamp`` (console lines on a TTY), whoever wrote it. Stdlib records below WARNING are
dropped by the root logger's level (httpx alone logs every request at INFO). uvicorn must be run with
``log_config=None`` for its loggers to reach the root logger (its default config gives them a handler of
their own and stops propagation).

**One stream, whole lines.** The root handler writes each rendered record through structlog's *current*
logger factory — the very writer our own lines use (``BytesLogger`` on ``sys.stdout.buffer``), whose lock is
per file — so the two kinds of line share one lock and cannot interleave, and a factory swapped in later
(a test's buffer) receives both.

**Exceptions are rendered as fields**, so a 500's log line says what happened: ``log.exception(...)`` (or
any call with ``exc_info``, also a stdlib record's) gives ``exc_type`` (qualified class name), ``exc_message``
and ``traceback``: structlog's dict tracebacks (``structlog.tracebacks.ExceptionDictTransformer``), one entry
per exception of the chain (causes and contexts), each with its frames as file, line and function. Local
variables are *not* included (structlog's default would: their reprs carry settings objects, headers and
keys). On a console the same traceback is plain text under ``exception``, which ``ConsoleRenderer`` prints
as a block.

**Secrets never reach a log line through an exception.** Exception messages (and so every traceback entry)
may quote a key: an upstream error echoed into a ``RuntimeError``, a URL with userinfo. The exception
fields are passed through ``backends.errors.scrub`` with the secrets registered by ``set_secrets`` (the app
registers the config's secrets at start: ``Config.secrets``, every value taken from ``${ENV}``) and its
credential patterns (``Bearer ...``, ``api_key=...``). Lines that carry an error (warning level and above,
an ``error`` field, an exception) get every string field scrubbed the same way; plain info lines of ours —
the access line of a successful request — are left as they are, so the request path pays nothing for this.
Every line from a dependency is scrubbed, whatever its level: we do not know what a library puts in its
messages (httpx, for one, logs URLs with their query strings), and those lines are rare.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import types
import warnings
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, cast

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


def configure(
    json: bool | None = None,
    level: int = logging.INFO,
    *,
    secrets: Iterable[str] | None = None,
    stdlib_level: int = logging.WARNING,
    capture_warnings: bool = True,
) -> None:
    """Configure logging for the process: our structlog lines and our dependencies' stdlib records, all to
    stdout, JSON unless stdout is a TTY (``json``). ``level``: the least level logged. ``stdlib_level``: the
    least level of stdlib records (never below ``level``). ``capture_warnings``: Python warnings become
    ``py.warnings`` records (``logging.captureWarnings``) instead of text on stderr. ``secrets``: as
    ``set_secrets`` (left as they are when None).

    Takes over the root logger: puts its one handler there (replacing the one an earlier call put there;
    other handlers are left alone) and sets its level. ``isolated`` undoes all of it."""
    if json is None:
        json = not sys.stdout.isatty()
    if secrets is not None:
        set_secrets(secrets)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    factory: Any
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)  # bytes, for BytesLogger
        text_renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(serializer=_json_text)
        factory = structlog.BytesLoggerFactory()
    else:
        renderer = text_renderer = structlog.dev.ConsoleRenderer()
        factory = structlog.PrintLoggerFactory()
    structlog.configure(
        processors=[*shared, render_exceptions if json else render_exceptions_as_text, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # add_logger_name reads the record (``_record``), which remove_processors_meta then drops.
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _foreign_json if json else _foreign_text,
            text_renderer,
        ],
    )
    handler = _StructlogHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, stdlib_level))
    # Off first: captureWarnings(True) does nothing while logging believes it already captures, which it
    # does after someone else (pytest, between tests) put their own showwarning back.
    logging.captureWarnings(False)
    if capture_warnings:
        logging.captureWarnings(True)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger for ``name`` (``imagegate...``): what ``configure``'s ``wrapper_class`` makes."""
    return cast(structlog.typing.FilteringBoundLogger, structlog.get_logger(name))


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Put the process's logging set-up back as it was when the block exits: structlog's configuration,
    the registered secrets, the root logger's handlers and level, and whether warnings are captured. For
    code that calls ``configure`` and must not leave it configured (tests)."""
    saved = structlog.get_config()
    secrets = _secrets
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        structlog.configure(**saved)
        set_secrets(secrets)
        root.handlers[:] = handlers  # the same ones in the same order
        root.setLevel(root_level)
        logging.captureWarnings(False)
        warnings.showwarning = showwarning


class _StructlogHandler(logging.Handler):
    """The root logger's handler: each record, rendered by its ``ProcessorFormatter``, written as one line
    through structlog's current logger factory (see the module docstring: same stream, same lock).

    The writer is looked up per record, not kept: a stream kept here would outlive a test's capture, and a
    factory configured later (a buffer) would not receive these lines. Dependencies' records are rare, so the
    look-up costs nothing that matters."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            writer = structlog.get_config()["logger_factory"](record.name)
            writer.msg(line.encode() if isinstance(writer, structlog.BytesLogger) else line)
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - logging's contract: report it on stderr, never raise into the caller
            self.handleError(record)


def _json_text(value: Any, **kwargs: Any) -> str:
    """orjson for ``ProcessorFormatter``, whose last processor must return ``str``."""
    return orjson.dumps(value, **kwargs).decode()


# -- processors -------------------------------------------------------------------------------------------


def render_exceptions(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``exc_info`` → ``exc_type``, ``exc_message``, ``traceback`` (structured);
    secrets scrubbed (see the module docstring)."""
    return _render(method, event, structured=True)


def render_exceptions_as_text(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """As ``render_exceptions``, with the traceback as text under ``exception`` (for ``ConsoleRenderer``)."""
    return _render(method, event, structured=False)


def _foreign_json(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``render_exceptions`` for a dependency's record: every string field scrubbed, at any level."""
    return _render(method, _trimmed(event), structured=True, always=True)


def _foreign_text(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``render_exceptions_as_text`` for a dependency's record: every string field scrubbed, at any level."""
    return _render(method, _trimmed(event), structured=False, always=True)


def _trimmed(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # A captured warning's message ends in a newline (warnings.formatwarning); the line ends anyway.
    if isinstance(event.get("event"), str):
        event["event"] = event["event"].rstrip()
    return event


def _render(
    method: str, event: MutableMapping[str, Any], *, structured: bool, always: bool = False
) -> MutableMapping[str, Any]:
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
    elif not always and method not in _ERROR_METHODS and "error" not in event:
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
        return value
    info = sys.exc_info()
    return info if info[1] is not None else None


def _qualname(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _clean(value: Any) -> Any:
    """Scrub every string in ``value`` (nested lists and dicts too). Multi-line text keeps its lines."""
    if isinstance(value, str):
        if "\n" in value:  # a text traceback: scrub line by line, keeping each line's indentation
            return "\n".join(
                line[: len(line) - len(line.lstrip())] + scrub(line, _secrets, limit=_LIMIT)
                for line in value.split("\n")
            )
        return scrub(value, _secrets, limit=_LIMIT)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value
