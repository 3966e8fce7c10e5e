"""A fake of Replicate's predictions API, served over real HTTP on 127.0.0.1 (``tests.servers.serve_app``).

It follows the documented shapes: ``POST /v1/predictions`` (``version``), ``/v1/models/{owner}/{name}/predictions``
and ``/v1/deployments/{owner}/{name}/predictions`` answer 201 with a prediction object; ``Prefer: wait[=N]``
holds the create open until the prediction is terminal or N seconds pass; ``Cancel-After`` stops it
(``aborted`` if it never started, ``canceled`` if it was running); ``GET /v1/predictions/{id}`` polls;
``POST /v1/predictions/{id}/cancel`` cancels; errors are RFC 7807 problem bodies (``title``, ``detail``,
``status``); outputs are served from the fake's own ``/delivery/...`` path (standing in for
``replicate.delivery``) or as ``data:`` URIs. A small model catalog validates inputs the way the real
schemas do (SDXL, FLUX schnell/dev/1.1-pro) and renders solid-colour images of the right size and format.

Failures on demand: ``fake.plan(Scenario(...), ...)`` queues what the next creates do (throttle with
Retry-After, 503, fail, take long, expire or misplace outputs, send malformed JSON, reset mid-body...).
Everything the fake receives (output fetches included) is recorded in ``fake.requests``; cancels in
``fake.cancels``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from PIL import Image as PILImage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import serve_app

TOKEN = "r8_fakeTokenForTests0123456789abcdef"

FLUX_SIZES = {  # FLUX.1 output sizes at 1 megapixel, per aspect ratio (0.25 MP: half each side)
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
FORMATS = {"png": ("PNG", "image/png"), "jpg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


# -- model catalog -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    """One input field of a model's schema."""

    type: type
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    required: bool = False


@dataclass(frozen=True)
class FakeModel:
    name: str
    version: str
    schema: Mapping[str, F]
    single_output: bool = False  # the output is one URL string instead of a list
    default_format: str = "png"

    def size(self, inp: Mapping[str, Any]) -> tuple[int, int]:
        if "aspect_ratio" in self.schema:
            ratio = inp.get("aspect_ratio", "1:1")
            if ratio == "custom":
                return int(inp.get("width", 1024)), int(inp.get("height", 1024))
            w, h = FLUX_SIZES[ratio]
            if inp.get("megapixels") == "0.25":
                w, h = w // 2, h // 2
            return w, h
        return int(inp.get("width", 1024)), int(inp.get("height", 1024))


_COMMON = {"prompt": F(str, required=True), "seed": F(int)}
_FLUX = {
    **_COMMON,
    "aspect_ratio": F(str, choices=tuple(FLUX_SIZES)),
    "num_outputs": F(int, 1, 4),
    "output_format": F(str, choices=("webp", "jpg", "png")),
    "output_quality": F(int, 0, 100),
    "megapixels": F(str, choices=("1", "0.25")),
    "disable_safety_checker": F(bool),
    "go_fast": F(bool),
}
MODELS = {
    m.name: m
    for m in (
        FakeModel(
            "stability-ai/sdxl",
            "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc",
            {
                **_COMMON,
                "negative_prompt": F(str),
                "width": F(int, 128, 2048),
                "height": F(int, 128, 2048),
                "num_outputs": F(int, 1, 4),
                "num_inference_steps": F(int, 1, 500),
                "guidance_scale": F(float, 1, 50),
                "scheduler": F(str, choices=("DDIM", "DPMSolverMultistep", "K_EULER", "PNDM")),
                "refine": F(str, choices=("no_refiner", "expert_ensemble_refiner", "base_image_refiner")),
                "apply_watermark": F(bool),
                "disable_safety_checker": F(bool),
            },
        ),
        FakeModel(
            "black-forest-labs/flux-schnell",
            "c846a69991daf4c0e5d016514849d14ee5b2e6846ce6b9d6f21369e564cfe51e",
            {**_FLUX, "num_inference_steps": F(int, 1, 4)},
            default_format="webp",
        ),
        FakeModel(
            "black-forest-labs/flux-dev",
            "6e4a938f85952bdabcc15aa329178c4d681c52bf25a0342403287dc26944661d",
            {**_FLUX, "num_inference_steps": F(int, 1, 50), "guidance": F(float, 0, 10)},
            default_format="webp",
        ),
        FakeModel(
            "black-forest-labs/flux-1.1-pro",
            "80a09d66baa990429c2f5ae8a4306bf778a1b3775afd01cc2cc8bdbe9033769c",
            {
                **_COMMON,
                "aspect_ratio": F(str, choices=(*FLUX_SIZES, "custom")),
                "width": F(int, 256, 1440),
                "height": F(int, 256, 1440),
                "output_format": F(str, choices=("webp", "jpg", "png")),
                "output_quality": F(int, 0, 100),
                "safety_tolerance": F(int, 1, 6),
                "prompt_upsampling": F(bool),
            },
            single_output=True,
            default_format="webp",
        ),
    )
}
DEPLOYMENTS = {"acme/sdxl-prod": "stability-ai/sdxl", "acme/flux-fast": "black-forest-labs/flux-schnell"}


def validate(model: FakeModel, inp: Any) -> list[dict[str, str]]:
    """Replicate-style ``invalid_fields`` for ``inp`` (unknown fields are ignored, as the API does)."""
    if not isinstance(inp, dict):
        return [{"type": "invalid_type", "field": "input", "description": "Invalid type. Expected: object"}]
    problems = []
    for name, spec in model.schema.items():
        if name not in inp:
            if spec.required:
                problems.append({"type": "required", "field": "input", "description": f"{name} is required"})
            continue
        value = inp[name]
        ok_type = isinstance(value, spec.type) and not (spec.type is int and isinstance(value, bool))
        if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok_type = True
        where = f"input.{name}"
        if not ok_type:
            problems.append(
                {"type": "invalid_type", "field": where, "description": f"Invalid type. Expected: {spec.type.__name__}"}
            )
        elif spec.choices and value not in spec.choices:
            problems.append(
                {
                    "type": "enum",
                    "field": where,
                    "description": f"{name} must be one of the following: " + ", ".join(f'"{c}"' for c in spec.choices),
                }
            )
        elif spec.minimum is not None and value < spec.minimum:
            problems.append(
                {
                    "type": "number_gte",
                    "field": where,
                    "description": f"Must be greater than or equal to {spec.minimum:g}",
                }
            )
        elif spec.maximum is not None and value > spec.maximum:
            problems.append(
                {"type": "number_lte", "field": where, "description": f"Must be less than or equal to {spec.maximum:g}"}
            )
    return problems


def render(model: FakeModel, inp: Mapping[str, Any], index: int) -> tuple[bytes, str]:
    """A solid-colour image of the size and format the real model would make; colour from prompt/seed/index."""
    width, height = model.size(inp)
    fmt = inp.get("output_format", model.default_format)
    digest = hashlib.sha256(f"{inp.get('prompt')}|{inp.get('seed')}|{index}".encode()).digest()
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), tuple(digest[:3])).save(buf, format=FORMATS[fmt][0])
    return buf.getvalue(), fmt


# -- scenarios ---------------------------------------------------------------------------------------------

Broken = Literal["malformed", "reset"]


@dataclass
class Scenario:
    """What the fake does with one create (and the prediction it makes)."""

    # Answer the create with this HTTP error status instead of creating a prediction.
    http_status: int | None = None
    retry_after: str | None = None
    detail: str | None = None
    queue_s: float = 0.0  # time in "starting"
    run_s: float = 0.0  # time in "processing"
    # "aborted" plays a Cancel-After that fired before the prediction started (it never runs).
    outcome: Literal["succeeded", "failed", "canceled", "aborted"] = "succeeded"
    error: str = "RuntimeError: the model raised an exception"
    # url: delivery URLs; data: data: URIs; expired: delivery URLs that answer 404; foreign: URLs on
    # another host name (localhost) than the API's; garbage: an output that is not a URL list.
    output: Literal["url", "data", "expired", "foreign", "garbage"] = "url"
    break_create: Broken | None = None
    break_poll: Broken | None = None
    # The first ``poll_errors`` GETs of the prediction answer ``poll_status`` (e.g. 429 or 502).
    poll_status: int = 503
    poll_errors: int = 0
    # The prediction's ``urls`` name another host (localhost) than the one the client called.
    foreign_urls: bool = False
    # Put the output URLs on this origin (e.g. a fake output host) instead of the fake's own /delivery.
    output_base: str | None = None
    # The create is not answered until this is set (the prediction is made, and runs, meanwhile).
    hold_create: threading.Event | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class _Prediction:
    id: str
    model: FakeModel
    input: dict[str, Any]
    scenario: Scenario
    created: float
    cancel_after: float | None = None
    canceled_at: float | None = None
    files: list[str] = field(default_factory=list)
    polls: int = 0

    def times(self) -> tuple[float, float]:
        start = self.created + self.scenario.queue_s
        return start, start + self.scenario.run_s

    def state(self, now: float) -> tuple[str, float | None, float | None]:
        """(status, started_at, completed_at) at wall-clock ``now``."""
        start, done = self.times()
        stop = min(t for t in (self.canceled_at, self.cancel_after, float("inf")) if t is not None)
        if stop < done and stop <= now:
            if stop < start:
                # Cancel-After before it started is "aborted"; an explicit cancel is "canceled".
                return ("canceled" if stop == self.canceled_at else "aborted"), None, stop
            return "canceled", start, stop
        if now < start:
            return "starting", None, None
        if now < done:
            return "processing", start, None
        if self.scenario.outcome == "aborted":
            return "aborted", None, done
        return self.scenario.outcome, start, done


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float | None:
    """Go-style durations as ``Cancel-After`` takes them: ``30s``, ``1m``, ``1h30m``, ``500ms``."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in _DURATION.findall(text))


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"title": title, "detail": detail, "status": status, **extra},
        status_code=status,
        media_type="application/problem+json",
    )


class _ResetResponse(Response):
    """Promises a long JSON body, sends a piece of it, then drops the connection."""

    def __init__(self, status_code: int = 201) -> None:
        super().__init__(status_code=status_code)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "x", "status": "proc', "more_body": True})
        raise ConnectionResetError("fake: connection reset mid-body")


def _broken(kind: Broken, status: int) -> Response:
    if kind == "reset":
        return _ResetResponse(status)
    return Response(
        b'{"id": "p1", "status": "succeeded", "output": ["ht', status_code=status, media_type="application/json"
    )


# -- the fake ----------------------------------------------------------------------------------------------


class FakeReplicate:
    """State plus a Starlette ``app``. Use ``with fake.serve() as base_url:`` to run it."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests: list[Recorded] = []
        self.cancels: list[str] = []
        self.predictions: dict[str, _Prediction] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.expired: set[str] = set()
        self._scenarios: collections.deque[Scenario] = collections.deque()
        self._lock = threading.Lock()
        self.base_url = ""
        self.app = Starlette(
            routes=[
                Route("/v1/predictions", self.create_version, methods=["POST"]),
                Route("/v1/models/{owner}/{name}/predictions", self.create_model, methods=["POST"]),
                Route("/v1/deployments/{owner}/{name}/predictions", self.create_deployment, methods=["POST"]),
                Route("/v1/predictions/{id}", self.get, methods=["GET"]),
                Route("/v1/predictions/{id}/cancel", self.cancel, methods=["POST"]),
                Route("/delivery/{file_id}/{filename}", self.delivery, methods=["GET"]),
            ]
        )

    # -- test API -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        with serve_app(self.app) as base:
            self.base_url = base
            yield base

    def reset(self) -> None:
        """Forget what was recorded and queued (predictions and files stay, as on the real service)."""
        with self._lock:
            self._scenarios.clear()
        self.requests.clear()
        self.cancels.clear()

    def plan(self, *scenarios: Scenario) -> None:
        """Queue what the next creates do; once the queue is empty, creates succeed at once."""
        with self._lock:
            self._scenarios.extend(scenarios)

    def creates(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/predictions")]

    # -- handlers -------------------------------------------------------------------------------------------

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append(
            Recorded(request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        return body

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _unauthenticated(self) -> JSONResponse:
        return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    async def create_version(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._unauthenticated()
        version = body.get("version") if isinstance(body, dict) else None
        model = next((m for m in MODELS.values() if m.version == version), None)
        if model is None:
            return _problem(
                422,
                "Invalid version or not permitted",
                "The specified version does not exist (or perhaps you don't have permission to use it?)",
            )
        return await self._create(request, model, body)

    async def create_model(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._unauthenticated()
        model = MODELS.get(f"{request.path_params['owner']}/{request.path_params['name']}")
        if model is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        return await self._create(request, model, body)

    async def create_deployment(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._unauthenticated()
        target = DEPLOYMENTS.get(f"{request.path_params['owner']}/{request.path_params['name']}")
        if target is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        return await self._create(request, MODELS[target], body)

    async def _create(self, request: Request, model: FakeModel, body: Any) -> Response:
        with self._lock:
            scenario = self._scenarios.popleft() if self._scenarios else Scenario()
        if scenario.http_status is not None:
            headers = {"Retry-After": scenario.retry_after} if scenario.retry_after else None
            titles = {429: "Request was throttled.", 503: "Service Unavailable"}
            detail = scenario.detail or (
                "Request was throttled. Expected available in 1 second."
                if scenario.http_status == 429
                else "The service is temporarily unavailable."
            )
            response = _problem(scenario.http_status, titles.get(scenario.http_status, "Error"), detail)
            if headers:
                response.headers.update(headers)
            return response
        inp = body.get("input") if isinstance(body, dict) else None
        problems = validate(model, inp)
        if problems:
            detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
            return _problem(422, "Input validation failed", detail, invalid_fields=problems)
        assert isinstance(inp, dict)  # validate() refuses anything else
        cancel_after = None
        if "cancel-after" in request.headers:
            seconds = parse_duration(request.headers["cancel-after"])
            if seconds is None:
                return _problem(400, "Invalid Cancel-After header", "Cancel-After must be a duration like 30s or 1m")
            cancel_after = time.time() + seconds
        pred = _Prediction(
            id=uuid.uuid4().hex[:26],
            model=model,
            input=dict(inp),
            scenario=scenario,
            created=time.time(),
            cancel_after=cancel_after,
        )
        self.predictions[pred.id] = pred
        wait = self._prefer_wait(request.headers.get("prefer"))
        if wait:
            end = time.monotonic() + wait
            while time.monotonic() < end and self._status(pred) not in ("succeeded", "failed", "canceled", "aborted"):
                await asyncio.sleep(0.01)
        if scenario.hold_create is not None:
            end = time.monotonic() + 60  # a test that forgets to release it still ends
            while not scenario.hold_create.is_set() and time.monotonic() < end:
                await asyncio.sleep(0.01)
        if scenario.break_create:
            return _broken(scenario.break_create, 201)
        return JSONResponse(self.view(pred, request), status_code=201)

    async def get(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._unauthenticated()
        pred = self.predictions.get(request.path_params["id"])
        if pred is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        pred.polls += 1
        if pred.polls <= pred.scenario.poll_errors:
            response = _problem(pred.scenario.poll_status, "Error", "temporary failure")
            if pred.scenario.poll_status == 429:
                response.headers["Retry-After"] = "0"
            return response
        if pred.scenario.break_poll:
            return _broken(pred.scenario.break_poll, 200)
        return JSONResponse(self.view(pred, request))

    async def cancel(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._unauthenticated()
        pred = self.predictions.get(request.path_params["id"])
        if pred is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        self.cancels.append(pred.id)
        if self._status(pred) in ("starting", "processing"):
            pred.canceled_at = time.time()
        return JSONResponse(self.view(pred, request))

    async def delivery(self, request: Request) -> Response:
        await self._record(request)
        file_id = request.path_params["file_id"]
        if file_id in self.expired or file_id not in self.files:
            return Response("Not Found", status_code=404, media_type="text/plain")
        data, fmt = self.files[file_id]
        return Response(data, media_type=FORMATS[fmt][1])

    # -- views ----------------------------------------------------------------------------------------------

    @staticmethod
    def _prefer_wait(header: str | None) -> float:
        if not header:
            return 0.0
        for part in header.split(","):
            key, _, value = part.strip().partition("=")
            if key == "wait":
                try:
                    return min(60.0, max(1.0, float(value))) if value else 60.0
                except ValueError:
                    return 60.0
        return 0.0

    def _status(self, pred: _Prediction) -> str:
        return pred.state(time.time())[0]

    def _outputs(self, pred: _Prediction, api_base: str) -> Any:
        s = pred.scenario
        if s.output == "garbage":
            return {"images": 3}
        if not pred.files:  # render once, on first view after success
            count = 1 if pred.model.single_output else int(pred.input.get("num_outputs", 1))
            for index in range(count):
                data, fmt = render(pred.model, pred.input, index)
                file_id = uuid.uuid4().hex
                self.files[file_id] = (data, fmt)
                pred.files.append(f"{file_id}/out-{index}.{fmt}")
                if s.output == "expired":
                    self.expired.add(file_id)
        if s.output == "data":
            urls = []
            for path in pred.files:
                data, fmt = self.files[path.split("/")[0]]
                urls.append(f"data:{FORMATS[fmt][1]};base64,{base64.b64encode(data).decode()}")
        else:
            base = api_base.replace("127.0.0.1", "localhost") if s.output == "foreign" else api_base
            base = s.output_base or base
            urls = [f"{base}/delivery/{path}" for path in pred.files]
        return urls[0] if pred.model.single_output else urls

    def view(self, pred: _Prediction, request: Request) -> dict[str, Any]:
        """The prediction object as the API returns it."""
        api = str(request.base_url).rstrip("/")
        links = api.replace("127.0.0.1", "localhost") if pred.scenario.foreign_urls else api
        status, started, completed = pred.state(time.time())
        out: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model.name,
            "version": pred.model.version,
            "input": pred.input,
            "logs": "" if status == "starting" else "Running predict()...\n",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": status,
            "source": "api",
            "created_at": _iso(pred.created),
            "started_at": _iso(started),
            "completed_at": _iso(completed),
            "metrics": {},
            "urls": {
                "get": f"{links}/v1/predictions/{pred.id}",
                "cancel": f"{links}/v1/predictions/{pred.id}/cancel",
                "stream": f"{links}/stream/{pred.id}",
                "web": f"{links}/p/{pred.id}",
            },
        }
        if completed is not None and started is not None:
            out["metrics"] = {
                "predict_time": round(completed - started, 6),
                "total_time": round(completed - pred.created, 6),
            }
        if status == "succeeded":
            out["output"] = self._outputs(pred, api)
        elif status == "failed":
            out["error"] = pred.scenario.error
        return out
