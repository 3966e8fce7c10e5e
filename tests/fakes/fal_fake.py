"""A fake of fal's hosted Inference API, as two real ASGI apps served on 127.0.0.1.

``queue_app`` plays ``queue.fal.run`` (and serves the output files, standing in for fal's CDN);
``run_app`` plays ``fal.run``. Shapes follow fal's docs and what the official ``fal-client`` parses:

* ``POST /{owner}/{alias}[/{path}]`` → 200 ``{status: IN_QUEUE, request_id, response_url, status_url,
  cancel_url, queue_position, logs, metrics}``; the URLs drop the sub-path.
* ``GET .../requests/{id}/status[?logs=1]`` → 202 ``IN_QUEUE`` (with ``queue_position``) / ``IN_PROGRESS``,
  200 ``COMPLETED`` (``metrics.inference_time``; ``error``/``error_type`` when it failed). Every status carries
  a ``logs`` key (null unless ``logs=1``), as the client's parser requires.
* ``GET .../requests/{id}`` → the output; 400 while not completed; the failure itself when it failed.
* ``PUT .../requests/{id}/cancel`` → 202 ``CANCELLATION_REQUESTED`` / 400 ``ALREADY_COMPLETED`` / 404 ``NOT_FOUND``.
* ``POST fal.run/{app}`` → the output directly.
* Errors: 401 for a wrong key; 422 FastAPI-style ``{"detail": [{"loc", "msg", "type"}]}`` for invalid input;
  infrastructure errors ``{"detail", "error_type"}`` + ``X-Fal-Error-Type``; every answer has ``x-fal-request-id``.

What happens after a cancel (status COMPLETED with ``error_type: request_cancelled``) is this fake's choice:
fal's docs only say a queued request is removed and a running one gets a cancellation signal.

Failures on demand: set ``fake.scenario`` (see ``Scenario``; ``fake.reset(...)`` between tests).
Output files are served from ``/files/...`` on the queue app, or from ``output_base`` (another host).
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image as PILImage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import serve_app

PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


@dataclass
class Failure:
    """A canned error answer."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1) -> Failure:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(429, {"detail": "Too many concurrent requests"}, headers)

    @classmethod
    def infra(cls, error_type: str, status: int | None = None) -> Failure:
        """An infrastructure error: ``*_timeout`` types are 504, runner errors 503 (fal's table)."""
        status = status or (504 if error_type in ("request_timeout", "startup_timeout") else 503)
        return cls(status, {"detail": f"fake {error_type}", "error_type": error_type}, {"X-Fal-Error-Type": error_type})

    @classmethod
    def user_timeout(cls) -> Failure:
        return cls(
            504,
            {"detail": "Request timed out before a runner started", "error_type": "request_timeout"},
            {"X-Fal-Request-Timeout-Type": "user", "X-Fal-Error-Type": "request_timeout"},
        )

    @classmethod
    def validation(cls, loc: str, msg: str) -> Failure:
        return cls(422, {"detail": [{"loc": ["body", loc], "msg": msg, "type": "value_error"}]})

    @classmethod
    def needs_retry(cls) -> Failure:
        return cls(503, {"detail": "Runner restarting"}, {"X-Fal-Needs-Retry": "1"})


@dataclass
class Scenario:
    fail_submit: list[Failure] = field(default_factory=list)  # one consumed per queue submit / sync run
    fail_status: list[Failure] = field(default_factory=list)  # one consumed per status poll
    queue_polls: int = 0  # IN_QUEUE answers (positions counting down) before IN_PROGRESS
    progress_polls: int = 1  # IN_PROGRESS answers before COMPLETED; huge = never completes
    completed_error: Failure | None = None  # COMPLETED with an error; the result URL answers this failure
    result: Literal["ok", "malformed", "reset"] = "ok"  # how the output body is delivered
    output_status: int = 200  # e.g. 404: the output URL has expired
    output_base: str | None = None  # put output URLs on another origin
    queue_url_base: str | None = None  # put status/response/cancel URLs on another origin
    run_delay: float = 0.0  # sync mode: seconds before answering (a client disconnect is noticed)
    inference_time: float = 0.05
    # (count, failure): once ``count`` jobs were submitted and every one but the last has been polled, the
    # status polls of the last one answer ``failure`` (one call of several fails while its siblings run).
    fail_last_job: tuple[int, Failure] | None = None


@dataclass
class _Job:
    id: str
    app: str  # owner/alias: what the returned URLs use
    input: dict
    base: str
    polls: int = 0
    cancelled: bool = False
    failure: Failure | None = None

    def urls(self) -> dict[str, str]:
        url = f"{self.base}/{self.app}/requests/{self.id}"
        return {
            "request_id": self.id,
            "response_url": url,
            "status_url": f"{url}/status",
            "cancel_url": f"{url}/cancel",
        }


def _error(failure: Failure, rid: str) -> Response:
    headers = {"x-fal-request-id": rid, **failure.headers}
    if isinstance(failure.body, (bytes, str)):
        return Response(failure.body, failure.status, headers=headers)
    return JSONResponse(failure.body, failure.status, headers=headers)


def _check_input(data: Any) -> list[dict]:
    """fast-sdxl's input schema, the parts a gateway sends. Unknown keys are ignored, as pydantic does."""
    if not isinstance(data, dict):
        return [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
    errors = []

    def bad(loc: str, msg: str, kind: str = "value_error") -> None:
        errors.append({"loc": ["body", loc], "msg": msg, "type": kind})

    if not isinstance(data.get("prompt"), str):
        bad("prompt", "field required", "value_error.missing")
    size = data.get("image_size", "square_hd")
    if isinstance(size, dict):
        if not all(isinstance(size.get(k), int) and 0 < size[k] <= 14142 for k in ("width", "height")):
            bad("image_size", "width and height must be integers in 1..14142")
    elif size not in PRESETS:
        bad("image_size", f"value is not a valid enumeration member; permitted: {', '.join(PRESETS)}")
    ranges = {"num_images": (1, 8), "num_inference_steps": (1, 65), "guidance_scale": (0, 20)}
    for key, (lo, hi) in ranges.items():
        value = data.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not lo <= value <= hi
            or (key != "guidance_scale" and value != int(value))
        ):
            bad(key, f"ensure this value is between {lo} and {hi}")
    if data.get("format", "jpeg") not in ("jpeg", "png"):
        bad("format", "value is not a valid enumeration member; permitted: 'jpeg', 'png'")
    return errors


def _image(width: int, height: int, fmt: str, index: int) -> bytes:
    color = ((53 * index + 40) % 256, (97 * index + 80) % 256, (151 * index + 120) % 256)
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buf, format="PNG" if fmt == "png" else "JPEG")
    return buf.getvalue()


class FalFake:
    def __init__(self, key: str = "fal-test-key-0123456789") -> None:
        self.key = key
        self.scenario = Scenario()
        self.jobs: dict[str, _Job] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.log: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers) of every API call
        self.cancelled: list[str] = []  # request ids a PUT cancel reached while they were not done
        self.file_fetches: list[dict[str, str]] = []  # headers of each output fetch
        self.run_disconnects = 0
        self.cancel_seen = threading.Event()
        self.run_disconnect_seen = threading.Event()
        self.queue_url = self.run_url = ""
        self.queue_app = Starlette(
            routes=[
                Route("/files/{name}", self._file, methods=["GET"]),
                Route("/{owner}/{alias}/requests/{rid}/status", self._status, methods=["GET"]),
                Route("/{owner}/{alias}/requests/{rid}/cancel", self._cancel, methods=["PUT"]),
                Route("/{owner}/{alias}/requests/{rid}", self._result, methods=["GET"]),
                Route("/{app:path}", self._submit, methods=["POST"]),
            ]
        )
        self.run_app = Starlette(routes=[Route("/{app:path}", self._run, methods=["POST"])])

    def reset(self, **scenario: Any) -> Scenario:
        self.scenario = Scenario(**scenario)
        self.jobs.clear()
        self.files.clear()
        self.log.clear()
        self.cancelled.clear()
        self.file_fetches.clear()
        self.run_disconnects = 0
        self.cancel_seen.clear()
        self.run_disconnect_seen.clear()
        return self.scenario

    @contextmanager
    def serve(self) -> Iterator[FalFake]:
        with serve_app(self.queue_app) as queue_url, serve_app(self.run_app) as run_url:
            self.queue_url, self.run_url = queue_url, run_url
            yield self

    @property
    def output_host(self) -> str:
        """``host:port`` of the output files, for ``allowed_output_hosts``."""
        return self.queue_url.split("://", 1)[1]

    # -- shared ----------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        self.log.append((request.method, request.url.path, dict(request.headers)))
        return request.headers.get("authorization") == f"Key {self.key}"

    async def _accept(self, request: Request, rid: str) -> tuple[dict | None, Response | None]:
        """Auth, canned failures and input validation shared by submit and run."""
        if not self._authorized(request):
            return None, JSONResponse(
                {"detail": "No user found for Key ID and Secret"}, 401, headers={"x-fal-request-id": rid}
            )
        if self.scenario.fail_submit:
            return None, _error(self.scenario.fail_submit.pop(0), rid)
        try:
            data = await request.json()
        except ValueError:
            return None, JSONResponse(
                {"detail": [{"loc": ["body"], "msg": "Invalid JSON", "type": "json_invalid"}]},
                422,
                headers={"x-fal-request-id": rid},
            )
        errors = _check_input(data)
        if errors:
            return None, JSONResponse({"detail": errors}, 422, headers={"x-fal-request-id": rid})
        return data, None

    def _output(self, data: dict, base: str) -> dict:
        size = data.get("image_size", "square_hd")
        width, height = PRESETS[size] if isinstance(size, str) else (size["width"], size["height"])
        fmt = data.get("format", "jpeg")
        content_type = f"image/{fmt}"
        seed = data.get("seed", 42)
        images = []
        for i in range(data.get("num_images", 1)):
            raw = _image(width, height, fmt, seed + i)
            if data.get("sync_mode"):
                url = f"data:{content_type};base64,{base64.b64encode(raw).decode()}"
            else:
                name = f"{uuid.uuid4().hex}.{'png' if fmt == 'png' else 'jpg'}"
                self.files[name] = (raw, content_type)
                url = f"{self.scenario.output_base or base}/files/{name}"
            images.append({"url": url, "width": width, "height": height, "content_type": content_type})
        return {
            "images": images,
            "timings": {"inference": self.scenario.inference_time},
            "seed": seed,
            "has_nsfw_concepts": [False] * len(images),
            "prompt": data["prompt"],
        }

    def _deliver(self, output: dict, rid: str) -> Response:
        if self.scenario.result == "malformed":
            return Response(
                b'{"images": [{"url": ', 200, media_type="application/json", headers={"x-fal-request-id": rid}
            )
        if self.scenario.result == "reset":
            return _ResetMidBody()
        return JSONResponse(output, headers={"x-fal-request-id": rid})

    # -- queue ----------------------------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        rid = str(uuid.uuid4())
        data, error = await self._accept(request, rid)
        if error is not None:
            return error
        assert data is not None  # _accept returns one or the other
        owner, alias = request.path_params["app"].split("/")[:2]
        base = self.scenario.queue_url_base or str(request.base_url).rstrip("/")
        job = self.jobs[rid] = _Job(rid, f"{owner}/{alias}", data, base)
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                **job.urls(),
                "queue_position": self.scenario.queue_polls,
                "logs": None,
                "metrics": {},
            },
            headers={"x-fal-request-id": rid},
        )

    def _job(self, request: Request) -> _Job | None:
        job = self.jobs.get(request.path_params["rid"])
        app = f"{request.path_params['owner']}/{request.path_params['alias']}"
        return job if job is not None and job.app == app else None

    def _state(self, job: _Job) -> str:
        s = self.scenario
        if job.cancelled or job.polls > s.queue_polls + s.progress_polls:
            return "COMPLETED"
        return "IN_QUEUE" if job.polls <= s.queue_polls else "IN_PROGRESS"

    async def _status(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "Unauthorized"}, 401)
        job = self._job(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if self.scenario.fail_status:
            return _error(self.scenario.fail_status.pop(0), job.id)
        if self.scenario.fail_last_job is not None:
            count, failure = self.scenario.fail_last_job
            jobs = list(self.jobs.values())
            if len(jobs) >= count and job is jobs[-1] and all(j.polls for j in jobs[:-1]):
                return _error(failure, job.id)
        job.polls += 1
        state = self._state(job)
        with_logs = request.query_params.get("logs") in ("1", "true", "True")
        body: dict[str, Any] = {"status": state, **job.urls(), "metrics": {}, "logs": None}
        headers = {"x-fal-request-id": job.id}
        if state == "IN_QUEUE":
            body["queue_position"] = self.scenario.queue_polls - job.polls
            return JSONResponse(body, 202, headers=headers)
        if with_logs:
            body["logs"] = [
                {"message": "fake: denoising", "level": "INFO", "source": "user", "timestamp": "2025-01-01T00:00:00Z"}
            ]
        if state == "IN_PROGRESS":
            return JSONResponse(body, 202, headers=headers)
        body["metrics"] = {"inference_time": self.scenario.inference_time}
        if job.cancelled:
            body.update(error="Request was cancelled", error_type="request_cancelled")
        elif self.scenario.completed_error is not None:
            failure = self.scenario.completed_error
            detail = failure.body.get("detail") if isinstance(failure.body, dict) else failure.body
            body.update(
                error=str(detail),
                error_type=failure.headers.get("X-Fal-Error-Type")
                or (failure.body or {}).get("error_type")
                or "model_error",
            )
        return JSONResponse(body, 200, headers=headers)

    async def _result(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "Unauthorized"}, 401)
        job = self._job(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if self._state(job) != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, 400, headers={"x-fal-request-id": job.id})
        if job.cancelled:
            return JSONResponse({"detail": "Request was cancelled"}, 400, headers={"x-fal-request-id": job.id})
        if self.scenario.completed_error is not None:
            return _error(self.scenario.completed_error, job.id)
        return self._deliver(self._output(job.input, str(request.base_url).rstrip("/")), job.id)

    async def _cancel(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "Unauthorized"}, 401)
        job = self._job(request)
        if job is None:
            return JSONResponse({"status": "NOT_FOUND"}, 404)
        if self._state(job) == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400, headers={"x-fal-request-id": job.id})
        job.cancelled = True
        self.cancelled.append(job.id)
        self.cancel_seen.set()
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202, headers={"x-fal-request-id": job.id})

    async def _file(self, request: Request) -> Response:
        self.file_fetches.append(dict(request.headers))
        entry = self.files.get(request.path_params["name"])
        if entry is None or self.scenario.output_status != 200:
            return Response(b"<Error>expired</Error>", self.scenario.output_status if entry else 404)
        return Response(entry[0], media_type=entry[1])

    # -- sync -----------------------------------------------------------------------------------------

    async def _run(self, request: Request) -> Response:
        rid = str(uuid.uuid4())
        data, error = await self._accept(request, rid)
        if error is not None:
            return error
        assert data is not None  # _accept returns one or the other
        loop = asyncio.get_running_loop()
        until = loop.time() + self.scenario.run_delay
        while loop.time() < until:
            if await request.is_disconnected():  # fal cancels direct calls when the caller goes away
                self.run_disconnects += 1
                self.run_disconnect_seen.set()
                return Response(status_code=499)
            await asyncio.sleep(0.01)
        return self._deliver(self._output(data, self.queue_url), rid)


class _ResetMidBody(Response):
    """Announces a body, sends part of it, then breaks the connection (the server aborts the response)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope, receive, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"images": [{"url": "', "more_body": True})
        raise ConnectionAbortedError("fake fal: connection reset mid-body")
