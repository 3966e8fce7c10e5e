"""Small pieces of the pipeline: stage timing, the prompt-embedding LRU, host→device copies, pixel output, the
device choice, and :class:`BuildMode` (seeded, typed module construction without process-global torch state)."""

from __future__ import annotations

import functools
import inspect
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


class StageTimer:
    """Marks stage boundaries. CUDA: events recorded on the stream, read only after the final copy has
    synchronized (so timing adds no sync). CPU: perf_counter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def read(self) -> dict[str, float]:
        """Seconds between consecutive marks, named by the later mark. Call after the device is idle."""
        out: dict[str, float] = {}
        for (_, a), (name, b) in itertools.pairwise(self.marks):
            out[name] = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
        return out


class EmbeddingCache:
    """LRU of (prompt, negative) → (cond, pooled, uncond, uncond_pooled), device tensors."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, str | None], tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str | None], compute: Callable[[], tuple[torch.Tensor, ...]]):
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        value = compute()
        if self.size:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without a synchronization: a plain ``.to("cuda")`` from pageable memory waits for the
    stream to drain. Pinned memory + ``non_blocking`` only enqueues the copy (PyTorch's pinned allocator
    keeps the host buffer alive until the copy has run)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW → uint8 NHWC on the device (a quarter of the bytes to copy out)."""
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu. CUDA devices get an explicit index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


# -- seeded, typed construction without global state ------------------------------------------------------------

# Constructors that put a tensor on the default device when given none (torch.device(...) as a context manager
# fills in the same ones, but also sets a process-global that torch.compile guards on).
_DEVICE_FACTORIES = frozenset(
    {
        torch.empty,
        torch.empty_strided,
        torch.empty_permuted,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.eye,
        torch.arange,
        torch.range,
        torch.linspace,
        torch.logspace,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.tensor,
        torch.as_tensor,
        torch.asarray,
        torch.scalar_tensor,
        torch.tril_indices,
        torch.triu_indices,
    }
)
# Constructors whose result has the default dtype whenever none is given.
_DEFAULT_DTYPE = frozenset(
    {
        torch.empty,
        torch.empty_strided,
        torch.empty_permuted,
        torch.zeros,
        torch.ones,
        torch.eye,
        torch.rand,
        torch.randn,
    }
)
# Constructors that infer their dtype from the data, using the default for Python floats.
_INFERRED_DTYPE = frozenset(
    {
        torch.tensor,
        torch.as_tensor,
        torch.asarray,
        torch.scalar_tensor,
        torch.full,
        torch.arange,
        torch.range,
        torch.linspace,
        torch.logspace,
    }
)
# Random number draws that take a ``generator=``: in-place tensor methods, then functions.
_RANDOM = frozenset(
    {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.cauchy_,
        torch.Tensor.log_normal_,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.normal,
        torch.bernoulli,
        torch.multinomial,
        torch.poisson,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
    }
)


@functools.cache
def _takes_generator(func: Any) -> bool:
    """A Python-level function with a ``generator`` parameter (``torch.nn.init.kaiming_uniform_`` and kin).
    Needed because ops called *inside* a function this mode handles do not reach the mode again."""
    try:
        return "generator" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class BuildMode(TorchFunctionMode):
    """Construct modules as ``torch.manual_seed(seed)`` + ``torch.set_default_dtype(dtype)`` +
    ``with torch.device(device)`` would, without touching any of those process-wide settings.

    Why: those three are global to the process (``torch.device`` as a context sets a global that
    ``torch.compile`` guards on), and several workers (one per GPU) build at the same moment — each would
    see the others' seed, default dtype or device, and the process would be left with whichever restore ran
    last. A ``TorchFunctionMode`` is per thread: this one gives factories without a device ``device``, gives
    those that would take the default dtype ``dtype``, and gives every random draw without a generator one
    of its own, seeded with ``seed`` (one per device, as ``manual_seed`` seeds the CPU and each GPU). The
    draws are the very ones the global generator would have made, so the weights are bit-identical to a
    seeded build. Meta tensors draw nothing and get no generator.
    """

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _DEVICE_FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = self.device
        if func in _DEFAULT_DTYPE and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        if kwargs.get("generator") is None and (func in _RANDOM or _takes_generator(func)):
            target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            gen = self._generator(
                target.device if target is not None else torch.device(kwargs.get("device") or self.device)
            )
            if gen is not None:
                kwargs["generator"] = gen
        out = func(*args, **kwargs)
        if (
            func in _INFERRED_DTYPE
            and kwargs.get("dtype") is None
            and isinstance(out, torch.Tensor)
            and out.dtype == torch.get_default_dtype() != self.dtype
            and not (args and isinstance(args[0], torch.Tensor | np.ndarray))
        ):
            out = func(*args, **kwargs, dtype=self.dtype)  # the default dtype was used: ours instead
        return out
