"""``type: triton``: KServe V2 over HTTP (Triton Inference Server, MLServer, KServe).

``config`` holds the routes.yaml settings, ``codec`` the pure request/response translation (JSON and
Triton's binary tensor extension), ``backend`` the ``TritonBackend`` itself.
"""

from __future__ import annotations

from backends.triton.backend import TritonBackend
from backends.triton.codec import CodecError, decode_response, encode_request, split_calls
from backends.triton.config import Inputs, Settings, TensorInput

__all__ = [
    "CodecError",
    "Inputs",
    "Settings",
    "TensorInput",
    "TritonBackend",
    "decode_response",
    "encode_request",
    "split_calls",
]
