"""KServe V2 inference protocol codec: pure functions, no I/O.

* ``split_calls``: how many images each infer call asks for (batch dimension / parallel calls).
* ``encode_request``: gateway request → ``(headers, body)`` of ``POST /v2/models/{m}/infer``, as JSON or
  with Triton's binary tensor extension (JSON header + raw tensor bytes, ``Inference-Header-Content-Length``).
* ``decode_response``: infer response (JSON or binary, after content decoding) → list of ``[H, W, C]``
  uint8 arrays, or encoded ``Image``s when the model returns encoded image bytes (a BYTES tensor).
* ``encode_array``: array → PNG/JPEG/WebP bytes (CPU work: run it in a worker thread).

Errors in what the server sent raise ``CodecError``; the backend reports them as protocol errors.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import struct
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from PIL import Image as PILImage

from backends import imaging
from backends.base import Image, ImageRequest
from backends.http import sniff_format
from backends.remote import seeded_batches
from backends.triton.config import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMPY_DTYPES: Mapping[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


class CodecError(ValueError):
    """The server's answer does not follow the protocol or does not hold an image tensor we can read."""


# -- paths ------------------------------------------------------------------------------------------


def model_path(settings: Settings) -> str:
    path = f"/v2/models/{quote(settings.model, safe='')}"
    if settings.model_version:
        path += f"/versions/{quote(settings.model_version, safe='')}"
    return path


def infer_path(settings: Settings) -> str:
    return model_path(settings) + "/infer"


def ready_path(settings: Settings) -> str:
    return model_path(settings) + "/ready"


# -- request ----------------------------------------------------------------------------------------


def split_calls(request: ImageRequest, settings: Settings) -> list[ImageRequest]:
    """The infer calls that together produce ``request.n`` images, as requests whose ``n`` is the image
    count of that call. A model that takes ``n`` as an input gets one call; otherwise calls of at most
    ``max_batch`` images, each starting at its own seed offset so no two images share a seed."""
    if settings.inputs.n is not None or request.n <= settings.max_batch:
        return [request]
    return [
        dataclasses.replace(
            request, n=count, seed=seed, request_id=f"{request.request_id}-{i}" if request.request_id else ""
        )
        for i, (count, seed) in enumerate(seeded_batches(request.n, settings.max_batch, request.seed))
    ]


def _field_values(request: ImageRequest, field: str, rows: int) -> list[Any] | None:
    """The per-row values of one request field (None: not set and no default → leave the input out)."""
    if field == "seed":  # one seed per row
        return None if request.seed is None else [request.seed + i for i in range(rows)]
    value = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "width": request.width,
        "height": request.height,
        "guidance": request.guidance_scale,
        "n": request.n,
    }[field]
    return None if value is None else [value] * rows


def _typed(value: Any, datatype: str) -> Any:
    if datatype == "BYTES":
        return value if isinstance(value, str) else str(value)
    if datatype == "BOOL":
        return bool(value)
    if datatype.startswith("FP"):
        return float(value)
    return int(value)


def _bytes_element(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def encode_request(request: ImageRequest, settings: Settings) -> tuple[dict[str, str], bytes]:
    """The headers and body of one infer call for ``request`` (whose ``n`` is this call's image count).

    Every configured input whose request field is set (or has a ``default``) is sent with its configured
    shape; with ``max_batch`` > 1 the first dimension becomes the image count and each row carries that
    image's value (seeds ``seed + row``). The output is requested by name, in binary when configured.
    """
    rows = 1 if settings.inputs.n is not None else request.n
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for field, spec, datatype in settings.inputs.mapped():
        values = _field_values(request, field, rows)
        if values is None:
            if spec.default is None:
                continue
            values = [spec.default] * rows
        shape = list(spec.shape)
        if settings.max_batch > 1:
            shape[0] = rows
        per_row = math.prod(shape) // rows
        data = [_typed(v, datatype) for v in values for _ in range(per_row)]
        tensor: dict[str, Any] = {"name": spec.name, "shape": shape, "datatype": datatype}
        if settings.binary_inputs:
            if datatype == "BYTES":
                raw = b"".join(_bytes_element(v) for v in data)
            else:
                raw = np.asarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data
        tensors.append(tensor)

    payload: dict[str, Any] = {}
    if request.request_id:
        payload["id"] = request.request_id
    parameters = dict(settings.parameters)
    if settings.binary:
        parameters["binary_data_output"] = True
    if parameters:
        payload["parameters"] = parameters
    payload["inputs"] = tensors
    output: dict[str, Any] = {"name": settings.output}
    if settings.binary:
        output["parameters"] = {"binary_data": True}
    payload["outputs"] = [output]

    header = orjson.dumps(payload)
    headers = {"Accept-Encoding": "gzip" if settings.accept_gzip else "identity"}
    if settings.binary_inputs:
        headers["Content-Type"] = "application/octet-stream"
        headers[HEADER_LENGTH] = str(len(header))
        return headers, header + b"".join(chunks)
    headers["Content-Type"] = "application/json"
    return headers, header


# -- response ---------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _split_body(headers: Mapping[str, str], body: bytes) -> tuple[bytes, bytes]:
    """JSON part and binary part. The length header counts the JSON in the *decoded* body (Triton sets
    it before compressing; httpx has already undone any Content-Encoding)."""
    value = _header(headers, HEADER_LENGTH)
    if value is None:
        return body, b""
    try:
        length = int(value)
    except ValueError:
        raise CodecError(f"bad {HEADER_LENGTH}: {value!r}") from None
    if not 0 <= length <= len(body):
        raise CodecError(f"{HEADER_LENGTH} {length} outside a body of {len(body)} bytes")
    return body[:length], body[length:]


def _shape(out: Mapping[str, Any]) -> tuple[int, ...]:
    shape = out.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"output {out.get('name')!r} has a bad shape: {shape!r}")
    return tuple(shape)


def _bytes_elements(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise CodecError("truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise CodecError("truncated BYTES element")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def _encoded_images(out: Mapping[str, Any], raw: bytes | None) -> list[Image]:
    """A BYTES output holding encoded images (PNG/JPEG/WebP), one per element. In JSON the elements must
    be base64 text (JSON strings cannot carry raw bytes)."""
    if raw is not None:
        blobs = _bytes_elements(raw)
    else:
        data = out.get("data")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise CodecError(f"output {out.get('name')!r}: BYTES data must be a list of strings")
        try:
            blobs = [base64.b64decode(x, validate=True) for x in data]
        except (binascii.Error, ValueError):
            raise CodecError(f"output {out.get('name')!r}: BYTES image elements must be base64 in JSON") from None
    expected = math.prod(_shape(out))
    if len(blobs) != expected:
        raise CodecError(f"output {out.get('name')!r}: {len(blobs)} elements for shape {list(_shape(out))}")
    return [Image(format=sniff_format(b), data=b) for b in blobs]


def _numeric(out: Mapping[str, Any], raw: bytes | None) -> np.ndarray:
    datatype = out.get("datatype")
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise CodecError(f"output {out.get('name')!r} has unsupported datatype {datatype!r}")
    shape = _shape(out)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise CodecError(f"output {out.get('name')!r}: {len(raw)} bytes for {datatype} {list(shape)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    data = out.get("data")
    if not isinstance(data, list):
        raise CodecError(f"output {out.get('name')!r} has no data")
    try:
        array = np.asarray(data, dtype=dtype).reshape(-1)
    except (TypeError, ValueError):
        raise CodecError(f"output {out.get('name')!r}: data is not a {datatype} array") from None
    if array.size != count:
        raise CodecError(f"output {out.get('name')!r}: {array.size} values for shape {list(shape)}")
    return array.reshape(shape)


def to_images(tensor: np.ndarray, layout: str, scale: float = 1.0) -> list[np.ndarray]:
    """An image tensor in ``layout`` → ``[H, W, C]`` uint8 arrays (C in 1, 3, 4). Floats are scaled by
    ``scale``, rounded and clipped to 0..255."""
    batched = layout if layout.startswith("N") else "N" + layout
    if tensor.ndim == len(batched) - 1:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise CodecError(f"image tensor has shape {list(tensor.shape)}, expected {batched}")
    if batched == "NCHW":
        tensor = tensor.transpose(0, 2, 3, 1)
    if tensor.shape[-1] not in (1, 3, 4) or 0 in tensor.shape[1:3]:
        raise CodecError(f"image tensor {list(tensor.shape)} (as NHWC) is not 1, 3 or 4 channels: check layout")
    if tensor.dtype != np.uint8:
        values = tensor.astype(np.float32) * np.float32(scale)
        if not np.isfinite(values).all():
            raise CodecError("image tensor holds NaN or infinite values")
        tensor = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(tensor[i]) for i in range(tensor.shape[0])]


def decode_response(headers: Mapping[str, str], body: bytes, settings: Settings) -> list[np.ndarray | Image]:
    """The images in an infer response body (already content-decoded): ``[H, W, C]`` uint8 arrays for a
    numeric image tensor, ``Image``s for a BYTES tensor of encoded images."""
    head, binary = _split_body(headers, body)
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise CodecError("response is not valid JSON") from None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list):
        raise CodecError("response has no outputs list")
    offset, found, raw = 0, None, None
    for out in outputs:
        if not isinstance(out, dict):
            raise CodecError("malformed output entry")
        params = out.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        chunk = None
        if size is not None:
            # Binary outputs follow the JSON back to back, in the order the outputs are listed.
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise CodecError(f"output {out.get('name')!r}: binary_data_size {size!r} beyond the body")
            chunk = binary[offset : offset + size]
            offset += size
        if out.get("name") == settings.output and found is None:
            found, raw = out, chunk
    if found is None:
        names = ", ".join(repr(o.get("name")) for o in outputs)
        raise CodecError(f"output {settings.output!r} not in response (got {names or 'none'})")
    if found.get("datatype") == "BYTES":
        return list(_encoded_images(found, raw))
    return list(to_images(_numeric(found, raw), settings.layout, settings.output_scale))


def encode_array(image: np.ndarray, fmt: str = "png") -> bytes:
    """Encode an ``[H, W, C]`` uint8 array as ``fmt`` (png/jpeg/webp), with the gateway's own encoder
    settings. CPU work: call it off the event loop."""
    pixels = image[:, :, 0] if image.shape[-1] == 1 else image
    return imaging.encode(PILImage.fromarray(pixels), fmt)
