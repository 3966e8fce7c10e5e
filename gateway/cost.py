"""Per-request price estimates from a backend's ``CostModel``. Pure.

``None`` means "unknown": the gateway says so (``X-Cost-USD: unknown``) rather than report 0.
"""

from __future__ import annotations

from backends.base import ImageRequest, Usage
from gateway.config import CostModel


def estimate(cost: CostModel, request: ImageRequest, seconds_per_image: float | None = None) -> float | None:
    """Price before the run. Time-based parts use ``seconds_per_image`` (observed) or the configured hint."""
    if not cost.known:
        return None
    seconds = seconds_per_image if seconds_per_image is not None else cost.est_seconds_per_image
    return _price(cost, request.n, request.megapixels, request.steps, seconds, seconds)


def settle(cost: CostModel, request: ImageRequest, usage: Usage) -> float | None:
    """Price after the run, from what the backend reported (falling back to the request's own numbers)."""
    if not cost.known:
        return None
    images = usage.images or request.n
    megapixels = (usage.megapixels / images) if usage.megapixels else request.megapixels
    steps = usage.steps if usage.steps is not None else request.steps
    gpu = None if usage.gpu_seconds is None else usage.gpu_seconds / images
    predict = None if usage.predict_seconds is None else usage.predict_seconds / images
    if predict is None and gpu is not None:
        predict = gpu
    return _price(cost, images, megapixels, steps, gpu, predict)


def _price(
    cost: CostModel,
    images: int,
    megapixels: float,
    steps: int | None,
    gpu_s_per_image: float | None,
    predict_s_per_image: float | None,
) -> float | None:
    total = 0.0
    if cost.per_image is not None:
        total += cost.per_image * images
    if cost.per_megapixel is not None:
        total += cost.per_megapixel * megapixels * images
    if cost.per_step is not None:
        total += cost.per_step * (steps if steps is not None else cost.default_steps) * images
    if cost.per_gpu_second is not None:
        if gpu_s_per_image is None:
            return None  # a time-priced backend with no time estimate yet: unknown, not cheap
        total += cost.per_gpu_second * gpu_s_per_image * images
    if cost.per_second is not None:
        if predict_s_per_image is None:
            return None
        total += cost.per_second * predict_s_per_image * images
    return round(total, 8)
