"""Fixtures for the local SDXL backend tests: the tiny preset on CPU, small shapes, few steps.

One backend is started per module and shared (start-up builds the models and warms every shape, a few
seconds on 2 cores); tests that need other settings start their own. The backend's worker does not belong
to any event loop (each request brings its own), so a backend started once serves every test's loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backends.base import BackendSpec, Capabilities, ImageRequest
from backends.local_sdxl import LocalSDXLBackend, Settings
from backends.settings import build

SIZE = 64
TEST_SETTINGS: dict[str, Any] = {
    "preset": "tiny",
    "device": "cpu",
    "shapes": [{"width": SIZE, "height": SIZE, "batch": 1}, {"width": SIZE, "height": SIZE, "batch": 4}],
    "default_steps": 4,
    "max_wait_ms": 0,
    "warmup_runs": 1,
}


def make_settings(**overrides: Any) -> Settings:
    return build(Settings, {**TEST_SETTINGS, **overrides})


def make_spec(name: str = "local", **overrides: Any) -> BackendSpec:
    return BackendSpec(
        name=name, type="local_sdxl", settings=make_settings(**overrides), capabilities=Capabilities(max_n=8)
    )


def request(prompt: str = "a red bicycle", **kw: Any) -> ImageRequest:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    return ImageRequest(prompt=prompt, **kw)


def start_backend(name: str = "local", **overrides: Any) -> LocalSDXLBackend:
    backend = LocalSDXLBackend(make_spec(name, **overrides))
    asyncio.run(backend.start())
    return backend


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalSDXLBackend]:
    b = start_backend()
    try:
        yield b
    finally:
        asyncio.run(b.aclose())


@pytest.fixture
def hook(backend: LocalSDXLBackend) -> Iterator[Hook]:
    worker = backend.worker
    assert worker is not None
    h = Hook()
    worker.inject = h
    try:
        yield h
    finally:
        h.gate.set()
        worker.inject = None
        worker.broken = None


class Hook:
    """Worker test hook: records every batch that reaches the device; a batch whose first prompt is
    ``"blocker"`` waits for ``gate`` (keeps the device busy so others queue); ``fail`` raises for a
    prompt (an injected device error)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[Any] = []
        self.fail: dict[str, BaseException] = {}

    def __call__(self, batch: Any) -> None:
        self.batches.append(batch)
        first = batch.prompts[0][0]
        if first == "blocker":
            assert self.gate.wait(10), "test never opened the gate"
        error = self.fail.pop(first, None)
        if error is not None:
            raise error

    def prompts(self) -> list[str]:
        return [p for b in self.batches for p, _ in b.prompts]


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
