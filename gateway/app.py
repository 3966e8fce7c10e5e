"""The ASGI application: the generations hot path, the other endpoints, and the backends' lifecycle.

``create_app(config)`` returns an ASGI app. On start-up (the ASGI lifespan) every backend's ``start()``
runs in the background; start-up waits up to ``server.startup_wait_s`` (routes.yaml) for them, so quick
backends are ready when the server starts listening and slow ones (model loading, compilation) keep going
while ``/healthz`` answers and ``/readyz`` reports progress.

Endpoints: ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /v1/config`` (redacted),
``GET /v1/images/files/{id}``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from backends import errors, registry
from backends.base import Backend
from gateway.config import Config, load_config
from gateway.dispatch import Dispatcher
from gateway.handler import GenerationsHandler
from gateway.images import IMAGE_DIR_ENV, open_store
from gateway.logs import get_logger, set_secrets
from gateway.metrics import Metrics
from gateway.stats import StatsBook

GENERATIONS = "/v1/images/generations"


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(error: errors.ImagegateError) -> Response:
    return Response(orjson.dumps(error.to_body()), status_code=error.status, media_type="application/json")


class Gateway:
    """One gateway: config snapshot, backends, stats, metrics, and the ASGI entry point."""

    def __init__(self, config: Config, backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config
        set_secrets(config.secrets)  # logged tracebacks and error fields are scrubbed of them
        self.backends: dict[str, Backend] = (
            dict(backends)
            if backends is not None
            else {name: registry.create(b.spec) for name, b in config.backends.items()}
        )
        self.log = get_logger("imagegate")
        self.metrics = Metrics(self.backends)
        self.stats = StatsBook(self.backends, config.server.cooldown_failures, config.server.cooldown_s)
        self.dispatcher = Dispatcher(config, self.backends, self.stats, on_attempt=self.metrics.observe_attempt)
        self.images = open_store(config.server)
        self.generations = GenerationsHandler(
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            images=self.images,
            log=get_logger("imagegate.access"),
            base_url=self._base_url,
        )
        self.startup: dict[str, dict[str, Any]] = {name: {"state": "pending"} for name in self.backends}
        self._start_tasks: list[asyncio.Task[None]] = []
        self.starlette = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.prometheus),
                Route("/v1/models", self.models),
                Route("/v1/config", self.show_config),
                Route("/v1/images/files/{key}", self.image_file),
                Route(GENERATIONS, self.generations_wrong_method, methods=["GET", "PUT", "DELETE", "PATCH"]),
            ],
            # Registered for HTTPException only; starlette's type for a handler takes any Exception.
            exception_handlers={HTTPException: self._http_exception},  # type: ignore[dict-item]  # see above
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The hot path bypasses Starlette's routing and request objects entirely.
        if scope["type"] == "http" and scope["path"] == GENERATIONS and scope["method"] == "POST":
            await self.generations(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)

    # -- lifecycle ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.log.info(
            "starting", config=self.config.source, backends=list(self.backends), disabled=dict(self.config.disabled)
        )
        self._start_tasks = [asyncio.create_task(self._start(name, b)) for name, b in self.backends.items()]
        if self._start_tasks:
            await asyncio.wait(self._start_tasks, timeout=self.config.server.startup_wait_s)
        try:
            yield
        finally:
            for task in self._start_tasks:
                task.cancel()
            await asyncio.gather(*self._start_tasks, return_exceptions=True)
            await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)

    async def _start(self, name: str, backend: Backend) -> None:
        began = time.perf_counter()
        self.startup[name] = {"state": "starting"}
        self.log.info("backend_starting", backend=name, type=backend.spec.type)
        try:
            await backend.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - however it fails, the backend is reported, the rest start
            message = errors.scrub(f"{type(exc).__name__}: {exc}", self.config.secrets, limit=500)
            self.startup[name] = {"state": "failed", "error": message}
            required = self.config.backends[name].required
            self.log.error("backend_failed_to_start", backend=name, required=required, error=message)
            return
        seconds = round(time.perf_counter() - began, 3)
        self.startup[name] = {"state": "started", "seconds": seconds}
        self.log.info("backend_started", backend=name, seconds=seconds)

    # -- endpoints ----------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        backends = {}
        ready = True
        for name, backend in self.backends.items():
            is_ready = backend.ready()
            required = self.config.backends[name].required
            backends[name] = {"ready": is_ready, "required": required, **self.startup[name]}
            ready = ready and (is_ready or not required)
        return _json({"ready": ready, "backends": backends}, 200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        cfg = self.config
        data = []
        for name in cfg.models:
            tier = cfg.tiers.get(name)
            routes = [
                r
                for r in cfg.routes
                if (name in r.match.tiers or (tier is not None and not r.match.tiers and not r.match.models))
                or name in r.match.models
            ]
            backends = list(dict.fromkeys(c.backend for r in routes for c in r.candidates))
            # Only backends that can ever serve it: the router drops a candidate below the tier's quality
            # floor (a model named without a tier gets the default tier's).
            floor_tier = tier or (cfg.tiers.get(cfg.default_tier) if cfg.default_tier else None)
            floor = floor_tier.quality_floor if floor_tier else 0.0
            serving = [b for b in backends if cfg.backends[b].quality >= floor]
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "imagegate",
                "kind": "tier" if tier else "model",
                "routes": [r.name for r in routes],
                "backends": [self._describe(b) for b in serving],
            }
            if not serving:
                entry["note"] = (
                    f"no backend meets quality_floor {floor}"
                    + (f" of tier {floor_tier.name!r}" if floor_tier and not tier else "")
                    if backends
                    else "no backend is configured for it"
                )
            if tier:
                entry.update(
                    quality_floor=tier.quality_floor,
                    latency_budget_s=tier.latency_budget_s,
                    description=tier.description,
                )
            data.append(entry)
        return _json({"object": "list", "data": data})

    def _describe(self, name: str) -> dict[str, Any]:
        b = self.config.backends[name]
        # A backend may describe itself (the local backend says plainly when its weights are random).
        description = getattr(self.backends[name], "description", None) or b.description
        return {
            "name": name,
            "type": b.type,
            "quality": b.quality,
            "description": description,
            "ready": self.backends[name].ready(),
        }

    async def show_config(self, request: Request) -> Response:
        return _json(
            {"source": self.config.source, "config": self.config.redacted(), "disabled": dict(self.config.disabled)}
        )

    async def image_file(self, request: Request) -> Response:
        item = self.images.get(request.path_params["key"])
        if item is None:
            return _error(errors.NotFound("image not found or expired"))
        data, content_type = item
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=600"})

    async def generations_wrong_method(self, request: Request) -> Response:
        return _error(errors.MethodNotAllowed(f"use POST {GENERATIONS}"))

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return _error(errors.NotFound(f"no such endpoint: {request.url.path}"))
        if exc.status_code == 405:
            return _error(errors.MethodNotAllowed(f"method {request.method} not allowed here"))
        return _json(
            {
                "error": {
                    "message": str(exc.detail),
                    "type": "invalid_request_error",
                    "param": None,
                    "code": str(exc.status_code),
                }
            },
            exc.status_code,
        )

    def _base_url(self, scope: Scope) -> str:
        """Where image links point: ``server.public_url``, else the address this server is bound to (the
        socket's own address, so the interface the client reached). Never the request's ``Host`` header:
        any client can send any Host, and the link would then send the image's reader elsewhere."""
        public = self.config.server.public_url
        if public:
            return public.rstrip("/")
        server = scope.get("server")
        if server is None or server[1] is None:  # a Unix socket has no address to give
            host, port = self.config.server.host, self.config.server.port
        else:
            host, port = server
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return f"{scope.get('scheme', 'http')}://{host}:{port}"


def create_app(config: Config, backends: Mapping[str, Backend] | None = None) -> Gateway:
    """The gateway as an ASGI app. ``backends`` overrides construction from config (tests)."""
    return Gateway(config, backends)


def app_from_env() -> Gateway:
    """uvicorn factory for ``--workers N``: each worker process loads ``$IMAGEGATE_CONFIG``."""
    from gateway.logs import configure

    configure()
    config = load_config(os.environ.get("IMAGEGATE_CONFIG") or None)
    shared = os.environ.get(IMAGE_DIR_ENV)
    if shared and not config.server.image_dir:  # url images go where every worker can read them
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, image_dir=shared))
    return create_app(config)
