"""The ``settings:`` block of a ``type: triton`` backend in routes.yaml.

Example (Triton's SDXL example model plus a deployment that added per-request inputs)::

    settings:
      base_url: http://triton.internal:8000
      model: sdxl
      model_version: "1"                 # optional: /v2/models/sdxl/versions/1/...
      inputs:
        prompt: {name: prompt}           # BYTES [1, 1] by default
        negative_prompt: {name: negative_prompt}
        seed: {name: seed, datatype: INT64}
        steps: {name: steps, default: 30}
        guidance: {name: guidance_scale, datatype: FP32}
      output: generated_image            # UINT8 or FP32 (0..255) image tensor
      layout: NHWC
      binary: true                       # Triton's binary tensor extension for the output
      accept_gzip: true
      api_key: ${KSERVE_TOKEN}           # sent as "Authorization: Bearer ..."
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

DataType = Literal[
    "BYTES", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]

# Request field → the tensor datatype used when the mapping does not name one.
DEFAULT_DATATYPES: Mapping[str, str] = MappingProxyType(
    {
        "prompt": "BYTES",
        "negative_prompt": "BYTES",
        "seed": "INT64",
        "steps": "INT32",
        "width": "INT32",
        "height": "INT32",
        "guidance": "FP32",
        "n": "INT32",
    }
)


@dataclass(frozen=True, slots=True)
class TensorInput:
    """One model input fed from a request field.

    ``shape`` is the full tensor shape sent (Triton wants the batch dimension included when the model has
    ``max_batch_size > 0``: ``[1, 1]`` for one scalar per prompt). When ``max_batch`` > 1 its first
    dimension is the batch dimension and is replaced by the number of images in the call. ``default``
    is sent when the request leaves the field unset; with no default the input is left out.
    """

    name: str
    datatype: DataType | None = None
    shape: tuple[int, ...] = (1, 1)
    default: int | float | str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("input name must not be empty")
        if any(d < 1 for d in self.shape):
            raise ValueError(f"input {self.name!r}: shape dimensions must be positive, got {list(self.shape)}")


@dataclass(frozen=True, slots=True)
class Inputs:
    """Which request field feeds which model input. Only ``prompt`` is required by the model contract."""

    prompt: TensorInput = TensorInput("prompt")
    negative_prompt: TensorInput | None = None
    seed: TensorInput | None = None
    steps: TensorInput | None = None
    width: TensorInput | None = None
    height: TensorInput | None = None
    guidance: TensorInput | None = None
    n: TensorInput | None = None

    def mapped(self) -> list[tuple[str, TensorInput, str]]:
        """``(field, input, datatype)`` for every configured input, in a stable order."""
        out = []
        for name in ("prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance", "n"):
            tensor = getattr(self, name)
            if tensor is not None:
                out.append((name, tensor, tensor.datatype or DEFAULT_DATATYPES[name]))
        return out

    def __post_init__(self) -> None:
        for name, _, datatype in self.mapped():
            if name in ("prompt", "negative_prompt") and datatype != "BYTES":
                raise ValueError(f"inputs.{name}: the text input must be BYTES, got {datatype}")
        names = [t.name for _, t, _ in self.mapped()]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"inputs: tensor name(s) used twice: {', '.join(sorted(duplicates))}")


@dataclass(frozen=True, slots=True)
class Settings:
    """A KServe V2 model over HTTP (Triton, MLServer, KServe).

    ``layout`` is the axis order of the output image tensor (``N`` = images, ``C`` = 1, 3 or 4 channels);
    a tensor with one dimension fewer than the layout is taken as a single image. Float tensors are
    multiplied by ``output_scale`` (255 for a model that outputs 0..1) and clipped to 0..255.

    ``max_batch``: how many prompts the model takes along the batch dimension of one request. ``n``
    images are asked for in ``ceil(n / max_batch)`` parallel calls (seeds ``seed, seed+1, ...`` so the
    images differ). When ``inputs.n`` is mapped instead, the model itself returns ``n`` images from one
    call.

    ``binary``: ask for the output in Triton's binary tensor extension (much smaller and faster to parse
    than a JSON array of numbers; not supported by MLServer). ``binary_inputs`` sends the inputs that way
    too. ``accept_gzip`` lets the server gzip its reply (httpx would otherwise advertise gzip by
    default: without this setting we send ``Accept-Encoding: identity``).
    """

    base_url: str
    model: str
    model_version: str | None = None
    inputs: Inputs = Inputs()
    output: str = "generated_image"
    layout: Literal["NHWC", "NCHW", "HWC", "CHW"] = "NHWC"
    output_scale: float = 1.0
    max_batch: int = 1
    binary: bool = False
    binary_inputs: bool = False
    accept_gzip: bool = False
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    api_key: str | None = None
    api_key_header: str = "Authorization"
    api_key_prefix: str = "Bearer "
    ready_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model or "/" in self.model:
            raise ValueError(f"model must be a model name without '/', got {self.model!r}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_batch > 1 and self.inputs.n is not None:
            raise ValueError("set either max_batch (prompts along the batch dimension) or inputs.n, not both")
        if self.output_scale <= 0:
            raise ValueError("output_scale must be positive")
        if self.ready_interval_s <= 0:
            raise ValueError("ready_interval_s must be positive")
