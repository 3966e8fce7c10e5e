"""Settings of ``type: local_sdxl``: strict building, device-dependent defaults, shape padding, and the
rule that checking a config never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backends.local_sdxl.settings import Settings, Shape
from backends.settings import SettingsError, build


def test_defaults_are_on_for_cuda_and_sane_on_cpu():
    settings = build(Settings, {"preset": "tiny"})
    gpu, cpu = settings.resolve(cuda=True), settings.resolve(cuda=False)
    assert (gpu.dtype, gpu.vae_dtype, gpu.compile, gpu.channels_last, gpu.cuda_graphs) == (
        "bfloat16",
        "bfloat16",
        True,
        True,
        True,
    )
    assert (cpu.dtype, cpu.vae_dtype, cpu.compile, cpu.channels_last, cpu.cuda_graphs) == (
        "float32",
        "float32",
        False,
        False,
        False,
    )
    assert gpu.shapes == (Shape(1024, 1024, 1),) and settings.default_steps == 24


def test_explicit_switches_win():
    settings = build(
        Settings,
        {
            "model": "stabilityai/stable-diffusion-xl-base-1.0",
            "compile": False,
            "vae_dtype": "float32",
            "cuda_graphs": False,
            "channels_last": True,
        },
    )
    gpu = settings.resolve(cuda=True)
    assert (gpu.compile, gpu.vae_dtype, gpu.cuda_graphs, gpu.channels_last) == (False, "float32", False, True)
    # CUDA graphs cannot be forced on a CPU device.
    assert build(Settings, {"preset": "tiny", "cuda_graphs": True}).resolve(cuda=False).cuda_graphs is False


def test_padded_batch_picks_the_smallest_listed_batch():
    settings = build(
        Settings,
        {
            "preset": "tiny",
            "shapes": [
                {"width": 1024, "height": 1024, "batch": 1},
                {"width": 1024, "height": 1024, "batch": 4},
                {"width": 832, "height": 1216},
            ],
        },
    )
    resolved = settings.resolve(cuda=True)
    assert settings.batch_limit == 4  # max_batch 0: the largest listed batch
    assert build(Settings, {"preset": "tiny", "max_batch": 6}).batch_limit == 6
    assert [resolved.padded_batch(1024, 1024, n) for n in (1, 2, 3, 4, 5)] == [1, 4, 4, 4, None]
    assert resolved.padded_batch(832, 1216, 1) == 1 and resolved.padded_batch(1216, 832, 1) is None
    assert resolved.describe_shapes() == "1024x1024x1, 1024x1024x4, 832x1216x1"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "exactly one of preset"),
        ({"preset": "tiny", "model": "x/y"}, "exactly one of preset"),
        ({"preset": "huge"}, "must be one of"),
        ({"preset": "tiny", "shapes": [{"width": 1020, "height": 1024}]}, "multiples of 8"),
        ({"preset": "tiny", "shapes": [{"width": 64, "height": 64}, {"width": 64, "height": 64}]}, "listed twice"),
        ({"preset": "tiny", "cuda_graphs": True, "compile_mode": "reduce-overhead"}, "captures CUDA graphs itself"),
        ({"preset": "tiny", "compile": "yes"}, "must be"),
        ({"preset": "tiny", "unlisted_shape": "recompile"}, "must be one of"),
        ({"preset": "tiny", "decoder": "taesd"}, "unknown key"),
    ],
)
def test_invalid_settings_are_refused_with_a_reason(raw, message):
    with pytest.raises(SettingsError, match=message):
        build(Settings, raw)


def test_auto_graphs_yield_to_a_graphing_compile_mode():
    settings = build(Settings, {"preset": "tiny", "compile_mode": "max-autotune"})
    assert settings.resolve(cuda=True).cuda_graphs is False


def test_checking_a_config_does_not_import_torch():
    code = (
        "import sys; from backends.registry import backend_class; "
        "cls = backend_class('local_sdxl'); from backends.settings import build; "
        "build(cls.Settings, {'preset': 'tiny'}); "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
