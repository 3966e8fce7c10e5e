"""``server.startup_wait_s`` (issue #9 item 7: ``gateway/app.py`` documented it before it existed): start-up
waits that long for the backends' ``start()``, then serves while slower ones keep starting."""

from __future__ import annotations

import asyncio

from backends.base import BackendSpec, ImageRequest, ImageResult, Load, StageClock
from gateway.app import create_app
from gateway.config import load_config_text

CONFIG = """
server: {startup_wait_s: WAIT}
backends:
  slow: {type: openai, required: true, settings: {base_url: "http://127.0.0.1:9/v1"}}
routes:
  - {name: r, candidates: [{backend: slow}]}
"""


class Starting:
    """A backend whose ``start()`` needs a few turns of the event loop (no wall-clock time)."""

    Settings = object

    def __init__(self, spec: BackendSpec) -> None:
        self.spec, self.started = spec, False

    async def start(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        self.started = True

    async def aclose(self) -> None: ...
    def ready(self) -> bool:
        return self.started

    def load(self) -> Load:
        return Load()

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        raise AssertionError("not called")


async def lifespan_state(wait: str) -> tuple[str, bool]:
    cfg = load_config_text(CONFIG.replace("WAIT", wait), "t")
    backend = Starting(cfg.backends["slow"].spec)
    app = create_app(cfg, {"slow": backend})
    async with app._lifespan(app.starlette):
        state = app.startup["slow"]["state"]
        while not backend.started:  # it keeps starting in the background
            await asyncio.sleep(0)
    return state, backend.started


async def test_startup_waits_for_backends_up_to_startup_wait_s():
    assert await lifespan_state("30") == ("started", True)


async def test_startup_wait_of_zero_serves_at_once_while_backends_start():
    state, started = await lifespan_state("0")
    assert state in ("pending", "starting") and started
