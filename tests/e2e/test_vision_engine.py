"""runtime.Engine with a tiny random LLaVA 1.5 checkpoint: SGLang's `image_data` argument, against transformers."""

from __future__ import annotations

import pytest
import torch

import runtime
from tests.multimodal_fixtures import png_bytes, random_image, save_tiny_llava

pytestmark = pytest.mark.slow


def test_engine_image_data_matches_transformers(tmp_path):
    import base64

    import transformers as tf

    model = save_tiny_llava(str(tmp_path))
    processor = tf.AutoProcessor.from_pretrained(str(tmp_path))
    image = random_image(11)
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    inputs = processor(text=text, images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    engine = runtime.Engine(model_path=str(tmp_path), log_level="warning", max_total_tokens=1024,
                            image_arena_mb=4)
    try:
        answer = engine.generate(text, {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
                                 image_data=base64.b64encode(png_bytes(image)).decode())
        assert answer["output_ids"] == expected
        with pytest.raises(ValueError, match="image_data: invalid base64"):
            engine.generate(text, image_data="@" * 100)
    finally:
        engine.shutdown()
