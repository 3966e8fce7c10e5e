"""What the raw ASGI fakes share: reading a whole request body, and answering with a JSON body."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson


async def read_body(receive: Any) -> bytes:
    """The request body, however many ``http.request`` messages it comes in."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def send_json(send: Any, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """One complete answer: ``payload`` as JSON with its content type and length (plus ``headers``)."""
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
