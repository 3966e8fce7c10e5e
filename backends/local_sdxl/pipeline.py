"""The tuned SDXL text-to-image path: encode prompts, denoise, decode — one readable function per stage.

It follows diffusers' ``StableDiffusionXLPipeline`` (same embeddings, time ids, CFG and VAE scaling) with
the changes that make it fast on a GPU:

* the denoising loop never synchronizes host and device: the scheduler's per-step coefficients and the
  step index are device tensors (``scheduler.py``), the UNet gets a device timestep, guidance is a device
  tensor, and nothing reads a tensor value on the host until the decoded image is copied out;
* that loop can therefore be captured as one CUDA graph per listed shape (``cudagraph.py``) and replayed;
* UNet and decoders are ``torch.compile``d with pinned shapes, warmed for every listed shape at start-up;
* the VAE decodes in bf16 without the fp32 upcast, or TAESD decodes the same latents in ~1 ms;
* prompt embeddings are LRU-cached by (prompt, negative prompt);
* stage times come from CUDA events read after the final copy (no syncs inside), perf counters on CPU.

Everything here runs on the worker thread; nothing touches the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import structlog
import torch

from .cudagraph import CapturedLoop, capture_loop
from .scheduler import DPMSolver2MKarras
from .settings import Resolved, Settings
from .support import EmbeddingCache, StageTimer, resolve_device, to_device, to_uint8

log = structlog.get_logger("imagegate.local_sdxl")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DECODERS = ("full", "taesd")


@dataclass(frozen=True, slots=True)
class Batch:
    """One device run. Per-image lists (prompt pairs, seeds, guidance) have the real image count;
    ``padded`` is the run's batch (>= real count, a listed shape's batch) — extra rows are discarded."""

    width: int
    height: int
    steps: int
    decoder: str
    prompts: tuple[tuple[str, str | None], ...]
    seeds: tuple[int, ...]
    guidance: tuple[float, ...]
    padded: int
    eager: bool = False

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.width, self.height, self.padded, self.steps)


@dataclass(slots=True)
class RunOutput:
    images: list[np.ndarray]  # HxWx3 uint8, one per real image
    stages: dict[str, float]  # seconds: text_encode, denoise, decode
    device_seconds: float
    graphed: bool = False


class SDXLPipeline:
    """Owns the components on one device. Not thread-safe: used by one worker thread."""

    def __init__(self, components: Any, settings: Settings, resolved: Resolved, device: torch.device) -> None:
        self.c = components
        self.settings = settings
        self.resolved = resolved
        self.device = device
        self.cuda = device.type == "cuda"
        self.dtype = DTYPES[resolved.dtype]
        self.unet = components.unet
        self.vae = components.vae
        self.taesd = components.taesd
        # Read once: ModelMixin.dtype walks the parameters, which has no place inside a compiled function.
        self.vae_dtype = next(self.vae.parameters()).dtype
        self.taesd_dtype = next(self.taesd.parameters()).dtype if self.taesd is not None else None
        self.scheduler = DPMSolver2MKarras.from_config(components.scheduler_config)
        # latents → VAE input: z = latents * scale + shift (diffusers: latents * std / sf + mean, or / sf).
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, len(mean), 1, 1)
            self.vae_scale_t: torch.Tensor | float = to_device(
                torch.tensor(std).view(view) / config.scaling_factor, device
            )
            self.vae_shift_t: torch.Tensor | float = to_device(torch.tensor(mean).view(view), device)
        else:
            self.vae_scale_t, self.vae_shift_t = 1.0 / config.scaling_factor, 0.0
        self.taesd_scale = 1.0 / self.taesd.config.scaling_factor if self.taesd is not None else 1.0
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.cache = EmbeddingCache(settings.embed_cache_size)
        self._plans: dict[int, Any] = {}
        self._time_ids: dict[tuple[int, int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int, int, int], CapturedLoop] = {}
        self.warm_run_s = 0.0
        self.warm_timings: dict[str, float] = {}
        self.runs = 0  # device runs served (tests count batching with it)
        self._check_decoders()
        # The callables the hot path uses; setup() swaps in compiled versions.
        self.unet_fast: Callable[..., Any] = self.unet
        self.decode_fast: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "full": self._decode_full,
            "taesd": self._decode_taesd,
        }

    # -- set-up -----------------------------------------------------------------------------------------

    def _check_decoders(self) -> None:
        if self.taesd is None:
            return
        config = self.taesd.config
        taesd_scale = config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
        if taesd_scale != self.vae_scale:
            raise RuntimeError(
                f"TAESD upsamples {taesd_scale}x but the VAE {self.vae_scale}x: they cannot decode the same latents"
            )

    @property
    def decoders(self) -> tuple[str, ...]:
        return DECODERS if self.taesd is not None else ("full",)

    def setup(self) -> None:
        """Apply the device tunings (memory format, compilation). Compilation itself happens lazily on
        the first call of each shape, i.e. during warm-up."""
        for module in (self.unet, self.vae, self.taesd, self.c.text_encoder, self.c.text_encoder_2):
            if module is not None:
                module.eval().requires_grad_(False)
        if self.cuda:
            # Fixed shapes: let cuDNN time its convolution algorithms once per shape (at warm-up) and keep
            # the fastest; the VAE decoder and the UNet's convolutions are most of the non-attention time.
            torch.backends.cudnn.benchmark = True
        if self.resolved.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            if self.taesd is not None:
                self.taesd.to(memory_format=torch.channels_last)
        if self.resolved.compile:
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = self.settings.conv_1x1_as_mm
            inductor.coordinate_descent_tuning = self.settings.coordinate_descent_tuning
            mode = self.settings.compile_mode
            # fullgraph: a graph break would be a silent slow path (and a sync hazard); dynamic=False pins
            # shapes so each listed shape gets its own specialized kernels.
            self.unet_fast = torch.compile(self.unet, mode=mode, fullgraph=True, dynamic=False)
            self.decode_fast = {
                name: torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
                for name, fn in (("full", self._decode_full), ("taesd", self._decode_taesd))
            }

    def plan(self, steps: int) -> Any:
        """Per-step scheduler tables on the device, built once per step count and kept (a captured graph
        reads them by address)."""
        plan = self._plans.get(steps)
        if plan is None:
            plan = self._plans[steps] = self.scheduler.plan(steps, device=self.device, dtype=torch.float32)
        return plan

    def time_ids(self, width: int, height: int, batch: int) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size) for 2*batch CFG rows,
        built once per shape on the device."""
        key = (width, height, batch)
        ids = self._time_ids.get(key)
        if ids is None:
            expected = self.unet.add_embedding.linear_1.in_features
            passed = self.unet.config.addition_time_embed_dim * 6 + self.c.text_encoder_2.config.projection_dim
            if expected != passed:
                raise RuntimeError(f"UNet expects an added embedding of {expected}, the encoders give {passed}")
            row = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
            ids = self._time_ids[key] = to_device(row.repeat(2 * batch, 1), self.device)
        return ids

    # -- stages -----------------------------------------------------------------------------------------

    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CLIP encoders: penultimate hidden states concatenated (768 + 1280), pooled from encoder 2."""
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.c.tokenizer, self.c.text_encoder),
            (self.c.tokenizer_2, self.c.text_encoder_2),
        ):
            ids = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(to_device(ids, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
        assert pooled is not None, "text_encoder_2 must return pooled text_embeds"
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def encode_prompt(self, prompt: str, negative: str | None) -> tuple[torch.Tensor, ...]:
        """(cond, pooled, uncond, uncond_pooled) for one prompt pair, from the LRU cache when possible.
        No negative prompt and ``force_zeros_for_empty_prompt`` (SDXL-base) → all-zero unconditional."""

        def compute() -> tuple[torch.Tensor, ...]:
            cond, pooled = self._encode_one(prompt)
            if negative is None and self.settings.force_zeros_for_empty_prompt:
                return cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled)
            uncond, uncond_pooled = self._encode_one(negative or "")
            return cond, pooled, uncond, uncond_pooled

        return self.cache.get((prompt, negative), compute)

    def embeddings(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG-stacked embeddings [uncond rows; cond rows] for the padded batch."""
        rows = [self.encode_prompt(p, n) for p, n in batch.prompts]
        rows += [rows[-1]] * (batch.padded - len(rows))
        embeds = torch.cat([r[2] for r in rows] + [r[0] for r in rows])
        pooled = torch.cat([r[3] for r in rows] + [r[1] for r in rows])
        return embeds, pooled

    def initial_noise(self, batch: Batch) -> torch.Tensor:
        """Per-image generators: an image depends on its seed only, not on its batch partners."""
        shape = (1, self.latent_channels, batch.height // self.vae_scale, batch.width // self.vae_scale)
        seeds = list(batch.seeds) + [batch.seeds[-1]] * (batch.padded - len(batch.seeds))
        noise = [
            torch.randn(
                shape, generator=torch.Generator(self.device).manual_seed(s), device=self.device, dtype=torch.float32
            )
            for s in seeds
        ]
        return torch.cat(noise)

    def guidance(self, batch: Batch) -> torch.Tensor:
        # Guidance <= 1 means "no CFG" in diffusers; g = 1 gives exactly the conditional prediction, and
        # keeping the CFG rows keeps the compiled/captured shape.
        values = [max(1.0, g) for g in batch.guidance]
        values += [values[-1]] * (batch.padded - len(values))
        return to_device(torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1), self.device)

    def denoise(
        self,
        unet: Callable[..., Any],
        plan: Any,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        """The sampling loop. Sync-free and capturable: every per-step value is a device tensor, there is
        no branching on tensor values and no host read. ``latents`` is pure noise (unscaled)."""
        latents = latents * plan.init_noise_sigma
        prev_x0 = torch.zeros_like(latents)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        for i in range(plan.num_steps):
            idx = plan.index(i)
            model_in = plan.scale_model_input(latents, idx).to(self.dtype)
            noise = unet(
                torch.cat([model_in, model_in]),
                plan.timestep(idx),
                encoder_hidden_states=embeds,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            uncond, cond = noise.float().chunk(2)
            noise = uncond + guidance * (cond - uncond)
            latents, prev_x0 = plan.step(noise, idx, latents, prev_x0)
        return latents

    def _decode_full(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL VAE in its own dtype (bf16 by default on CUDA: no fp32 upcast) → uint8 NHWC."""
        z = (latents * self.vae_scale_t + self.vae_shift_t).to(self.vae_dtype)
        if self.resolved.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return to_uint8(self.vae.decode(z, return_dict=False)[0])

    def _decode_taesd(self, latents: torch.Tensor) -> torch.Tensor:
        """TAESD decodes UNet-space latents directly (scaling_factor 1.0); output in [-1, 1] like the VAE."""
        z = (latents * self.taesd_scale).to(self.taesd_dtype)
        if self.resolved.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return to_uint8(self.taesd.decode(z, return_dict=False)[0])

    # -- one run ----------------------------------------------------------------------------------------

    def run(self, batch: Batch) -> RunOutput:
        """Text encode → denoise → decode for one batch; returns uint8 images on the host."""
        if batch.decoder not in self.decoders:
            raise ValueError(f"decoder {batch.decoder!r} is not loaded (available: {', '.join(self.decoders)})")
        timer = StageTimer(self.cuda)
        timer.mark("start")
        embeds, pooled = self.embeddings(batch)
        timer.mark("text_encode")
        noise = self.initial_noise(batch)
        guidance = self.guidance(batch)
        graph = None if batch.eager else self.graphs.get(batch.key)
        if graph is not None:
            latents = graph.replay(noise, embeds, pooled, guidance)
        else:
            unet = self.unet if batch.eager else self.unet_fast
            latents = self.denoise(
                unet,
                self.plan(batch.steps),
                noise,
                embeds,
                pooled,
                self.time_ids(batch.width, batch.height, batch.padded),
                guidance,
            )
        timer.mark("denoise")
        decode = (
            (self._decode_full if batch.decoder == "full" else self._decode_taesd)
            if batch.eager
            else self.decode_fast[batch.decoder]
        )
        pixels = decode(latents)  # the padded batch: a listed (compiled) shape
        timer.mark("decode")
        host = pixels[: len(batch.seeds)].cpu().numpy()  # the run's one synchronization
        stages = timer.read()
        self.runs += 1
        return RunOutput(
            images=list(host), stages=stages, device_seconds=sum(stages.values()), graphed=graph is not None
        )

    def warm(self) -> dict[str, float]:
        """Compile, capture and warm every listed shape with every decoder, so that no request pays for
        it. Returns seconds per phase (also logged as it goes)."""
        took: dict[str, float] = {}

        def phase(name: str, fn: Callable[[], Any], **fields: Any) -> None:
            log.info("local_sdxl.warming", phase=name, **fields)
            start = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            took[name] = time.perf_counter() - start
            log.info("local_sdxl.warmed", phase=name, seconds=round(took[name], 3), **fields)

        # The first encode pays one-time costs (kernel selection, allocator growth): measured on its own.
        phase("text_encode_cold", lambda: self._encode_one("warm-up"))
        phase("text_encode_second", lambda: self._encode_one(""))
        # Compiling needs one call per shape; 2 steps suffice (the scheduler is not compiled).
        steady_steps = self.settings.default_steps if self.cuda else 2
        for s in self.resolved.shapes:
            size = f"{s.width}x{s.height}x{s.batch}"
            for decoder in self.decoders:
                batch = self._warm_batch(s.width, s.height, s.batch, 2, decoder)
                what = "compile" if self.resolved.compile else "first_run"
                phase(f"{what}:{size}:{decoder}", partial(self.run, batch), shape=size, decoder=decoder)
            if self.resolved.cuda_graphs:
                capture = partial(self.capture, s.width, s.height, s.batch, self.settings.default_steps)
                phase(f"capture:{size}", capture, shape=size)
            for decoder in self.decoders:
                batch = self._warm_batch(s.width, s.height, s.batch, steady_steps, decoder)
                for _ in range(self.settings.warmup_runs):
                    phase(f"steady:{size}:{decoder}", partial(self.run, batch), shape=size, decoder=decoder)
        # Seeds the worker's run-time estimate (scaled when the CPU warm-up ran fewer steps).
        steady = [v for k, v in took.items() if k.startswith("steady:")]
        if steady:
            self.warm_run_s = max(steady) * self.settings.default_steps / steady_steps
        elif not self.resolved.compile:  # no steady runs: the 2-step first runs are representative enough
            first = [v for k, v in took.items() if k.startswith("first_run:")]
            self.warm_run_s = max(first, default=0.0) * self.settings.default_steps / 2
        self.warm_timings = took
        return took

    def _warm_batch(self, width: int, height: int, padded: int, steps: int, decoder: str) -> Batch:
        return Batch(
            width, height, steps, decoder, (("warm-up", None),), (0,), (self.settings.default_guidance,), padded
        )

    def loop_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """What the denoising loop takes for ``batch`` — ``(noise, embeds, pooled, time_ids, guidance)`` — made
        as ``run`` makes them. With :meth:`denoise`, :meth:`capture` and :meth:`sync_checked` this is the seam
        the GPU check (``benchmarks/gpu_sync_check.py``) drives the real loop through."""
        embeds, pooled = self.embeddings(batch)
        return (
            self.initial_noise(batch),
            embeds,
            pooled,
            self.time_ids(batch.width, batch.height, batch.padded),
            self.guidance(batch),
        )

    def capture(self, width: int, height: int, padded: int, steps: int) -> CapturedLoop:
        """Capture the denoising loop of one shape as a CUDA graph (compiled UNet already warm); ``run``
        replays it for that shape from now on. Returns it."""
        warm = self._warm_batch(width, height, padded, steps, "full")
        noise, embeds, pooled, time_ids, guidance = self.loop_inputs(warm)
        graph = self.graphs[warm.key] = capture_loop(
            lambda *a: self.denoise(self.unet_fast, self.plan(steps), *a),
            noise=noise,
            embeds=embeds,
            pooled=pooled,
            time_ids=time_ids,
            guidance=guidance,
        )
        return graph

    def sync_checked(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under ``torch.cuda.set_sync_debug_mode("error")``: a host-device synchronization inside it
        raises ``RuntimeError``. On CPU there is nothing to synchronize with: just ``fn()``."""
        if not self.cuda:
            return fn()
        torch.cuda.synchronize(self.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def check_sync_free(self, width: int, height: int, padded: int, steps: int) -> str | None:
        """Run the (uncaptured) loop of one shape under :meth:`sync_checked`; returns None when no host-device
        synchronization happened, else the error."""
        inputs = self.loop_inputs(Batch(width, height, steps, "full", (("sync check", None),), (1,), (5.0,), padded))
        plan = self.plan(steps)
        try:
            self.sync_checked(lambda: self.denoise(self.unet_fast, plan, *inputs))
        except RuntimeError as exc:
            return str(exc)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return None


def build_pipeline(settings: Settings) -> SDXLPipeline:
    """Load the components, apply the tunings, compile and warm every listed shape. Runs on the worker
    thread; logs each phase with its duration."""
    from .presets import load_components

    device = resolve_device(settings.device)
    if device.type == "cuda":
        # This thread's current device: streams, events and generators without an index land on it.
        torch.cuda.set_device(device)
    resolved = settings.resolve(device.type == "cuda")
    what = f"preset {settings.preset}" if settings.preset else f"model {settings.model}"
    log.info(
        "local_sdxl.loading",
        what=what,
        device=str(device),
        dtype=resolved.dtype,
        vae_dtype=resolved.vae_dtype,
        compile=resolved.compile,
        cuda_graphs=resolved.cuda_graphs,
        shapes=resolved.describe_shapes(),
    )
    start = time.perf_counter()
    components = load_components(
        preset=settings.preset,
        model=settings.model,
        taesd=settings.taesd,
        device=device,
        dtype=DTYPES[resolved.dtype],
        vae_dtype=DTYPES[resolved.vae_dtype],
        seed=settings.seed,
        local_files_only=settings.local_files_only,
        variant=settings.variant,
        progress=lambda line: log.info("local_sdxl.load_progress", step=line),
    )
    log.info("local_sdxl.loaded", source=components.source, seconds=round(time.perf_counter() - start, 3))
    pipeline = SDXLPipeline(components, settings, resolved, device)
    pipeline.setup()
    start = time.perf_counter()
    pipeline.warm()
    log.info("local_sdxl.warm", seconds=round(time.perf_counter() - start, 3), decoders=list(pipeline.decoders))
    return pipeline
