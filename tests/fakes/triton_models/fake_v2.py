"""A small in-process KServe V2 server (Starlette) that behaves like Triton for one image model, with
failures on demand. Used where the real servers cannot be steered: 503 queue full, 500 model errors,
malformed bodies, a connection cut mid-body, slow answers, readiness flips.

It parses requests the way Triton does (JSON, or binary inputs behind ``Inference-Header-Content-Length``),
renders ``image_model.render`` and answers in JSON or with the binary extension (gzip when asked and
``gzip`` is on). Every request is recorded in ``calls`` for assertions.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.triton_models import image_model

_DTYPES = {"UINT8": "<u1", "INT32": "<i4", "INT64": "<i8", "FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}


@dataclass
class Scripted:
    """One scripted answer: an HTTP status with a body, or ``"reset"`` to cut the connection."""

    status: int = 500
    body: bytes = b'{"error":"injected failure"}'
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False


@dataclass
class FakeV2:
    model: str = "image"
    ready: bool = True
    gzip: bool = True
    delay_s: float = 0.0
    output_datatype: str = "UINT8"  # or FP32
    layout: str = "NHWC"  # or NCHW
    script: deque[Scripted] = field(default_factory=deque)
    calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    disconnected: int = 0
    delays_served: int = 0  # slow answers that waited out delay_s (the client stayed)
    base: str = ""  # where a test serves it

    def fail_next(
        self,
        status: int = 500,
        error: str = "injected failure",
        *,
        body: bytes | None = None,
        reset: bool = False,
        times: int = 1,
    ) -> None:
        for _ in range(times):
            self.script.append(
                Scripted(status, body if body is not None else orjson.dumps({"error": error}), reset=reset)
            )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v2/health/ready", lambda r: Response(status_code=200 if self.ready else 503)),
                Route("/v2/models/{model}/ready", self._ready, methods=["GET"]),
                Route("/v2/models/{model}/versions/{version}/ready", self._ready, methods=["GET"]),
                Route("/v2/models/{model}/infer", self._infer, methods=["POST"]),
                Route("/v2/models/{model}/versions/{version}/infer", self._infer, methods=["POST"]),
            ]
        )

    async def _ready(self, request: Request) -> Response:
        ok = self.ready and request.path_params["model"] == self.model
        return Response(status_code=200 if ok else 400)

    async def _infer(self, request: Request) -> Response:
        raw = await request.body()
        self.calls.append({"path": request.url.path, "headers": dict(request.headers), "body": raw})
        if request.path_params["model"] != self.model:
            return _error(404, f"Request for unknown model: '{request.path_params['model']}' is not found")
        if self.script:
            scripted = self.script.popleft()
            if scripted.reset:
                return _ResetResponse()
            return Response(
                scripted.body, status_code=scripted.status, headers=scripted.headers, media_type="application/json"
            )
        self.in_flight += 1
        try:
            if self.delay_s and await self._client_left(request, self.delay_s):
                # V2 has no cancel call: a client that gives up just closes the connection.
                self.disconnected += 1
                return Response(status_code=499)
            if self.delay_s:
                self.delays_served += 1
        finally:
            self.in_flight -= 1
        try:
            doc, inputs = _parse(request.headers, raw)
        except ValueError as exc:
            return _error(500 if "JSON" in str(exc) else 400, str(exc))
        self.calls[-1]["inputs"] = inputs
        return self._answer(request, doc, inputs)

    @staticmethod
    async def _client_left(request: Request, seconds: float) -> bool:
        """Sleep ``seconds``; True as soon as the client disconnects instead."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(0.02)
        return False

    def _answer(self, request: Request, doc: dict, inputs: dict) -> Response:
        prompts = [p.decode() if isinstance(p, bytes) else p for p in inputs["prompt"]]
        rows = len(prompts)
        if image_model.FAIL_PROMPT in prompts:
            return _error(500, "Failed to process the request(s) for model 'image', message: model raised")
        seeds = inputs.get("seed", [0] * rows)
        width = int(inputs.get("width", [64])[0])
        height = int(inputs.get("height", [64])[0])
        images = np.stack([image_model.render(p, int(s), width, height) for p, s in zip(prompts, seeds, strict=True)])
        if self.layout == "NCHW":
            images = images.transpose(0, 3, 1, 2)
        tensor = np.ascontiguousarray(images.astype(_DTYPES[self.output_datatype]))
        requested = (doc.get("outputs") or [{"name": "generated_image"}])[0]
        everything_binary = (doc.get("parameters") or {}).get("binary_data_output")
        binary = bool((requested.get("parameters") or {}).get("binary_data", everything_binary))
        out: dict[str, Any] = {"name": requested["name"], "datatype": self.output_datatype, "shape": list(tensor.shape)}
        head = {"model_name": self.model, "model_version": "1", "outputs": [out]}
        if doc.get("id"):
            head["id"] = doc["id"]
        headers = {}
        if binary:
            out["parameters"] = {"binary_data_size": tensor.nbytes}
            header = orjson.dumps(head)
            body = header + tensor.tobytes()
            headers["Inference-Header-Content-Length"] = str(len(header))
            media = "application/octet-stream"
        else:
            out["data"] = tensor.reshape(-1).tolist()
            body, media = orjson.dumps(head), "application/json"
        if self.gzip and "gzip" in request.headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return Response(body, headers=headers, media_type=media)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _parse(headers, raw: bytes) -> tuple[dict, dict[str, list]]:
    """Request JSON and its inputs as flat lists, following Triton's binary input rules."""
    length = headers.get("inference-header-content-length")
    head, binary = (raw[: int(length)], raw[int(length) :]) if length is not None else (raw, b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise ValueError("failed to parse the request JSON buffer") from None
    inputs: dict[str, list] = {}
    offset = 0
    for tensor in doc.get("inputs", []):
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = tensor["data"]
        else:
            chunk, offset = binary[offset : offset + size], offset + size
            if tensor["datatype"] == "BYTES":
                values, pos = [], 0
                while pos < len(chunk):
                    (n,) = struct.unpack_from("<I", chunk, pos)
                    values.append(chunk[pos + 4 : pos + 4 + n].decode())
                    pos += 4 + n
            else:
                values = np.frombuffer(chunk, dtype=_DTYPES[tensor["datatype"]]).tolist()
        expected = int(np.prod(tensor["shape"]))
        if len(values) != expected:
            raise ValueError(f"unexpected shape for input '{tensor['name']}'")
        inputs[tensor["name"]] = values
    if "prompt" not in inputs:
        raise ValueError("expected input 'prompt' is missing")
    return doc, inputs


class _ResetResponse(Response):
    """Announce a long body, send a little of it, then drop the connection."""

    def __init__(self) -> None:
        super().__init__(b"", media_type="application/json")

    async def __call__(self, scope, receive, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"outputs": [', "more_body": True})
        raise ConnectionResetError("injected reset mid-body")
