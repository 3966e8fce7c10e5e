"""Presets (tiny, sdxl-random on the meta device) and the verified from_pretrained path, offline."""

from __future__ import annotations

import json
import shutil
import threading
from typing import Any

import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import torch

from backends.local_sdxl.presets import (
    Components,
    LoadError,
    PresetError,
    load_components,
    verify_components,
)
from backends.local_sdxl.scheduler import DPMSolver2MKarras
from backends.local_sdxl.tokenizer import make_clip_tokenizer, vocab_and_merges

F32 = torch.float32
MODELS = ("unet", "vae", "taesd", "text_encoder", "text_encoder_2")


def _tiny(seed: int = 0, **kw) -> Components:
    args = {
        "preset": "tiny",
        "model": None,
        "taesd": None,
        "device": "cpu",
        "dtype": F32,
        "vae_dtype": F32,
        "seed": seed,
    }
    return load_components(**{**args, **kw})


@pytest.fixture(scope="module")
def tiny() -> Components:
    return _tiny()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(c: Components, folder) -> None:
    """Write the components in the diffusers pipeline layout (plus TAESD in its own folder)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(c, name).save_pretrained(folder / name)
    c.taesd.save_pretrained(folder / "taesd")
    diffusers.EulerDiscreteScheduler.from_config(c.scheduler_config).save_pretrained(folder / "scheduler")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    _save(tiny, folder)
    return folder


def _load(folder, **kw) -> Components:
    args = {
        "preset": None,
        "model": str(folder),
        "taesd": str(folder / "taesd"),
        "device": "cpu",
        "dtype": F32,
        "vae_dtype": F32,
        "local_files_only": True,
    }
    return load_components(**{**args, **kw})


# --- tiny -------------------------------------------------------------------------------------------------------
def test_tiny_is_sdxl_shaped_and_runs(tiny):
    assert tiny.random_weights and "random weights" in tiny.source and "noise" in tiny.source
    assert tiny.unet.config.addition_embed_type == "text_time"
    assert tiny.unet.config.cross_attention_dim == 64 == 32 + 32
    assert tiny.vae_scale_factor == 8  # SDXL's latent scale, so CPU runs at 256x256 stay fast
    assert 1e6 < sum(p.numel() for p in tiny.unet.parameters()) < 4e6
    DPMSolver2MKarras.from_config(tiny.scheduler_config)

    # One SDXL-conditioned UNet call and both decoders on the same latents (shapes agree).
    ids = tiny.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = tiny.tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = tiny.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = tiny.text_encoder_2(ids2, output_hidden_states=True)
        cond = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        eps = tiny.unet(
            latents,
            torch.tensor(999),
            encoder_hidden_states=cond,
            added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]
        full = tiny.vae.decode(latents / tiny.vae.config.scaling_factor, return_dict=False)[0]
        fast = tiny.taesd.decode(latents, return_dict=False)[0]
    assert eps.shape == latents.shape and torch.isfinite(eps).all()
    assert full.shape == fast.shape == (1, 3, 128, 128)


def test_tiny_is_bit_reproducible_per_seed(tiny):
    again = _tiny(seed=0)
    for name in MODELS:
        assert _same_weights(getattr(tiny, name), getattr(again, name)), name
    other = _tiny(seed=1)
    assert not _same_weights(tiny.unet, other.unet)
    assert not _same_weights(tiny.text_encoder, other.text_encoder)


def test_tiny_honours_dtypes():
    c = _tiny(dtype=torch.bfloat16, vae_dtype=F32)
    assert next(c.unet.parameters()).dtype == torch.bfloat16
    assert next(c.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert next(c.vae.parameters()).dtype == F32 and next(c.taesd.parameters()).dtype == F32


def test_generated_tokenizers(tiny):
    tok, tok2 = tiny.tokenizer, tiny.tokenizer_2
    assert len(tok) == len(tok2) == tiny.text_encoder.config.vocab_size == 1000
    assert (tok.bos_token_id, tok.eos_token_id) == (998, 999)
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == 998 and ids[-1] == 999 and len(ids) > 4 and 999 not in ids[1:-1]
    assert tok.convert_ids_to_tokens(ids)[1] == "a</w>"
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    padded2 = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == len(padded2) == 77 == tok.model_max_length
    assert padded[-1] == 999 and padded2[-1] == 0  # pad: eos for the first, "!" (id 0) for the second
    assert tok2.convert_ids_to_tokens([0]) == ["!"]

    full = make_clip_tokenizer(49408)
    assert len(full) == 49408 and (full.bos_token_id, full.eos_token_id) == (49406, 49407)
    assert max(full("a photo of a cat, 4k, ÄÖ ✓").input_ids) == 49407
    vocab, merges = vocab_and_merges(1000)
    assert sorted(vocab.values()) == list(range(1000)) and len(merges) == 1000 - 514
    with pytest.raises(ValueError):
        make_clip_tokenizer(100)


def test_sdxl_random_on_meta_device():
    """The full-size preset, built on the meta device: right architecture, dtype, device; no memory used."""
    c = load_components(
        preset="sdxl-random", model=None, taesd=None, device="meta", dtype=torch.bfloat16, vae_dtype=torch.bfloat16
    )
    count = sum(p.numel() for p in c.unet.parameters())
    assert count == 2_567_463_684
    assert c.unet.config.cross_attention_dim == 2048 and c.vae_scale_factor == 8
    assert sum(p.numel() for p in c.taesd.decoder.parameters()) == pytest.approx(1.22e6, rel=0.01)
    assert sum(p.numel() for p in c.vae.decoder.parameters()) == pytest.approx(49.5e6, rel=0.01)
    for name in MODELS:
        p = next(getattr(c, name).parameters())
        assert p.device.type == "meta" and p.dtype == torch.bfloat16, name
    assert len(c.tokenizer) == len(c.tokenizer_2) == 49408
    assert c.tokenizer_2.pad_token == "!" and c.tokenizer.pad_token_id == 49407


def test_selection_errors():
    base: dict[str, Any] = {"taesd": None, "device": "cpu", "dtype": F32, "vae_dtype": F32}
    with pytest.raises(PresetError, match="exactly one"):
        load_components(preset=None, model=None, **base)
    with pytest.raises(PresetError, match="exactly one"):
        load_components(preset="tiny", model="some/model", **base)
    with pytest.raises(PresetError, match="unknown preset"):
        load_components(preset="huge", model=None, **base)
    assert issubclass(PresetError, LoadError)


# --- from_pretrained --------------------------------------------------------------------------------------------
def test_model_folder_round_trip(tiny, saved):
    c = _load(saved)
    assert not c.random_weights and str(saved) in c.source
    for name in MODELS:
        assert _same_weights(getattr(tiny, name), getattr(c, name)), name
    assert c.tokenizer("a photo of a cat").input_ids == tiny.tokenizer("a photo of a cat").input_ids
    assert c.tokenizer_2.pad_token_id == 0 and c.tokenizer.pad_token_id == 999
    assert c.scheduler_config["beta_schedule"] == "scaled_linear"
    assert DPMSolver2MKarras.from_config(c.scheduler_config).plan(24).timesteps_host[0] == 999


def test_model_folder_loads_in_requested_dtype(saved):
    c = _load(saved, dtype=torch.bfloat16, vae_dtype=F32)
    assert next(c.unet.parameters()).dtype == torch.bfloat16
    assert next(c.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(c.vae.parameters()).dtype == F32


def test_variant_is_preferred_when_present(tiny, tmp_path):
    _save(tiny, tmp_path)
    other = _tiny(seed=7)
    other.unet.save_pretrained(tmp_path / "unet", variant="fp16")  # different weights under the variant name
    assert _same_weights(_load(tmp_path, variant="fp16").unet, other.unet)
    assert _same_weights(_load(tmp_path, variant=None).unet, tiny.unet)


@pytest.mark.parametrize("breakage", ["empty", "missing", "default"])
def test_broken_tokenizer_is_refused(tiny, tmp_path, breakage):
    _save(tiny, tmp_path)
    shutil.rmtree(tmp_path / "tokenizer_2")
    if breakage == "empty":
        (tmp_path / "tokenizer_2").mkdir()
    elif breakage == "default":  # what a failed offline hub load hands back, saved as if it were real
        transformers.CLIPTokenizer().save_pretrained(tmp_path / "tokenizer_2")
    with pytest.raises(LoadError, match="tokenizer_2") as info:
        _load(tmp_path)
    message = str(info.value)
    assert "tokens" in message or "cannot load the tokenizer" in message


def _edit_tokenizer(folder, edit) -> None:
    path = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data["model"])
    path.write_text(json.dumps(data))


def test_truncated_vocabulary_is_refused(tiny, tmp_path):
    _save(tiny, tmp_path)

    def gut(model):
        model["vocab"] = {k: v for k, v in model["vocab"].items() if v >= 998 or v < 200}
        model["merges"] = []

    _edit_tokenizer(tmp_path, gut)
    with pytest.raises(LoadError, match="tokenizer has only 202 tokens"):
        _load(tmp_path)


def test_tokenizer_that_cannot_spell_is_refused(tiny, tmp_path):
    """Full size, but the letters are gone: the probe prompt turns into unknown tokens."""
    _save(tiny, tmp_path)

    def scramble(model):
        model["vocab"] = {
            (f"\u2603{v}" if any("a" <= ch <= "z" for ch in k) and v < 998 else k): v for k, v in model["vocab"].items()
        }
        model["merges"] = []

    _edit_tokenizer(tmp_path, scramble)
    with pytest.raises(LoadError, match="tokenizer tokenizes 'a photo of a cat' to"):
        _load(tmp_path)


def test_checkpoint_with_missing_weights_is_refused(tiny, tmp_path):
    """from_pretrained would silently initialise missing weights at random; the loader refuses."""
    from safetensors.torch import load_file, save_file

    _save(tiny, tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    del weights["conv_out.weight"]
    save_file(weights, path)
    with pytest.raises(LoadError, match=r"1 weights missing \['conv_out.weight'\]"):
        _load(tmp_path)


def test_wrong_component_is_refused(tiny, tmp_path):
    _save(tiny, tmp_path)
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(LoadError, match="UNet2DConditionModel"):
        _load(tmp_path)
    shutil.copytree(tmp_path / "vae", tmp_path / "unet")  # a VAE where the UNet should be
    with pytest.raises(LoadError):
        _load(tmp_path)


def test_verify_catches_wiring_and_dtype_mismatches(tiny):
    with pytest.raises(LoadError, match=r"unet parameters are .*float32.*expected torch\.float16"):
        verify_components(tiny, device=torch.device("cpu"), dtype=torch.float16, vae_dtype=F32)
    broken = Components(**{**tiny.__dict__, "text_encoder": _tiny_text_encoder(hidden=48)})
    with pytest.raises(LoadError, match="cross_attention_dim 64"):
        verify_components(broken, device=torch.device("cpu"), dtype=F32, vae_dtype=F32)
    bad_sched = Components(**{**tiny.__dict__, "scheduler_config": {"algorithm_type": "sde-dpmsolver++"}})
    with pytest.raises(LoadError, match="scheduler config"):
        verify_components(bad_sched, device=torch.device("cpu"), dtype=F32, vae_dtype=F32)


def _tiny_text_encoder(hidden: int):
    cfg = transformers.CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=1000,
        max_position_embeddings=77,
    )
    return transformers.CLIPTextModel(cfg).eval()


def test_missing_model_folder_fails_with_cause(tmp_path):
    with pytest.raises(LoadError, match=r"cannot load UNet2DConditionModel from .*nowhere"):
        _load(tmp_path / "nowhere")


# Three workers (one per GPU) loading at the same moment in a process that has not imported torch or diffusers
# yet. Before presets.import_model_classes, one or two of them failed with "cannot import name 'AutoencoderKL'
# from 'diffusers'" in 6 runs out of 6 (diffusers resolves its names lazily, not thread-safely).
CONCURRENT_LOADS = """
import sys, threading
barrier, errors = threading.Barrier(3), []

def load():
    barrier.wait()
    try:
        import torch
        from backends.local_sdxl.presets import load_components
        load_components(preset="tiny", model=None, taesd=None, device="cpu", dtype=torch.float32,
                        vae_dtype=torch.float32)
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=load) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


def test_concurrent_first_loads_in_a_fresh_process():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT_LOADS], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


# --- concurrent builds (one worker per GPU) ---------------------------------------------------------------------
def _weights(c) -> dict[str, torch.Tensor]:
    models = c.values() if isinstance(c, dict) else (getattr(c, name) for name in MODELS)
    return {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("path", ["tiny", "on_device"])
def test_concurrent_builds_do_not_share_seed_dtype_or_device(path, monkeypatch):
    """Two workers build at the same moment with different seeds and dtypes. Each must get exactly its own
    weights and dtypes, and the process's default dtype and global RNG must be as before. ``on_device`` is the
    path of ``preset: sdxl-random`` (built directly in the target dtype), at the tiny preset's size."""
    from backends.local_sdxl import presets

    dtypes = (F32, torch.bfloat16) if path == "tiny" else (torch.float16, torch.bfloat16)

    def build(seed: int, dtype: torch.dtype):
        if path == "tiny":
            return _tiny(seed=seed, dtype=dtype, vae_dtype=dtype)
        return presets._build_random(
            presets.tiny_configs(),
            device=torch.device("cpu"),
            dtype=dtype,
            vae_dtype=dtype,
            seed=seed,
            build_on_device=True,
        )

    alone = [build(seed, dtype) for seed, dtype in enumerate(dtypes)]  # one at a time
    expected = [_weights(c) for c in alone]
    if path == "tiny":
        # Still the weights of the global-seed build this replaced: torch.manual_seed(seed * 1000 + index)
        # and a plain construction in float32 (text_encoder is the fourth component).
        with torch.random.fork_rng():
            torch.manual_seed(0 * 1000 + 3)
            reference = transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**presets.tiny_configs()["text_encoder"])
            )
        assert _same_weights(reference, alone[0].text_encoder)
    rng, default_dtype = torch.get_rng_state(), torch.get_default_dtype()

    # Both builds meet inside the VAE's construction, so they surely overlap there.
    meet = threading.Barrier(2, timeout=60)
    construct = diffusers.AutoencoderKL.__init__

    def init(self, *args, **kwargs):
        meet.wait()
        construct(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", init)
    results: dict[int, object] = {}

    def worker(seed: int) -> None:
        try:
            results[seed] = build(seed, dtypes[seed])
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[seed] = exc
            meet.abort()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for seed, dtype in enumerate(dtypes):
        got = results[seed]
        assert not isinstance(got, BaseException), repr(got)
        weights = _weights(got)
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {dtype}
        assert weights.keys() == expected[seed].keys()
        assert [k for k in weights if not torch.equal(weights[k], expected[seed][k])] == []
    assert torch.get_default_dtype() == default_dtype
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drew from (or reseeded) the global generator
