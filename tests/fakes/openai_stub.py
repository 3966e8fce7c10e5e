"""A fast fake of an OpenAI-compatible images endpoint, as a raw ASGI app (also used by the benchmark).

Behaviour per request is taken from ``script`` (a list consumed front to back; empty = "ok"):
``ok``, ``status:<code>`` (with an OpenAI error body), ``retry-after:<s>`` (429 with Retry-After),
``hang:<s>`` (sleep before answering), ``badjson``, ``url`` (answer with an image URL on this server),
``url:<URL>`` (answer with that URL, e.g. on a fake output host or a metadata address).
Requests are recorded in ``seen``, their headers in ``headers_seen``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import orjson
from PIL import Image as PILImage
from starlette.types import Receive, Scope, Send

from tests.fakes.asgi import read_body


def tiny_png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class OpenAIStub:
    def __init__(self, image: bytes | None = None) -> None:
        self.image = image or tiny_png()
        self.b64 = base64.b64encode(self.image).decode()
        self.script: list[str] = []
        self.seen: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []

    def _body(self, n: int) -> bytes:
        return orjson.dumps({"created": 1, "data": [{"b64_json": self.b64} for _ in range(n)]})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"].startswith("/files/"):
            await self._send(send, 200, self.image, b"image/png")
            return
        body = await read_body(receive)
        request = orjson.loads(body) if body else {}
        self.seen.append(request)
        self.headers_seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        action = self.script.pop(0) if self.script else "ok"
        kind, _, arg = action.partition(":")
        n = int(request.get("n", 1))
        if kind == "ok":
            await self._send(send, 200, self._body(n))
        elif kind == "status":
            err = orjson.dumps({"error": {"message": f"upstream says {arg}", "type": "server_error"}})
            await self._send(send, int(arg), err)
        elif kind == "retry-after":
            err = orjson.dumps({"error": {"message": "rate limited", "type": "rate_limit"}})
            await self._send(send, 429, err, extra=[(b"retry-after", arg.encode())])
        elif kind == "hang":
            await asyncio.sleep(float(arg))
            await self._send(send, 200, self._body(n))
        elif kind == "badjson":
            await self._send(send, 200, b'{"data": [ {"b64_json": "abc"')
        elif kind == "url":
            host = dict(scope["headers"]).get(b"host", b"127.0.0.1").decode()
            url = arg or f"http://{host}/files/x.png"
            payload = orjson.dumps({"created": 1, "data": [{"url": url}] * n})
            await self._send(send, 200, payload)
        else:
            raise ValueError(f"unknown stub action {action!r}")

    @staticmethod
    async def _send(
        send: Any,
        status: int,
        body: bytes,
        ctype: bytes = b"application/json",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
