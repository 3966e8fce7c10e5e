"""The test image model as an MLServer custom runtime (served by ``mlserver start``).

Inputs (V2 JSON): ``prompt`` BYTES, optional ``seed`` INT64, ``width``/``height`` INT32, each ``[batch, 1]``.
Output ``generated_image`` UINT8 ``[batch, H, W, 3]`` (or ``generated_image_fp32`` FP32 when that output is
requested). A prompt equal to ``image_model.FAIL_PROMPT`` makes ``predict`` raise.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import image_model


class ImageModel(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: i for i in payload.inputs}
        prompts = StringCodec.decode_input(inputs["prompt"])
        n = len(prompts)

        def column(name: str, default: int) -> list[int]:
            if name not in inputs:
                return [default] * n
            return [int(v) for v in NumpyCodec.decode_input(inputs[name]).reshape(n, -1)[:, 0]]

        seeds, widths, heights = column("seed", 0), column("width", 64), column("height", 64)
        if image_model.FAIL_PROMPT in prompts:
            raise ValueError("the test model was asked to fail")
        images = np.stack(
            [image_model.render(p, s, widths[0], heights[0]) for p, s in zip(prompts, seeds, strict=True)]
        )
        wanted = [o.name for o in payload.outputs or []] or ["generated_image"]
        outputs = []
        for name in wanted:
            tensor = images.astype(np.float32) if name == "generated_image_fp32" else images
            outputs.append(NumpyCodec.encode_output(name=name, payload=tensor))
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
