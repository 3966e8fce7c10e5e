"""A fast stand-alone stub of an OpenAI images endpoint, for the overhead benchmark.

    python benchmarks/stub_server.py --port 9001 [--large-size 1024x1024] [--large-b64-bytes 1500000]

``POST /v1/images/generations`` answers ``{"created": ..., "data": [{"b64_json": ...}] * n}``. Requests for
``--large-size`` get a realistic large image (a noise PNG whose base64 text is about ``--large-b64-bytes``
long, 1.5 MB by default); every other size gets a tiny 8x8 PNG. Response bodies are built once at start-up,
so the stub spends as little CPU per request as possible: the benchmark measures the gateway, not the stub.
``GET /healthz`` answers 200. Runs under uvicorn with uvloop + httptools and no access log, like the gateway.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
from typing import Any

import orjson

GENERATIONS = "/v1/images/generations"


def noise_png(b64_bytes: int, seed: int = 7) -> bytes:
    """A PNG of random pixels (incompressible, so its size is predictable) of about ``b64_bytes * 3/4``."""
    from PIL import Image

    side = max(8, int((b64_bytes * 3 / 4 / 3) ** 0.5))  # RGB noise barely compresses: ~3 bytes per pixel
    rng = random.Random(seed)
    pixels = rng.randbytes(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class StubApp:
    """Raw ASGI; bodies cached per (large?, n)."""

    def __init__(self, large_size: str, large_b64_bytes: int) -> None:
        self.large_size = large_size
        self.small_b64 = base64.b64encode(tiny_png()).decode()
        self.large_b64 = base64.b64encode(noise_png(large_b64_bytes)).decode()
        self._bodies: dict[tuple[bool, int], bytes] = {}

    def body(self, large: bool, n: int) -> bytes:
        key = (large, n)
        cached = self._bodies.get(key)
        if cached is None:
            b64 = self.large_b64 if large else self.small_b64
            cached = self._bodies[key] = orjson.dumps({"created": 1_700_000_000, "data": [{"b64_json": b64}] * n})
        return cached

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"].endswith(GENERATIONS[3:]):
            try:
                request = orjson.loads(b"".join(chunks))
                n = int(request.get("n") or 1)
                large = request.get("size") == self.large_size
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                await _send(send, 400, b'{"error": {"message": "bad request", "type": "invalid_request_error"}}')
                return
            await _send(send, 200, self.body(large, n))
        elif scope["path"] == "/healthz":
            await _send(send, 200, b'{"status": "ok"}')
        else:
            await _send(send, 404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}')


async def _send(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--large-size", default="1024x1024", help="requests for this size get the large image")
    parser.add_argument("--large-b64-bytes", type=int, default=1_500_000)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the stub only binds loopback")
    import uvicorn

    app = StubApp(args.large_size, args.large_b64_bytes)
    print(f"stub pid={os.getpid()} large image: {len(app.large_b64)} base64 chars", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="auto",
        http="auto",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
