"""``type: fal``: the queue API (submit → status → result, cancel on abandonment) or the synchronous ``fal.run``.

Protocol (fal's Inference API):

* queue: ``POST {queue}/{app}[/{path}]`` → ``{request_id, status_url, response_url, cancel_url}``; poll
  ``status_url`` (202 ``IN_QUEUE`` with ``queue_position`` / ``IN_PROGRESS``, 200 ``COMPLETED``, which may still
  carry ``error``/``error_type``); ``GET response_url``; ``PUT cancel_url``. The returned URLs drop the app's
  sub-path, so we use them, but only on the configured queue origin: the key must never travel elsewhere.
* sync: ``POST {run}/{app}`` answers with the output. fal does not retry these; ``X-Fal-Needs-Retry: 1`` marks a
  transient failure, and dropping the connection cancels the work.
* ``X-Fal-Request-Timeout`` (the SDKs' ``start_timeout``) bounds the time before a runner starts; we send the
  smaller of the configured ``start_timeout`` and the time left before the request's deadline. When it expires
  fal answers 504 with ``X-Fal-Request-Timeout-Type: user``: if the deadline set it, nobody waits any more and
  the failure is terminal (``BackendRejected``); if our own ``start_timeout`` set it, another backend may still
  make it in time (``BackendTimeout``, which falls back but is not retried on fal).

Modules: ``config`` (the ``settings:`` block and its ``InputMapping``), ``mapping`` (the pure request/response
translation: ``to_inputs``/``to_input``/``image_size``/``from_output``/``error_for``), ``backend`` (``FalBackend``:
the HTTP client, queue polling and cancellation). Output images are fetched with ``backends.http.fetch_output``
from ``allowed_output_hosts`` only, through the backend's ``OutputFetcher``: a client of its own that carries no
credential (the key is set per API request on the API client, never on a client that fetches outputs).
"""

from __future__ import annotations

from backends.fal.backend import MAX_POLL_MISSES, FalBackend
from backends.fal.config import MIN_START_TIMEOUT, PRESETS, FalSettings, InputMapping
from backends.fal.mapping import (
    OVERLOAD_TYPES,
    TIMEOUT_TYPES,
    FalImageRef,
    FalOutput,
    completed_error,
    error_for,
    from_output,
    image_size,
    split_counts,
    to_input,
    to_inputs,
    validation_message,
)

Settings = FalSettings  # the name every backend package exports for its settings block

__all__ = [
    "MAX_POLL_MISSES",
    "MIN_START_TIMEOUT",
    "OVERLOAD_TYPES",
    "PRESETS",
    "TIMEOUT_TYPES",
    "FalBackend",
    "FalImageRef",
    "FalOutput",
    "FalSettings",
    "InputMapping",
    "Settings",
    "completed_error",
    "error_for",
    "from_output",
    "image_size",
    "split_counts",
    "to_input",
    "to_inputs",
    "validation_message",
]
