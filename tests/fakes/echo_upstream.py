"""A careless upstream, as a raw ASGI app: it answers every request with ``status`` and an error body that
echoes what it was sent — the credential headers included — in every place the backends read error text
from (``error.message``, ``detail``, ``message``, ``title``). Any backend type can point its API at it.

It stands for the upstreams that echo a rejected key ("invalid API key sk-...") or dump a request into a
500 message: whatever they echo must not reach our error bodies, logs or headers.
"""

from __future__ import annotations

from typing import Any

import orjson

# Headers every HTTP client sends; echoing them only pushes the interesting ones past message limits.
_BORING = frozenset(
    {
        "host",
        "accept",
        "accept-encoding",
        "connection",
        "user-agent",
        "content-length",
        "content-type",
        "x-request-id",
        "prefer",
        "cancel-after",
        "x-fal-request-timeout",
    }
)


class EchoUpstream:
    def __init__(self, status: int = 401) -> None:
        self.status = status
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers))
        echoed = "; ".join(f"{k}: {v}" for k, v in headers.items() if k not in _BORING)
        text = f"request rejected ({echoed})"
        body = orjson.dumps(
            {
                "error": {"message": text, "type": "invalid_request_error"},
                "detail": text,
                "message": text,
                "title": text,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
