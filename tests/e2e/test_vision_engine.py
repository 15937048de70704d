"""runtime.Engine with a tiny random Qwen2-VL checkpoint (its processor loaded without torch in no process but this
one; the M-RoPE ids computed by the worker): SGLang's `image_data` argument, against transformers' generate."""

from __future__ import annotations

import base64

import pytest
import torch

import runtime
from runtime.multimodal.processor import load_processor
from tests.multimodal_fixtures import png_bytes, random_image, save_tiny_qwen2_vl

pytestmark = pytest.mark.slow


def test_engine_image_data_matches_transformers(tmp_path):
    model = save_tiny_qwen2_vl(str(tmp_path))
    processor = load_processor(str(tmp_path))
    image = random_image(11, 84, 56)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    engine = runtime.Engine(model_path=str(tmp_path), log_level="warning", max_total_tokens=1024,
                            image_arena_mb=4)
    try:
        answer = engine.generate(text, {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
                                 image_data=base64.b64encode(png_bytes(image)).decode())
        assert answer["output_ids"] == expected
        with pytest.raises(ValueError, match="image_data: invalid base64"):
            engine.generate(text, image_data="@" * 100)
    finally:
        engine.shutdown()
