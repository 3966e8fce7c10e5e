"""The deterministic "image model" every KServe V2 test server serves (pytriton, MLServer, the fake).

Pure numpy, no other imports, so the third-party servers' venvs can load it and the tests can compute the
exact pixels they expect back. The picture is a base colour derived from (prompt, seed) plus horizontal
and vertical ramps, so a wrong prompt, seed, size, channel order or axis order all change the pixels.
"""

from __future__ import annotations

import zlib

import numpy as np

# Prompts the served models treat specially, to inject failures from a test.
FAIL_PROMPT = "raise an error"  # the model raises -> the server reports a model failure
SLOW_PROMPT_PREFIX = "sleep:"  # "sleep:0.5 ..." -> the model sleeps that many seconds first


def render(prompt: str, seed: int = 0, width: int = 64, height: int = 64) -> np.ndarray:
    """A uint8 ``[height, width, 3]`` RGB image determined by ``prompt`` and ``seed``."""
    key = zlib.crc32(prompt.encode("utf-8")) ^ (int(seed) & 0xFFFFFFFF)
    base = np.array([key & 0xFF, (key >> 8) & 0xFF, (key >> 16) & 0xFF], dtype=np.int64)
    ys = np.arange(height, dtype=np.int64)[:, None, None]
    xs = np.arange(width, dtype=np.int64)[None, :, None]
    ramp = np.array([3, 5, 7], dtype=np.int64)[None, None, :]
    return ((base + xs * ramp + ys * ramp[..., ::-1]) % 256).astype(np.uint8)


def slow_seconds(prompt: str) -> float:
    """How long the model should sleep for ``prompt`` (0 unless it starts with ``sleep:SECONDS``)."""
    if not prompt.startswith(SLOW_PROMPT_PREFIX):
        return 0.0
    head = prompt[len(SLOW_PROMPT_PREFIX) :].split()[0] if prompt[len(SLOW_PROMPT_PREFIX) :].strip() else "0"
    try:
        return min(float(head), 30.0)
    except ValueError:
        return 0.0
