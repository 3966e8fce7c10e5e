"""Small pieces of the pipeline: stage timing, the prompt-embedding LRU, host→device copies, pixel output."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


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
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
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
