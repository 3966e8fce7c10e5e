"""``type: pixelbox``: a made-up render API, the README's "Writing a backend" example (kept equal to it).

``POST /v1/render`` with ``{"prompt", "width", "height", "count", "seed"}`` and ``Authorization: Token <key>``
answers ``{"images": [<url>, ...]}``; the images are fetched from ``allowed_output_hosts``.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import BackendSpec, ImageRequest, ImageResult, StageClock
from backends.errors import BackendProtocolError
from backends.remote import Outputs, RemoteBackend, usage


@dataclass(frozen=True, slots=True)
class Settings:  # the backend's `settings:` block in routes.yaml, checked at load
    api_key: str
    base_url: str = "https://api.pixelbox.example"
    allowed_output_hosts: tuple[str, ...] = ("cdn.pixelbox.example",)


class PixelboxBackend(RemoteBackend[Settings]):
    Settings = Settings

    def __init__(self, spec: BackendSpec) -> None:
        s: Settings = spec.settings
        super().__init__(
            spec, base_url=s.base_url, key=s.api_key, key_scheme="Token ", outputs=Outputs(s.allowed_output_hosts)
        )

    async def generate(self, request: ImageRequest, clock: StageClock) -> ImageResult:
        body = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "count": request.n,
            "seed": request.seed,
        }
        with self.loads.track():
            response = await self.send("POST", "/v1/render", clock, json=body)  # the key goes with it
            self.raise_for_status(response)  # 429/503 overloaded, 5xx failed, 4xx rejected...
            answer = self.json_body(response)
            urls = answer.get("images") if isinstance(answer, dict) else None
            if not isinstance(urls, list) or len(urls) != request.n or not all(isinstance(u, str) for u in urls):
                raise BackendProtocolError(f"{self.name}: expected {request.n} image URLs")
            images = await self.fetch(urls, clock)  # allow-listed hosts only, never with the key
        return ImageResult(tuple(images), usage(request, len(images)))
