"""Stores for images served by URL (``response_format: url``, ``GET /v1/images/files/{id}``).

Ids are random and unguessable (128 bits), so the URL itself is the capability to read the image. Entries
expire after ``ttl_s``; beyond ``max_bytes`` the oldest go first.

* ``MemoryImageStore``: one process's dictionary. The default with one worker (no disk, no clean-up).
* ``DirectoryImageStore``: one file per image in a directory that every worker process of a server
  shares, so a link handed out by one worker is served by any other (``imagegate serve --workers N``
  passes a temporary directory to its workers through ``IMAGEGATE_IMAGE_DIR`` unless ``server.image_dir``
  names one). Files are written to a dot-named temporary and renamed into place, so a reader sees a whole
  image or none; a file's mtime is its birth, so expiry needs no index that processes would have to share.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.config import ServerConfig

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# The worker processes of `imagegate serve --workers N` find the shared directory here.
IMAGE_DIR_ENV = "IMAGEGATE_IMAGE_DIR"
# A key as ``put`` makes them: 16 random bytes in URL-safe base64, then the format. Anything else (a path,
# a temporary's name) is not looked up at all.
_KEY = re.compile(r"[A-Za-z0-9_-]{22}\.(?:png|jpeg|webp)")
_ORPHAN_S = 60.0  # a temporary this old belongs to a writer that died mid-write


class ImageStore(Protocol):
    def put(self, data: bytes, fmt: str) -> str:
        """Keep ``data`` (an image in format ``fmt``); returns its id, the last segment of its URL."""
        ...

    def get(self, key: str) -> tuple[bytes, str] | None:
        """``(bytes, content type)``, or ``None`` if unknown or expired."""
        ...


def _new_key(fmt: str) -> str:
    return f"{secrets.token_urlsafe(16)}.{fmt}"


class MemoryImageStore:
    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, fmt: str) -> str:
        self._expire()
        key = _new_key(fmt)
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


class DirectoryImageStore:
    """Images as files in ``directory``, shared by every process that opens the same one.

    ``max_bytes`` bounds the directory as a whole: each process sweeps it (expired files, then the oldest
    beyond the bound) at most every ``ttl_s / 4`` (≤ 30 s) or after writing ``max_bytes / 4`` since its last
    sweep, so between sweeps it can run over by that much per process. Reads never serve an expired file,
    swept or not. ``clock`` is wall time (mtimes are), injectable for tests.
    """

    def __init__(
        self, directory: str | os.PathLike[str], ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ttl_s, self.max_bytes, self.clock = ttl_s, max_bytes, clock
        self._sweep_every = min(ttl_s / 4, 30.0)
        self._next_sweep = 0.0  # the first put sweeps what an earlier run left behind
        self._written = 0

    def put(self, data: bytes, fmt: str) -> str:
        key = _new_key(fmt)
        tmp = self.directory / f".{key}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.directory / key)  # atomic: readers see all of it or nothing
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._written += len(data)
        if self._written > self.max_bytes // 4 or self.clock() >= self._next_sweep:
            self.sweep()
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        if _KEY.fullmatch(key) is None:
            return None
        try:
            with open(self.directory / key, "rb") as f:
                if os.fstat(f.fileno()).st_mtime + self.ttl_s < self.clock():
                    return None
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return data, _CONTENT_TYPES[key.rsplit(".", 1)[1]]

    def sweep(self) -> None:
        """Delete expired files and abandoned temporaries, then the oldest files beyond ``max_bytes``.
        Other processes sweep the same directory: a file already gone is not an error."""
        now = self.clock()
        self._next_sweep, self._written = now + self._sweep_every, 0
        kept: list[tuple[float, int, str]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith("."):
                    if st.st_mtime + _ORPHAN_S < now:
                        _unlink(entry.path)
                elif _KEY.fullmatch(entry.name) is None:
                    continue  # not ours: leave it alone
                elif st.st_mtime + self.ttl_s < now:
                    _unlink(entry.path)
                else:
                    kept.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in kept)
        if total > self.max_bytes:
            kept.sort()
            for _, size, path in kept[:-1]:  # like the memory store, the newest image always stays
                _unlink(path)
                total -= size
                if total <= self.max_bytes:
                    break


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def open_store(server: ServerConfig) -> ImageStore:
    """The store ``server`` asks for: files in ``image_dir`` when set, else memory."""
    if server.image_dir:
        return DirectoryImageStore(server.image_dir, server.image_ttl_s, server.image_store_bytes)
    return MemoryImageStore(server.image_ttl_s, server.image_store_bytes)
