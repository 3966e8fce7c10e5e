"""CUDA-graph capture of the whole denoising loop for one fixed shape (CUDA only).

Why: at 1024² an SDXL step is ~17 ms of kernels, but eager PyTorch spends host time launching hundreds of
kernels per step and the scheduler's bookkeeping between them; replaying a captured graph launches the
whole 24-step loop with one call, so the GPU never waits on Python.

How: the loop (``SDXLPipeline.denoise``) is already free of host-device syncs and reads every per-step
value from device tensors, so it can be recorded as is. Its inputs live in static buffers owned by the
capture; a request copies its noise, embeddings and guidance into them (device-to-device copies, no sync)
and replays. The output tensor is overwritten by the next replay: the caller consumes it (decode) before
running anything else, which the single worker thread guarantees. The scheduler plan the loop reads is
cached by the pipeline for the process lifetime, so the addresses baked into the graph stay valid.

Nothing here is reachable on CPU: the pipeline only captures when ``resolved.cuda_graphs`` is true, which
requires a CUDA device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

# One capture at a time per process. Several local_sdxl backends (one worker thread per GPU) warm up at the
# same time; their captures must not interleave.
_CAPTURE_LOCK = threading.Lock()


@dataclass
class CapturedLoop:
    graph: torch.cuda.CUDAGraph
    noise: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    guidance: torch.Tensor
    out: torch.Tensor

    def replay(
        self, noise: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        """Run the captured loop on new inputs (same shapes). Returns the graph's output buffer."""
        self.noise.copy_(noise)
        self.embeds.copy_(embeds)
        self.pooled.copy_(pooled)
        self.guidance.copy_(guidance)
        self.graph.replay()
        return self.out


def capture_loop(
    loop: Callable[..., torch.Tensor],
    *,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    guidance: torch.Tensor,
    warmup: int = 1,
) -> CapturedLoop:
    """Record ``loop(noise, embeds, pooled, time_ids, guidance)`` into a CUDA graph.

    The inputs are cloned into static buffers. Following the CUDA-graphs notes in the PyTorch docs, the
    loop first runs ``warmup`` times on a side stream (lazy initialisations such as cuBLAS workspaces
    must not happen during capture), then is captured once on that stream. Thread-safe: captures are
    serialized process-wide (PyTorch allows one capture at a time per process).
    """
    if not noise.is_cuda:
        raise RuntimeError("CUDA-graph capture needs a CUDA device")
    static = [t.clone() for t in (noise, embeds, pooled, time_ids, guidance)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            loop(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # stream=side: torch.cuda.graph's own default capture stream is one per process, created on whichever
    # device captured first, so a second GPU's worker must bring a stream of its device.
    # thread_local: the default ("global") makes a capture fail when *another* thread makes a
    # capture-unsafe call (cudaMalloc, a sync), e.g. the worker of a second GPU warming up meanwhile.
    # Only this thread's calls can touch the captured stream, so only they are checked.
    with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        out = loop(*static)
    torch.cuda.synchronize()
    noise_s, embeds_s, pooled_s, time_ids_s, guidance_s = static
    return CapturedLoop(graph, noise_s, embeds_s, pooled_s, time_ids_s, guidance_s, out)
