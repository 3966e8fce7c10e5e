"""Build or load the SDXL components: test-size and full-size random presets, or real weights.

* ``preset="tiny"``: SDXL's architecture at diffusers' unit-test size (UNet (32, 64) with the text_time
  embedding, two CLIP text encoders of width 32, VAE [32, 64], a 2-block TAESD) with seeded random weights
  and a generated tokenizer. Offline, CPU, seconds; bit-reproducible for a seed. Images are noise.
* ``preset="sdxl-random"``: the full SDXL-base architecture (2.57 B-parameter UNet, both text encoders, VAE,
  TAESD), random weights, constructed directly on the target device in the target dtype: for benchmarks
  where weights cannot be downloaded (speed does not depend on weight values).
* ``model=<hub id or folder>``: ``from_pretrained`` per component (safetensors, the ``variant`` when present),
  plus ``taesd=`` for the tiny autoencoder. Everything loaded is verified (:func:`verify_components`):
  an offline hub load can hand back a nearly empty tokenizer without raising, and a wrong folder can load
  classes that only fail mid-request.

This is the only module of the backend that imports diffusers/transformers; it does so inside functions.
"""

from __future__ import annotations

import importlib.util
import logging  # only to hand diffusers', transformers' and huggingface_hub's loggers to the root logger
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from .scheduler import SDXL_SCHEDULER_CONFIG
from .support import BuildMode
from .tokenizer import EOS, make_clip_tokenizer
from .verify import LoadError, verify_components

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [  # noqa: RUF022 - grouped by role
    "Components",
    "LoadError",
    "PresetError",
    "load_components",
    "verify_components",
    "DEFAULT_TAESD",
    "PRESETS",
    "sdxl_configs",
    "tiny_configs",
]

log = structlog.get_logger("imagegate.local_sdxl")

PRESETS = ("tiny", "sdxl-random")
#: TAESD used with ``model=`` when no ``taesd=`` is given (madebyollin/taesdxl, MIT).
DEFAULT_TAESD = "madebyollin/taesdxl"


class PresetError(LoadError):
    """The preset/model selection itself is invalid (unknown preset, both or neither of preset and model)."""


@dataclass
class Components:
    """Everything the pipeline needs. ``taesd`` decodes UNet latents directly (scaling_factor 1.0)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    taesd: AutoencoderTiny
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any]
    source: str
    random_weights: bool

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent (8 for SDXL, 2 for the tiny preset)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --- configs ----------------------------------------------------------------------------------------------------
# fmt: off
# Data tables (the models' config keys), several keys a line: the formatter's one key a line would double them.
def sdxl_configs() -> dict[str, dict[str, Any]]:
    """stabilityai/stable-diffusion-xl-base-1.0's component configs (plus TAESD's defaults)."""
    return {
        "unet": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 1024,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512), "scaling_factor": 0.13025, "force_upcast": True,
        },
        "taesd": {},
        "text_encoder": {
            "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "text_encoder_2": {
            "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
            "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
    }


def tiny_configs() -> dict[str, dict[str, Any]]:
    """diffusers' SDXL unit-test sizes (UNet widened to (32, 64) so it is not degenerate)."""
    text = {
        "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 5,
        "projection_dim": 32, "vocab_size": 1000, "max_position_embeddings": 77, "bos_token_id": 998,
        "eos_token_id": 999, "pad_token_id": 1, "layer_norm_eps": 1e-5,
    }
    return {
        "unet": {
            "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64), "transformer_layers_per_block": (1, 2), "attention_head_dim": (2, 4),
            "cross_attention_dim": 64, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,
        },
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 128, "norm_num_groups": 16,
            # Four blocks = SDXL's 8x latent scale (diffusers' unit tests use two, i.e. 2x): at 2x a 256x256
            # image is a 128x128 latent and a 24-step CPU run takes about a minute instead of under a second.
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1,
            "scaling_factor": 0.13025, "force_upcast": True,
        },
        # Four blocks = three 2x upsamplings, matching the tiny VAE's scale so both decode the same latents.
        "taesd": {
            "encoder_block_out_channels": (16,) * 4, "decoder_block_out_channels": (16,) * 4,
            "num_encoder_blocks": (1,) * 4, "num_decoder_blocks": (1,) * 4, "latent_channels": 4,
        },
        "text_encoder": dict(text, hidden_act="quick_gelu"),
        "text_encoder_2": dict(text, hidden_act="gelu"),
    }
# fmt: on


# --- importing ---------------------------------------------------------------------------------------------------
_IMPORT_LOCK = threading.Lock()
_DIFFUSERS_NAMES = ("AutoencoderKL", "AutoencoderTiny", "UNet2DConditionModel", "DPMSolverMultistepScheduler")
_TRANSFORMERS_NAMES = (
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTokenizer",
    "PreTrainedTokenizerBase",
)


def import_model_classes() -> None:
    """Resolve every diffusers/transformers class this backend uses, once per process, under a lock.

    Both libraries resolve their top-level names lazily on first attribute access, and that is not
    thread-safe: two workers (one per GPU, or two backends) starting at the same moment made one of them
    fail with ``ImportError: cannot import name 'AutoencoderKL' from 'diffusers'``. After this, the names
    are plain module attributes and the function-level imports below are dictionary lookups.
    """
    with _IMPORT_LOCK:
        import diffusers
        import transformers

        for module, names in ((diffusers, _DIFFUSERS_NAMES), (transformers, _TRANSFORMERS_NAMES)):
            for name in names:
                getattr(module, name)
        _hand_over_library_logs()


_library_logs_handed_over = False


def _hand_over_library_logs() -> None:
    """Let diffusers', transformers' and huggingface_hub's log records reach the root logger, once.

    diffusers and transformers give their library loggers a stderr handler of their own and stop
    propagation, and huggingface_hub adds a stderr handler: their warnings (a missing weight, a deprecated
    argument) would bypass the process's logging set-up (``gateway.logs``: JSON lines on stdout) as plain
    text on stderr. Here the handlers go and the records propagate (diffusers' and transformers' own API).
    Their levels stay as the libraries set them (WARNING, or their ``*_VERBOSITY`` variables). Called under
    ``_IMPORT_LOCK``, after both libraries are imported (they set their loggers up when first imported)."""
    global _library_logs_handed_over
    if _library_logs_handed_over:
        return
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:  # its default one
        hub.removeHandler(handler)
    _library_logs_handed_over = True


def _log_progress(line: str) -> None:
    """The default ``progress`` of :func:`load_components`: the event the backend logs for it too."""
    log.info("local_sdxl.load_progress", step=line)


# --- building ---------------------------------------------------------------------------------------------------
def _build_random(
    configs: dict[str, dict[str, Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    seed: int,
    build_on_device: bool,
) -> dict[str, Any]:
    """Construct every model from config with seeded random weights.

    ``build_on_device``: allocate and initialise directly on ``device`` in the final dtype (no fp32 host copy
    of 2.6 B parameters). Otherwise build in fp32 on the CPU (bit-reproducible everywhere) and move.

    Thread-safe: no process-global torch state is read for the weights or changed (no ``manual_seed``,
    ``set_default_dtype`` or ``torch.device`` context): :class:`BuildMode` hands each construction its own
    seeded generators, dtype and device, in this thread only. Weights are bit-identical to those of the
    global-seed build this replaced.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers: list[tuple[str, Callable[[], torch.nn.Module], torch.dtype]] = [
        ("unet", lambda: UNet2DConditionModel(**configs["unet"]), dtype),
        ("vae", lambda: AutoencoderKL(**configs["vae"]), vae_dtype),
        ("taesd", lambda: AutoencoderTiny(**configs["taesd"]), vae_dtype),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), dtype),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])), dtype),
    ]
    built: dict[str, Any] = {}
    for k, (name, make, want) in enumerate(makers):
        # Each component has its own seed, so adding or changing one does not change the others' weights.
        if build_on_device:
            with BuildMode(seed * 1000 + k, device, want):
                model = make()
        else:
            with BuildMode(seed * 1000 + k, torch.device("cpu"), torch.float32):
                model = make()
            # nn.Module.to, not ModelMixin.to: the latter logs a keep-in-fp32 notice on every dtype cast.
            model = torch.nn.Module.to(model, device=device, dtype=want)
        built[name] = model.eval().requires_grad_(False)
    return built


def _preset(name: str, **kw: Any) -> Components:
    device, dtype, vae_dtype, seed = kw["device"], kw["dtype"], kw["vae_dtype"], kw["seed"]
    if name == "tiny":
        configs, vocab, build_on_device = tiny_configs(), 1000, False
    else:
        configs, vocab, build_on_device = sdxl_configs(), 49408, True
    models = _build_random(
        configs, device=device, dtype=dtype, vae_dtype=vae_dtype, seed=seed, build_on_device=build_on_device
    )
    return Components(
        **models,
        tokenizer=make_clip_tokenizer(vocab, pad_token=EOS),
        tokenizer_2=make_clip_tokenizer(vocab, pad_token="!"),
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
        source=f"preset {name} (random weights, seed {seed}: images are noise)",
        random_weights=True,
    )


# --- loading ----------------------------------------------------------------------------------------------------
def _has_variant(folder: str, variant: str) -> bool:
    return os.path.isdir(folder) and any(f".{variant}." in f for f in os.listdir(folder))


def _from_pretrained(cls: Any, source: str, subfolder: str | None, *, variant: str | None, **kw: Any) -> Any:
    """``cls.from_pretrained`` with the variant when it exists; errors become :class:`LoadError`."""
    where = f"{source}/{subfolder}" if subfolder else source
    if variant and os.path.isdir(source):
        variant = variant if _has_variant(os.path.join(source, subfolder or ""), variant) else None
    args = dict(kw, use_safetensors=True)
    if subfolder:
        args["subfolder"] = subfolder
    # output_loading_info: from_pretrained only *logs* weights it could not find (and initialises them
    # randomly), e.g. a VAE folder where the UNet should be. Those must be an error here.
    args["output_loading_info"] = True
    try:
        loaded, info = cls.from_pretrained(source, variant=variant, **args)
    except Exception as first:
        if variant is None or os.path.isdir(source):
            raise LoadError(f"cannot load {cls.__name__} from {where}: {type(first).__name__}: {first}") from first
        try:  # a hub repo without the variant: the plain safetensors files
            loaded, info = cls.from_pretrained(source, variant=None, **args)
        except Exception as second:
            raise LoadError(
                f"cannot load {cls.__name__} from {where} (variant {variant!r}: {type(first).__name__}: {first}; "
                f"without variant: {type(second).__name__}: {second})"
            ) from second
    missing = sorted(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise LoadError(
            f"{cls.__name__} from {where} does not match its checkpoint: {len(missing)} weights missing "
            f"{missing[:3]}, {len(mismatched)} with other shapes {mismatched[:3]} (they would be random)"
        )
    return loaded


def _load_tokenizer(source: str, subfolder: str, local_files_only: bool) -> Any:
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only)
    except Exception as exc:
        raise LoadError(f"cannot load the tokenizer from {source}/{subfolder}: {type(exc).__name__}: {exc}") from exc


def _load_model(
    model: str,
    *,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    local_files_only: bool,
    variant: str | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # diffusers' default low_cpu_mem_usage needs accelerate; without it, ask for the plain path (no warning).
    low_mem = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    out: dict[str, Any] = {}
    for name, cls, want in (
        ("unet", UNet2DConditionModel, dtype),
        ("vae", AutoencoderKL, vae_dtype),
        ("text_encoder", CLIPTextModel, dtype),
        ("text_encoder_2", CLIPTextModelWithProjection, dtype),
    ):
        t0 = time.perf_counter()
        extra = low_mem if cls is not CLIPTextModel and cls is not CLIPTextModelWithProjection else {}
        out[name] = _from_pretrained(
            cls, model, name, variant=variant, dtype=want, local_files_only=local_files_only, **extra
        )
        progress(f"loaded {name} from {model} in {time.perf_counter() - t0:.1f}s")
    out["tokenizer"] = _load_tokenizer(model, "tokenizer", local_files_only)
    out["tokenizer_2"] = _load_tokenizer(model, "tokenizer_2", local_files_only)
    try:
        # Any ConfigMixin class reads the JSON; the config is only used to build our scheduler.
        cfg = DPMSolverMultistepScheduler.load_config(model, subfolder="scheduler", local_files_only=local_files_only)
    except Exception as exc:
        raise LoadError(f"cannot read {model}/scheduler/scheduler_config.json: {type(exc).__name__}: {exc}") from exc
    out["scheduler_config"] = dict(cfg)
    return out


def _load_taesd(taesd: str, *, vae_dtype: torch.dtype, local_files_only: bool) -> Any:
    from diffusers import AutoencoderTiny

    low_mem = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    return _from_pretrained(
        AutoencoderTiny, taesd, None, variant=None, dtype=vae_dtype, local_files_only=local_files_only, **low_mem
    )


def load_components(
    *,
    preset: str | None,
    model: str | None,
    taesd: str | None,
    device: str | torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    seed: int = 0,
    local_files_only: bool = False,
    variant: str | None = "fp16",
    progress: Callable[[str], None] | None = None,
) -> Components:
    """Build a preset or load ``model`` (exactly one), put it on ``device``, verify it, return it.

    UNet and text encoders get ``dtype``; the VAE and TAESD get ``vae_dtype``. ``taesd`` defaults to the
    preset's random one, or :data:`DEFAULT_TAESD` with ``model``. ``progress`` receives one line per stage.
    Raises :class:`PresetError` for a bad selection and :class:`LoadError` for anything wrong with what loaded.
    """
    say = progress or _log_progress
    if (preset is None) == (model is None):
        raise PresetError("set exactly one of `preset` (tiny, sdxl-random) and `model` (hub id or folder)")
    if preset is not None and preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    import_model_classes()
    device = torch.device(device)
    t0 = time.perf_counter()
    if preset is not None:
        say(f"building preset {preset} on {device} ({dtype}, VAE {vae_dtype})")
        components = _preset(preset, device=device, dtype=dtype, vae_dtype=vae_dtype, seed=seed)
        if taesd is not None:
            components.taesd = _load_taesd(taesd, vae_dtype=vae_dtype, local_files_only=local_files_only).to(device)
            components.source += f", TAESD from {taesd}"
    else:
        assert model is not None
        parts = _load_model(
            model, dtype=dtype, vae_dtype=vae_dtype, local_files_only=local_files_only, variant=variant, progress=say
        )
        taesd_source = taesd or DEFAULT_TAESD
        parts["taesd"] = _load_taesd(taesd_source, vae_dtype=vae_dtype, local_files_only=local_files_only)
        for name in ("unet", "vae", "taesd", "text_encoder", "text_encoder_2"):
            parts[name] = parts[name].to(device).eval().requires_grad_(False)
        components = Components(**parts, source=f"{model} (TAESD {taesd_source})", random_weights=False)
    verify_components(components, device=device, dtype=dtype, vae_dtype=vae_dtype)
    say(f"components ready in {time.perf_counter() - t0:.1f}s: {components.source}")
    return components
