"""A minimal fake of cog's HTTP server (``python -m cog.server.http``), as a raw ASGI app, for tests that need
to steer what the container answers (output URLs on another host, as a container started with
``--upload-url`` gives) without starting the real server. ``tests/backends/test_cog.py`` runs the real one.

``GET /health-check`` → ``{"status": "READY"}``; ``PUT /predictions/{id}`` → 200 with a succeeded prediction
whose ``output`` is ``outputs`` (default: one ``data:`` PNG); ``POST /predictions/{id}/cancel`` → 200.
Every request's headers are recorded in ``headers_seen``.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from tests.fakes.asgi import read_body, send_json
from tests.fakes.openai_stub import tiny_png


class CogFake:
    def __init__(self) -> None:
        self.outputs: list[str] = [f"data:image/png;base64,{base64.b64encode(tiny_png()).decode()}"]
        self.headers_seen: list[dict[str, str]] = []
        self.predictions: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.headers_seen.append({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]})
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/health-check":
            await send_json(send, 200, {"status": "READY", "setup": {"status": "succeeded"}})
        elif method == "PUT" and path.startswith("/predictions/"):
            request = orjson.loads(body or b"{}")
            self.predictions.append(request)
            await send_json(
                send,
                200,
                {
                    "id": request.get("id"),
                    "input": request.get("input"),
                    "status": "succeeded",
                    "output": list(self.outputs),
                    "error": None,
                    "logs": "",
                    "metrics": {"predict_time": 0.01},
                },
            )
        elif method == "POST" and path.endswith("/cancel"):
            await send_json(send, 200, {})
        else:
            await send_json(send, 404, {"detail": "Not Found"})
