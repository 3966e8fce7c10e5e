"""A fake blob / CDN host for output images: serves a small PNG at any path and records what every request
carried, so tests can prove that no credential (and no cookie) ever reaches an output host.

Every answer sets a cookie: a client that kept cookies would send it back on its next fetch, and the
``Cookie`` header would show up in ``requests``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fakes.openai_stub import tiny_png


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # as received, lower-case names, in order (repeats kept)


class OutputHost:
    """A raw ASGI app. ``requests`` lists every request received; ``set_cookie`` is sent with each answer."""

    def __init__(self, image: bytes | None = None, set_cookie: str = "session=output-host-cookie; Path=/") -> None:
        self.image = image or tiny_png()
        self.set_cookie = set_cookie
        self.status = 200  # 3xx: a redirect to /elsewhere instead of the image
        self.requests: list[Seen] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests.append(
            Seen(
                scope["method"],
                scope["path"],
                scope.get("query_string", b"").decode("latin-1"),
                tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]),
            )
        )
        if 300 <= self.status < 400:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status,
                    "headers": [(b"location", b"/elsewhere"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [
                    (b"content-type", b"image/png"),
                    (b"content-length", str(len(self.image)).encode()),
                    (b"set-cookie", self.set_cookie.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.image})

    def header_text(self) -> str:
        """Everything the output host was sent apart from the body, as one string to search."""
        return "\n".join(
            f"{r.method} {r.path}?{r.query}\n" + "\n".join(f"{k}: {v}" for k, v in r.headers) for r in self.requests
        )
