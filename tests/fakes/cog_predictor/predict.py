"""A small real cog predictor for the cog backend tests: SDXL-shaped inputs, small PNG/JPEG/WebP outputs.

Runs inside cog's own HTTP server (``python -m cog.server.http``, ``COG_PREDICT_TYPE_STUB=predict.py:Predictor``)
in the cog venv, not in the gateway's. Behaviour on demand, keyed by the prompt, so tests can drive every
path of the real server: ``"fail"`` raises (cog answers 200 with ``status: failed``), ``"slow"`` sleeps
``sleep`` seconds (to hold the single prediction slot: concurrent requests get 409, and the client can
cancel it). A sleep that runs its course leaves ``slept-<sha256(prompt)[:16]>`` in the output directory; a
cancelled one never does, so tests can tell "cancelled" from "finished" without timing anything.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

from cog import BasePredictor, Input, Path
from PIL import Image


class Predictor(BasePredictor):
    def setup(self) -> None:
        # cog reads output files back and sends them as data: URIs, but never deletes them: keep them
        # where the test that started the server cleans up.
        self.out_dir = os.environ.get("IMAGEGATE_COG_OUT_DIR") or tempfile.mkdtemp(prefix="cog-out-")

    def predict(
        self,
        prompt: str = Input(description="What to draw"),
        negative_prompt: str = Input(default="", description="What not to draw"),
        width: int = Input(default=64, ge=8, le=512),
        height: int = Input(default=64, ge=8, le=512),
        num_outputs: int = Input(default=1, ge=1, le=4),
        num_inference_steps: int = Input(default=4, ge=1, le=50),
        guidance_scale: float = Input(default=5.0, ge=0.0, le=20.0),
        seed: int = Input(default=None),
        output_format: str = Input(default="png", choices=["png", "jpg", "webp"]),
        sleep: float = Input(default=0.0, ge=0.0, le=30.0),
    ) -> list[Path]:
        if "fail" in prompt:
            raise RuntimeError("the model could not draw this prompt")
        if "slow" in prompt or sleep:
            # Sleep in small steps: cog cancels a running prediction by interrupting the worker.
            end = time.monotonic() + (sleep or 5.0)
            while time.monotonic() < end:
                time.sleep(0.05)
            # Only reached when nobody cancelled the prediction (cog interrupts the sleep above).
            marker = "slept-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
            with open(os.path.join(self.out_dir, marker), "w"):
                pass
        outputs = []
        for index in range(num_outputs):
            # Deterministic colour from prompt, seed and index, so tests can tell the outputs apart.
            digest = hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).digest()
            image = Image.new("RGB", (width, height), tuple(digest[:3]))
            extension = {"jpg": "jpg", "png": "png", "webp": "webp"}[output_format]
            path = Path(os.path.join(self.out_dir, f"{time.monotonic_ns()}-{index}.{extension}"))
            image.save(path, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[output_format])
            outputs.append(path)
        return outputs
