"""The closed error vocabulary shared by the gateway and every backend (the bottom layer).

Every failure a request can meet is one of these classes. The class alone decides:

* the HTTP status and OpenAI error ``type`` the client sees,
* whether the dispatcher may fall back to the next candidate (``fallback``),
* whether the *same* backend may be tried again (``retry_same``: only when the backend
  cannot have started work, or told us to come back later),
* the ``outcome`` label on metrics and logs.

There are four families, by who is at fault:

``CallerError``   the request itself is wrong (4xx, never retried, never falls back).
``PolicyError``   the request is fine but configuration/policy refuses it (no capable backend, budget).
``BackendError``  a backend failed; most are retryable elsewhere.
``GatewayError``  the gateway itself gave up (all candidates failed, deadline) or broke.

Messages must never contain secrets; backends pass upstream bodies through ``scrub`` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar


class ImagegateError(Exception):
    """Base of the vocabulary. Subclasses set the class attributes; instances carry a message."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    family: ClassVar[str] = "gateway"
    fallback: ClassVar[bool] = False
    retry_same: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Seconds the upstream asked us to wait (Retry-After), if any.
        self.retry_after = retry_after

    @property
    def outcome(self) -> str:
        """Metric/log label: ``<family>.<code>``, a closed set."""
        return f"{self.family}.{self.code}"

    def to_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# -- caller errors ----------------------------------------------------------------------------------


class CallerError(ImagegateError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"
    family = "caller"


class InvalidRequest(CallerError):
    pass


class UnknownModel(CallerError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(CallerError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(CallerError):
    status = 415
    code = "unsupported_media_type"


class RequestTimeout(CallerError):
    """The request (head or body) did not arrive within the server's read deadlines."""

    status = 408
    code = "request_timeout"


class NotFound(CallerError):
    status = 404
    code = "not_found"


class MethodNotAllowed(CallerError):
    status = 405
    code = "method_not_allowed"


# -- policy errors ----------------------------------------------------------------------------------


class PolicyError(ImagegateError):
    """Raised by the router once it has matched a route; ``route`` names it (for X-Route, logs, metrics)."""

    status = 400
    error_type = "invalid_request_error"
    code = "policy"
    family = "policy"

    def __init__(self, message: str, *, param: str | None = None, route: str | None = None) -> None:
        super().__init__(message, param=param)
        self.route = route


class NoCapableBackend(PolicyError):
    """No candidate of the route can serve this request (size, n, steps, format...)."""

    code = "unsupported_request"


class BudgetExceeded(PolicyError):
    """Every capable candidate's estimated cost exceeds ``max_cost_usd``."""

    status = 402
    code = "budget_exceeded"


# -- backend errors ---------------------------------------------------------------------------------


class BackendError(ImagegateError):
    """A backend failed. Falls back to the next candidate unless the subclass says otherwise."""

    status = 502
    error_type = "server_error"
    code = "backend_error"
    family = "backend"
    fallback = True


class BackendUnavailable(BackendError):
    """Could not reach the backend (connect refused, DNS, not ready). No work can have started."""

    code = "backend_unavailable"
    retry_same = True


class BackendTimeout(BackendError):
    """The backend did not answer in time. Work may have started (and may bill): no same-backend retry."""

    status = 504
    code = "backend_timeout"


class BackendOverloaded(BackendError):
    """The upstream refused the work before starting it and asked us to come back (429 / 503, usually
    with ``Retry-After``): the same backend may be tried again when the wait fits the deadline."""

    status = 503
    code = "backend_overloaded"
    retry_same = True


class BackendQueueFull(BackendOverloaded):
    """This backend's own queue or concurrency limit is full (the local GPU queue, the dispatcher's
    ``max_concurrency``, a connection pool): waiting for it would only add queueing delay, so the request
    falls through to the next candidate *now*. ``retry_after`` is the backend's estimated wait, used only
    for the client's ``Retry-After`` when every candidate is full or overloaded."""

    code = "backend_queue_full"
    retry_same = False


class BackendProtocolError(BackendError):
    """The backend answered with something we cannot read (malformed JSON, reset mid-body, bad tensor)."""

    code = "backend_protocol_error"


class BackendFailed(BackendError):
    """The backend ran the request and reported a failure of its own (5xx, device error)."""

    code = "backend_failed"


class BackendRejected(BackendError):
    """The backend judged the request invalid (4xx validation, model error on this input, the caller's
    own deadline at the provider). Terminal: another backend would most likely refuse it too."""

    status = 422
    error_type = "invalid_request_error"
    code = "backend_rejected"
    fallback = False


class OutputFetchError(BackendError):
    """An output URL could not be fetched (expired, too large, not allowed)."""

    code = "output_fetch_failed"


class OutputNotAllowed(OutputFetchError):
    """An output URL pointed at a host the backend's config does not allow (SSRF guard)."""

    code = "output_url_not_allowed"


# -- gateway errors ---------------------------------------------------------------------------------


class GatewayError(ImagegateError):
    family = "gateway"


class AllCandidatesFailed(GatewayError):
    status = 502
    error_type = "server_error"
    code = "all_backends_failed"


class AllCandidatesOverloaded(AllCandidatesFailed):
    status = 503
    code = "all_backends_overloaded"


class DeadlineExceeded(GatewayError):
    status = 504
    error_type = "server_error"
    code = "deadline_exceeded"


class ClientDisconnected(GatewayError):
    # nginx's convention; never actually sent, the client is gone.
    status = 499
    code = "client_disconnected"


class InternalError(GatewayError):
    status = 500
    error_type = "server_error"
    code = "internal_error"


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt as reported in the final error message and logs."""

    backend: str
    outcome: str
    message: str
    # The wait the backend asked for or estimated (overloaded / queue full), for the final Retry-After.
    retry_after: float | None = None


_SECRETISH = re.compile(
    # "Authorization: Bearer <tok>": the scheme word is kept and the token after it masked.
    r"(?i)(authorization:\s*(?:bearer\s+|basic\s+|key\s+|token\s+)?|bearer\s+|key\s+|token[=:]\s*|api[_-]?key[=:]\s*)"
    r"[A-Za-z0-9._\-:/+=]{6,}"
)


def scrub(text: str, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
    """Shorten an upstream message and remove anything that looks like a credential."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _SECRETISH.sub(lambda m: m.group(1) + "[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
