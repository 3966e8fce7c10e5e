"""``settings:`` of a ``type: local_sdxl`` backend in routes.yaml.

This module must import without torch: ``imagegate check`` validates a config by building these dataclasses
and never loads a model. Everything device-dependent ("auto") is resolved later, by ``resolve()``, once the
worker knows whether it got a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Auto = Literal["auto"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]
# torch.compile modes that capture CUDA graphs of their own; they cannot nest inside our loop capture.
_GRAPHING_MODES = ("max-autotune", "reduce-overhead")


@dataclass(frozen=True, slots=True)
class Shape:
    """One compiled/warmed shape: image size and the number of images per device run."""

    width: int
    height: int
    batch: int = 1

    def __post_init__(self) -> None:
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"shape {self.width}x{self.height}: sides must be positive multiples of 8")
        if self.batch < 1:
            raise ValueError(f"shape {self.width}x{self.height}: batch must be at least 1")


@dataclass(frozen=True, slots=True)
class Settings:
    """Options of the embedded SDXL backend. ``"auto"`` means: on when the device is CUDA, off on CPU.

    Weights: exactly one of ``preset`` and ``model``.
      ``preset: tiny`` builds a test-size SDXL with random weights (offline, CPU, seconds; images are noise).
      ``preset: sdxl-random`` builds the full-size architecture with random weights on the device, for
      benchmarks without downloadable weights (speed does not depend on weight values).
      ``model`` is a Hugging Face id or local folder loaded with ``from_pretrained``; ``taesd`` the tiny
      autoencoder for ``decoder: taesd`` (without it only the full VAE is available).
    """

    preset: Literal["tiny", "sdxl-random"] | None = None
    model: str | None = None
    taesd: str | None = None
    # Hub loads: never hit the network at start-up when the weights are known to be local.
    local_files_only: bool = False
    # The fp16 variant halves the download; loading falls back to the default files when it is absent.
    variant: str | None = "fp16"
    # "auto" = cuda when available, else cpu. One backend entry (one worker) per device.
    device: str = "auto"
    # UNet and text encoders. auto = bfloat16 on CUDA (same speed as fp16, no overflow), float32 on CPU
    # (CPU half precision is slow and the tiny preset is about correctness, not speed).
    dtype: DType = "auto"
    # VAE. auto = bfloat16 on CUDA: bf16 has fp32's range, so the SDXL VAE does not overflow and needs no
    # fp32 upcast (the stock pipeline's upcast runs the whole decode in fp32). float32 for pixel art and hard edges,
    # where bf16's 8-bit mantissa shows as banding.
    vae_dtype: DType = "auto"
    # torch.compile of the UNet and of VAE/TAESD decode (auto: CUDA only; on CPU a first compile takes
    # minutes). Shapes are pinned (dynamic=False) and every listed shape is compiled at start-up.
    compile: bool | Auto = "auto"
    # "default" compiles quickest; the max-autotune modes also benchmark candidate kernels for each shape,
    # which makes start-up much longer for a small gain. The graphing modes conflict with ``cuda_graphs``
    # (see __post_init__).
    compile_mode: CompileMode = "default"
    # Inductor flags from the PyTorch SDXL blog: 1x1 convolutions as matmuls (SDXL has many).
    conv_1x1_as_mm: bool = True
    # Coordinate-descent kernel tuning: searches kernel launch parameters, for slightly faster kernels
    # at the price of noticeably longer compiles.
    coordinate_descent_tuning: bool = False
    # channels_last for UNet and VAE: cuDNN/inductor convolutions are faster in NHWC.
    channels_last: bool | Auto = "auto"
    # Capture the whole denoising loop of each listed shape (at default_steps) as one CUDA graph at
    # warm-up and replay it per request: removes per-kernel launch overhead (CUDA only).
    cuda_graphs: bool | Auto = "auto"
    # Shapes compiled, captured and warmed at start-up. A request of a listed size whose image count is
    # at most a listed batch runs padded to that batch. Empty = one shape: 1024x1024 batch 1.
    shapes: tuple[Shape, ...] = ()
    # A request outside ``shapes``: "eager" runs it uncompiled and uncaptured (slower, never a silent
    # multi-second recompile); "refuse" serves only the listed shapes: the backend's capabilities become
    # the listed sizes with, per size, its largest batch, so the router sends anything else elsewhere.
    unlisted_shape: Literal["eager", "refuse"] = "eager"
    default_steps: int = 24
    default_guidance: float = 5.0
    default_decoder: Literal["full", "taesd"] = "full"
    # SDXL-base's pipeline config: no negative prompt = an all-zero unconditional embedding.
    force_zeros_for_empty_prompt: bool = True
    # Most images per device run when batching concurrent compatible requests. 0 = the largest listed batch.
    max_batch: int = 0
    # How long the worker holds a lone request hoping for batch partners. Under load the queue fills
    # while the device is busy, so batches form without waiting; keep this small.
    max_wait_ms: float = 5.0
    # Queued requests beyond this are refused (BackendQueueFull): the dispatcher tries the next candidate
    # at once, and answers 503 with Retry-After only when every candidate is full.
    queue_size: int = 64
    # LRU cache of prompt embeddings keyed by (prompt, negative prompt).
    embed_cache_size: int = 256
    # Seed of the random weights of the presets (a model's weights do not depend on it).
    seed: int = 0
    # Warm-up runs per shape and decoder at start-up, after the compile: they let the allocator and the
    # kernel caches settle so that the first request runs at steady-state speed.
    warmup_runs: int = 1

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.model is None):
            raise ValueError("set exactly one of preset (tiny | sdxl-random) and model (hub id or folder)")
        if self.default_steps < 1:
            raise ValueError("default_steps must be at least 1")
        if self.max_batch < 0 or self.queue_size < 1 or self.embed_cache_size < 0 or self.max_wait_ms < 0:
            raise ValueError("max_batch, embed_cache_size and max_wait_ms must be >= 0, queue_size >= 1")
        if self.cuda_graphs is True and self.compile is not False and self.compile_mode in _GRAPHING_MODES:
            raise ValueError(
                f"compile_mode {self.compile_mode!r} captures CUDA graphs itself and cannot run inside "
                "cuda_graphs: use max-autotune-no-cudagraphs or default, or set cuda_graphs: false"
            )
        seen = set()
        for shape in self.shapes:
            key = (shape.width, shape.height, shape.batch)
            if key in seen:
                raise ValueError(f"shape {shape.width}x{shape.height} batch {shape.batch} listed twice")
            seen.add(key)

    @property
    def listed_shapes(self) -> tuple[Shape, ...]:
        return self.shapes or (Shape(1024, 1024, 1),)

    @property
    def batch_limit(self) -> int:
        """Most images per device run: ``max_batch``, or when 0 the largest listed batch."""
        return self.max_batch or max(s.batch for s in self.listed_shapes)

    def resolve(self, cuda: bool) -> Resolved:
        """The effective switches for a device (pure; ``cuda`` says whether the device is a GPU)."""

        def on(value: bool | str) -> bool:
            return cuda if value == "auto" else bool(value)

        compile_ = on(self.compile)
        graphs = on(self.cuda_graphs) and cuda
        if graphs and compile_ and self.compile_mode in _GRAPHING_MODES:
            graphs = False  # "auto" yields to the compile mode's own graphs
        return Resolved(
            dtype=(("bfloat16" if cuda else "float32") if self.dtype == "auto" else self.dtype),
            vae_dtype=(("bfloat16" if cuda else "float32") if self.vae_dtype == "auto" else self.vae_dtype),
            compile=compile_,
            channels_last=on(self.channels_last),
            cuda_graphs=graphs,
            shapes=self.listed_shapes,
        )


def available_decoders(settings: Settings) -> tuple[str, ...]:
    """Decoders a backend with these settings will have. The loader always provides a TAESD: the
    preset's own (random weights) or ``taesd`` / madebyollin/taesdxl next to ``model``."""
    return ("full", "taesd")


@dataclass(frozen=True, slots=True)
class Options:
    """``routes[].candidates[].options`` of a local_sdxl candidate, checked at config load."""

    # The decoder for this route: "taesd" (tiny autoencoder, for previews) or "full" (the SDXL VAE).
    # Unset: the backend's ``default_decoder``.
    decoder: Literal["full", "taesd"] | None = None


@dataclass(frozen=True, slots=True)
class Resolved:
    """Settings with every "auto" decided for the actual device."""

    dtype: str
    vae_dtype: str
    compile: bool
    channels_last: bool
    cuda_graphs: bool
    shapes: tuple[Shape, ...]

    def padded_batch(self, width: int, height: int, images: int) -> int | None:
        """The smallest listed batch of this size that holds ``images``, or None (unlisted)."""
        fits = [s.batch for s in self.shapes if (s.width, s.height) == (width, height) and s.batch >= images]
        return min(fits) if fits else None

    def describe_shapes(self) -> str:
        return ", ".join(f"{s.width}x{s.height}x{s.batch}" for s in self.shapes)
