"""Image encoding shared by backends and the gateway (Pillow; CPU work, call it off the event loop).

Also the gateway's check of what a backend returned (``conform``): every image handed to a client must be
a decodable image of the format the client asked for. The check runs inside the dispatch attempt, so an
unreadable answer is that backend's failure and the request falls through to the next candidate.
"""

from __future__ import annotations

import binascii
import io
import zlib
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from backends.base import Image

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_FROM_PIL = {v: k for k, v in _PIL_FORMATS.items()}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An empty IEND chunk: length 0, type, CRC. Every complete PNG ends with exactly these 12 bytes.
_PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def encode(image: PILImage.Image, fmt: str, compression: int | None = None) -> bytes:
    """Encode a PIL image. ``compression`` is OpenAI's ``output_compression`` (0..100, higher = smaller):
    JPEG/WebP quality = 100 - compression; PNG maps it to zlib level (lossless either way)."""
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if fmt == "png":
        # Level 1 rather than Pillow's default 6: deflate's fastest level, for somewhat larger files; image
        # serving is latency-bound. An explicit compression asks for smaller files.
        kwargs["compress_level"] = 1 if compression is None else min(9, max(0, round(compression / 11)))
    else:
        kwargs["quality"] = 90 if compression is None else max(1, 100 - compression)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
    image.save(buf, format=_PIL_FORMATS[fmt], **kwargs)
    return buf.getvalue()


# -- checking what a backend returned ----------------------------------------------------------------

_HEAD = 33  # PNG signature + the whole IHDR chunk; more than the JPEG and WebP checks read
_TAIL = 12  # the PNG IEND trailer; the JPEG EOI marker is its last 2 bytes


def framed_as(head: bytes, tail: bytes, length: int) -> str | None:
    """The format whose framing an image of ``length`` bytes shows, from its first ``_HEAD`` and last
    ``_TAIL`` bytes, or None.

    PNG = signature, an IHDR whose CRC matches, the IEND trailer as the last 12 bytes; JPEG = SOI marker
    first, EOI marker last; WebP = a RIFF/WEBP header whose size field is the byte count. Constant time
    whatever the image size (the common case runs on the event loop, per request): it catches non-image
    data, a wrong format and truncation — the ways an answer goes bad in practice — but not damage inside
    the compressed data, which only a full decode would (walking every PNG chunk instead would cost time
    proportional to the image on every request, for the rarer spliced case).
    """
    if head.startswith(_PNG_SIGNATURE):
        ihdr = head[8:33]
        ok = (
            len(ihdr) == 25
            and ihdr[:8] == b"\x00\x00\x00\x0dIHDR"
            and tail == _PNG_TRAILER
            and zlib.crc32(ihdr[4:21]) == int.from_bytes(ihdr[21:25], "big")
        )
        return "png" if ok else None
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg" if tail.endswith(b"\xff\xd9") else None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp" if int.from_bytes(head[4:8], "little") + 8 == length else None
    return None


def quick_format(image: Image) -> str | None:
    """``framed_as`` for an image held as bytes or as base64 text; of the text only the first and last
    few characters are decoded."""
    data = image.data
    if data is not None:
        return framed_as(data[:_HEAD], data[-_TAIL:], len(data))
    text = image.b64
    if text is None or len(text) < 64 or len(text) % 4:
        return None  # too short to be an image, or not plain unbroken base64: decode it fully instead
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    try:
        head = binascii.a2b_base64(text[:44], strict_mode=True)  # 44 characters = 33 bytes
        tail = binascii.a2b_base64(text[-20:], strict_mode=True)  # >= 13 bytes after padding
    except (binascii.Error, ValueError):
        return None
    return framed_as(head, tail[-_TAIL:], len(text) // 4 * 3 - padding)


class UnreadableImage(ValueError):
    """A backend's image cannot be decoded (not base64, not an image, truncated, or too large)."""


def conform(image: Image, fmt: str, compression: int | None = None) -> Image:
    """``image`` as a verified ``fmt`` image: fully decoded, re-encoded when the format differs or a
    compression was asked, the original bytes kept otherwise (e.g. a good image whose framing the quick
    check did not recognise). CPU work for a thread; raises ``UnreadableImage``. The common case, already
    ``fmt`` and well framed, never gets here: see ``needs_work``."""
    try:
        # Lenient: line breaks and missing padding in otherwise good base64 are not the backend's failure.
        text = image.b64 or ""
        data = image.data if image.data is not None else binascii.a2b_base64(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise UnreadableImage(f"not base64: {exc}") from None
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            actual = _FROM_PIL.get(img.format or "")
            img.load()  # decodes every pixel: a truncated or corrupt image fails here
            if actual == fmt and compression is None:
                return Image(format=fmt, data=data, revised_prompt=image.revised_prompt)
            return Image(format=fmt, data=encode(img, fmt, compression), revised_prompt=image.revised_prompt)
    except UnidentifiedImageError:
        raise UnreadableImage(f"not an image of a known format ({len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, bomb errors...)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def needs_work(image: Image, fmt: str, compression: int | None) -> bool:
    """False when ``image`` can be passed on as it is: a URL (the caller handles those), or already a
    well-framed ``fmt`` image with no compression asked. Reads only the image's first and last bytes
    (``quick_format``: constant time whatever the image size), so it runs on the event loop."""
    if image.url is not None:
        return False
    return compression is not None or quick_format(image) != fmt
