"""Verification of loaded SDXL components: classes, tokenizers, the SDXL conditioning wiring, dtypes, devices.

Why it exists: ``from_pretrained`` fails quietly in the ways that matter here. An offline hub load can hand
back a CLIP tokenizer with two or three tokens without raising; a wrong folder loads classes that only fail
mid-request; a dtype or device mismatch shows up as a slow or crashing first request. Every check below
turns one of those into a start-up error that names the component and the cause.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .scheduler import DPMSolver2MKarras, SchedulerConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .presets import Components

PROBE_PROMPT = "a photo of a cat"


class LoadError(RuntimeError):
    """Loading or verifying the components failed; the message says which component and why."""


def _tokenizer_problems(name: str, tok: Any, encoder: Any) -> list[str]:
    cfg = encoder.config
    size = len(tok)
    if size < 2 * 256 + 2:
        # The offline-hub trap: a default CLIPTokenizer with 2-3 tokens comes back without an exception.
        return [
            (
                f"{name} has only {size} tokens (expected ~{cfg.vocab_size}): the tokenizer files are missing or "
                "broken (an offline or failed hub download returns an empty tokenizer without raising)"
            )
        ]
    problems = []
    if size > cfg.vocab_size:
        problems.append(f"{name} has {size} tokens but its text encoder embeds only {cfg.vocab_size}")
    if tok.model_max_length != cfg.max_position_embeddings:
        problems.append(
            f"{name}.model_max_length is {tok.model_max_length}, expected "
            f"{cfg.max_position_embeddings} (the text encoder's positions)"
        )
    ids = tok(PROBE_PROMPT).input_ids
    special = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    inner = ids[1:-1]
    if len(ids) < 3 or ids[0] != tok.bos_token_id or ids[-1] != tok.eos_token_id or any(i in special for i in inner):
        problems.append(f"{name} tokenizes {PROBE_PROMPT!r} to {ids}: expected bos, word tokens, eos")
    if any(not 0 <= i < cfg.vocab_size for i in ids):
        problems.append(f"{name} produces ids outside the text encoder's vocabulary ({cfg.vocab_size})")
    if tok.pad_token_id is None:
        problems.append(f"{name} has no pad token")
    return problems


def verify_components(c: Components, *, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    """Check classes, tokenizers, the SDXL conditioning wiring, dtypes and devices; raise one LoadError."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

    expected = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "taesd": AutoencoderTiny,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": PreTrainedTokenizerBase,
        "tokenizer_2": PreTrainedTokenizerBase,
    }
    wrong = [
        f"{n} is {type(getattr(c, n)).__name__}, expected {cls.__name__}"
        for n, cls in expected.items()
        if not isinstance(getattr(c, n), cls)
    ]
    if wrong:
        raise LoadError("not an SDXL base model: " + "; ".join(wrong))
    problems = _tokenizer_problems("tokenizer", c.tokenizer, c.text_encoder)
    problems += _tokenizer_problems("tokenizer_2", c.tokenizer_2, c.text_encoder_2)
    u, te, te2 = c.unet.config, c.text_encoder.config, c.text_encoder_2.config
    if u.addition_embed_type != "text_time":
        problems.append(f"unet addition_embed_type is {u.addition_embed_type!r}, expected 'text_time' (SDXL)")
    if u.cross_attention_dim != te.hidden_size + te2.hidden_size:
        problems.append(
            f"unet cross_attention_dim {u.cross_attention_dim} != text encoder widths "
            f"{te.hidden_size}+{te2.hidden_size} (SDXL base: 2048)"
        )
    want_proj = 6 * (u.addition_time_embed_dim or 0) + (te2.projection_dim or 0)
    if u.projection_class_embeddings_input_dim != want_proj:
        problems.append(
            f"unet projection_class_embeddings_input_dim {u.projection_class_embeddings_input_dim} "
            f"!= 6*{u.addition_time_embed_dim} + {te2.projection_dim}"
        )
    latent = {u.in_channels, c.vae.config.latent_channels, c.taesd.config.latent_channels}
    if len(latent) != 1:
        problems.append(f"latent channels disagree (unet, vae, taesd): {sorted(latent)}")
    taesd_factor = c.taesd.config.upsampling_scaling_factor ** (len(c.taesd.config.decoder_block_out_channels) - 1)
    if taesd_factor != c.vae_scale_factor:
        problems.append(f"TAESD upsamples {taesd_factor}x but the VAE {c.vae_scale_factor}x")
    for name, want in (
        ("unet", dtype),
        ("text_encoder", dtype),
        ("text_encoder_2", dtype),
        ("vae", vae_dtype),
        ("taesd", vae_dtype),
    ):
        params = list(getattr(c, name).parameters())
        dtypes = {p.dtype for p in params if p.is_floating_point()}
        devices = {p.device for p in params}
        if dtypes != {want}:
            problems.append(f"{name} parameters are {sorted(map(str, dtypes))}, expected {want}")
        if any(d.type != device.type or (device.index is not None and d.index != device.index) for d in devices):
            problems.append(f"{name} is on {sorted(map(str, devices))}, expected {device}")
    try:
        DPMSolver2MKarras.from_config(c.scheduler_config)
    except (SchedulerConfigError, TypeError) as exc:
        problems.append(f"scheduler config unusable for DPM++ 2M Karras: {exc}")
    if problems:
        raise LoadError(f"{c.source}: " + "; ".join(problems))
