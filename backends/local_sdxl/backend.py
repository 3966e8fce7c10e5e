"""``LocalSDXLBackend``: the embedded SDXL pipeline behind the gateway's backend contract.

The event loop only validates, enqueues and awaits; the device worker (``worker.py``) loads, compiles,
warms and runs everything. Importing this module does not import torch (``imagegate check`` reads
``LocalSDXLBackend.Settings``); ``start()`` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from types import MappingProxyType

import structlog

from backends.base import (
    BackendSpec,
    Capabilities,
    ImageRequest,
    ImageResult,
    Load,
    LoadCounter,
    StageClock,
    Usage,
)
from backends.errors import BackendFailed, BackendUnavailable
from backends.settings import SettingsError

from . import settings as _settings  # for annotations in the class, where Settings / Options are its attributes
from .settings import Options, Resolved, Settings, available_decoders
from .worker import Job, JobResult, Worker

log = structlog.get_logger("imagegate.local_sdxl")

STAGES = ("queue", "text_encode", "denoise", "decode", "encode")


def describe(settings: Settings) -> str:
    """What this backend serves, for logs and /v1/models (says plainly when images are noise)."""
    if settings.preset == "tiny":
        return "preset tiny: test-size SDXL with random weights, images are noise"
    if settings.preset == "sdxl-random":
        return "preset sdxl-random: full-size SDXL architecture with random weights (benchmarks), images are noise"
    return f"SDXL {settings.model}" + (f" + TAESD {settings.taesd}" if settings.taesd else "")


class LocalSDXLBackend:
    """One SDXL pipeline on one device. For several GPUs, configure one backend per ``device``."""

    Settings = Settings
    Options = Options

    # -- config-time hooks (see backends.base): routing decisions belong to the router ---------------

    @staticmethod
    def check_options(settings: _settings.Settings, options: _settings.Options) -> None:
        available = available_decoders(settings)
        if options.decoder is not None and options.decoder not in available:
            raise SettingsError(
                "decoder",
                f"decoder {options.decoder!r} is not available with these settings (available: {', '.join(available)})",
            )

    @staticmethod
    def capabilities_for(settings: _settings.Settings, declared: Capabilities) -> Capabilities:
        """With ``unlisted_shape: refuse`` only the listed shapes can be served: their sizes, and per size
        at most its largest listed batch (within what routes.yaml declared)."""
        if settings.unlisted_shape != "refuse":
            return declared
        largest: dict[str, int] = {}
        for shape in settings.listed_shapes:
            size = f"{shape.width}x{shape.height}"
            largest[size] = max(largest.get(size, 0), shape.batch)
        served = {}
        for size, batch in largest.items():
            width, height = (int(side) for side in size.split("x"))
            if declared.refusal(ImageRequest(prompt="", width=width, height=height)) is None:
                served[size] = min(batch, declared.max_n_per_size.get(size, declared.max_n))
        if not served:
            raise SettingsError(
                "settings.shapes",
                f"unlisted_shape is refuse and no listed shape "
                f"({', '.join(largest)}) is within the declared capabilities",
            )
        return dataclasses.replace(declared, sizes=tuple(served), max_n_per_size=MappingProxyType(served))

    def __init__(self, spec: BackendSpec) -> None:
        # Capabilities are checked in one place, the router. So that nothing needs re-checking per request,
        # the spec must already say what these settings can serve (the config's specs always do).
        if self.capabilities_for(spec.settings, spec.capabilities) != spec.capabilities:
            raise ValueError(
                f"{spec.name}: with unlisted_shape: refuse, the capabilities must be narrowed to the "
                "listed shapes (LocalSDXLBackend.capabilities_for), as the config does"
            )
        self.spec = spec
        self.settings: Settings = spec.settings
        self.description = describe(self.settings)
        self.resolved: Resolved | None = None
        self.worker: Worker | None = None
        self._counter = LoadCounter()
        self._ready = False

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, compile and warm every listed shape on the worker thread; ready only afterwards."""
        from .pipeline import build_pipeline

        settings = self.settings
        holder: dict[str, Resolved] = {}

        def factory():
            pipeline = build_pipeline(settings)
            holder["resolved"] = pipeline.resolved
            return pipeline

        # The resolved shapes exist only once the factory ran on the worker thread: padded_batch reads them
        # through this closure.
        worker = Worker(
            self.spec.name,
            factory,
            padded_batch=lambda w, h, n: holder["resolved"].padded_batch(w, h, n),
            max_batch=settings.batch_limit,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
        )
        self.worker = worker
        pipeline = await asyncio.wrap_future(worker.start())
        self.resolved = pipeline.resolved
        self.description = f"{describe(settings)} [{getattr(pipeline.c, 'source', '')}]".replace(" []", "")
        log.info(
            "local_sdxl.ready",
            backend=self.spec.name,
            source=self.description,
            shapes=self.resolved.describe_shapes(),
            decoders=list(pipeline.decoders),
        )
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)

    def ready(self) -> bool:
        return self._ready and self.worker is not None and self.worker.broken is None

    def load(self) -> Load:
        if self.worker is None:
            return Load(in_flight=self._counter.in_flight)
        return Load(
            in_flight=self._counter.in_flight,
            queue_depth=self.worker.queue_depth(),
            est_wait_s=self.worker.est_wait_s(),
        )

    # -- requests ---------------------------------------------------------------------------------------

    def make_job(self, request: ImageRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Turn a planned ``request`` into a queued job.

        What the request may ask is checked before it gets here, once: sizes, n and steps by the router
        against the capabilities (with ``unlisted_shape: refuse``, only the listed shapes: see ``__init__``),
        the output format by the dispatcher (one of ``capabilities.output_formats``). Only the decoder is
        checked here, against what the worker actually loaded: a miss is this backend's failure
        (``BackendFailed``, the next candidate is tried), never the caller's."""
        settings, resolved = self.settings, self.resolved
        assert resolved is not None and self.worker is not None
        decoder = request.options.get("decoder") or settings.default_decoder
        decoders = self.worker.pipeline.decoders
        if decoder not in decoders:
            raise BackendFailed(f"{self.spec.name}: decoder {decoder!r} is not loaded (loaded: {', '.join(decoders)})")
        eager = resolved.padded_batch(request.width, request.height, request.n) is None
        if eager:
            log.warning(
                "local_sdxl.unlisted_shape",
                backend=self.spec.name,
                size=request.size,
                n=request.n,
                note="running uncompiled",
            )
        base = request.seed if request.seed is not None else secrets.randbelow(2**62)
        return Job(
            prompt=request.prompt,
            negative=request.negative_prompt,
            n=request.n,
            seeds=tuple((base + i) % 2**63 for i in range(request.n)),
            guidance=settings.default_guidance if request.guidance_scale is None else request.guidance_scale,
            width=request.width,
            height=request.height,
            steps=request.steps or settings.default_steps,
            decoder=decoder,
            eager=eager,
            output_format=request.output_format,
            compression=request.output_compression,
            deadline=request.deadline,
            loop=loop,
            future=loop.create_future(),
        )

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        worker = self.worker
        if worker is None or not self.ready():
            raise BackendUnavailable(f"{self.spec.name}: not ready")
        with self._counter.track():
            job = self.make_job(request, asyncio.get_running_loop())
            worker.submit(job)
            try:
                with clock.waiting():
                    result: JobResult = await job.future
            except asyncio.CancelledError:
                job.cancel()  # still queued → never runs; already running → its result is dropped
                raise
        for name in STAGES:
            if name in result.stages:
                clock.stage(name, result.stages[name])
        return ImageResult(
            images=result.images,
            usage=Usage(
                images=request.n,
                megapixels=request.n * request.megapixels,
                steps=job.steps,
                gpu_seconds=result.gpu_seconds,
            ),
        )
