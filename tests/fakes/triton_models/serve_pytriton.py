"""Serve the test image model with the real Triton Inference Server (2.51) inside ``nvidia-pytriton``.

Run with the pytriton venv's interpreter::

    python serve_pytriton.py --http-port 8000 --grpc-port 8001 --metrics-port 8002

Models (all take ``prompt`` BYTES and optional ``negative_prompt`` BYTES, ``seed`` INT64, ``width`` and
``height`` INT32, each ``[batch, 1]``; batch up to 4):

``image``        outputs ``generated_image`` UINT8 ``[batch, H, W, 3]``, ``generated_image_fp32`` FP32
                 (same pixels as 0..255 floats) and ``generated_image_chw`` UINT8 ``[batch, 3, H, W]``.
``image_queue1`` the same ``generated_image`` output, one request at a time with a queue of one: a burst of
                 slow requests overflows it (Triton answers 503).

A prompt equal to ``image_model.FAIL_PROMPT`` makes the model raise; ``sleep:SECONDS ...`` makes it sleep.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
import time

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image_model


def _column(inputs: dict, name: str, n: int, default):
    """Input ``name`` as a list of n Python values (the model's own default when it was not sent)."""
    if name not in inputs:
        return [default] * n
    values = inputs[name].reshape(n, -1)[:, 0]
    return [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in values]


def _infer_one(inputs: dict) -> dict:
    n = inputs["prompt"].shape[0]
    prompts = _column(inputs, "prompt", n, "")
    seeds = _column(inputs, "seed", n, 0)
    widths = _column(inputs, "width", n, 64)
    heights = _column(inputs, "height", n, 64)
    for prompt in prompts:
        if prompt == image_model.FAIL_PROMPT:
            raise ValueError("the test model was asked to fail")
        time.sleep(image_model.slow_seconds(prompt))
    images = np.stack(
        [image_model.render(p, s, int(widths[0]), int(heights[0])) for p, s in zip(prompts, seeds, strict=True)]
    )
    return {
        "generated_image": images,
        "generated_image_fp32": images.astype(np.float32),
        "generated_image_chw": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
    }


def infer(requests: list) -> list:
    """pytriton hands a list of requests (several when the dynamic batcher merged them)."""
    return [_infer_one(r) for r in requests]


def infer_queue1(requests: list) -> list:
    return [{"generated_image": _infer_one(r)["generated_image"]} for r in requests]


INPUTS = [
    Tensor(name="prompt", dtype=bytes, shape=(1,)),
    Tensor(name="negative_prompt", dtype=bytes, shape=(1,), optional=True),
    Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True),
    Tensor(name="width", dtype=np.int32, shape=(1,), optional=True),
    Tensor(name="height", dtype=np.int32, shape=(1,), optional=True),
]


def _prefer_own_libpython() -> None:
    """Triton's Python-backend stub links against a libpython it finds on the library path; when it picks
    up the system's (a different 3.11 patch level) the model crashes on load with "'_thread.RLock' object
    has no attribute '_recursion_count'". Put this interpreter's lib dir first; the stub inherits it."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = libdir + (os.pathsep + rest if rest else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _prefer_own_libpython()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        log_verbose=0,
        exit_timeout_secs=2,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="image",
            infer_func=infer,
            inputs=INPUTS,
            outputs=[
                Tensor(name="generated_image", dtype=np.uint8, shape=(-1, -1, 3)),
                Tensor(name="generated_image_fp32", dtype=np.float32, shape=(-1, -1, 3)),
                Tensor(name="generated_image_chw", dtype=np.uint8, shape=(3, -1, -1)),
            ],
            config=ModelConfig(max_batch_size=4),
            strict=True,
        )
        triton.bind(
            model_name="image_queue1",
            infer_func=infer_queue1,
            inputs=INPUTS,
            outputs=[Tensor(name="generated_image", dtype=np.uint8, shape=(-1, -1, 3))],
            config=ModelConfig(
                max_batch_size=1,
                batcher=DynamicBatcher(default_queue_policy=QueuePolicy(max_queue_size=1)),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
