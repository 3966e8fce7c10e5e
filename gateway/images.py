"""A bounded in-memory store for images served by URL (``response_format: url``).

Entries expire after ``ttl_s`` and the oldest are evicted beyond ``max_bytes``. Ids are random and
unguessable (128 bits), so the URL itself is the capability to read the image.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, fmt: str) -> str:
        self._expire()
        key = f"{secrets.token_urlsafe(16)}.{fmt}"
        self._items[key] = (time.monotonic() + self.ttl_s, data, _CONTENT_TYPES.get(fmt, "application/octet-stream"))
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._drop_oldest()
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1], item[2]

    def _drop_oldest(self) -> None:
        _, (_, data, _) = self._items.popitem(last=False)
        self._bytes -= len(data)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] < now:
            self._drop_oldest()
