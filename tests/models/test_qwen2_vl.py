"""Qwen2-VL (its ViT at dynamic resolution, M-RoPE) and Qwen2.5-VL (window attention in its ViT), tiny random
checkpoints built and saved by transformers, against
transformers' own generate in float32: greedy tokens with two images of different sizes, prefilled whole and in
chunks that cut through the image runs, batched with a text-only request (whose M-RoPE ids are its plain positions),
and decoding past the images (positions moved on by the images' extent)."""

from __future__ import annotations

import pytest
import torch

from runtime.messages import IMAGE_PAD_BASE, ArenaTensor, ImageItem
from runtime.multimodal.inputs import split_per_image
from tests.model_fixtures import PlanDriver
from tests.multimodal_fixtures import kinds_on_devices, random_image, save_tiny_qwen2_vl, vision_runner

NEW_TOKENS = 8


@pytest.fixture(scope="module", params=kinds_on_devices(("qwen2_vl", "qwen2_5_vl")))
def qwen2_vl(request, tmp_path_factory):
    kind, device = request.param
    folder = str(tmp_path_factory.mktemp(kind))
    reference = save_tiny_qwen2_vl(folder, kind)
    for processor, runner, arena in vision_runner(folder, device, "qwenvl"):
        yield reference, processor, runner, arena


def _hf_generate(model, inputs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("chunk", [None, 5])
def test_greedy_with_images_matches_transformers(qwen2_vl, chunk):
    reference, processor, runner, arena = qwen2_vl
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                             {"type": "text", "text": "Which is brighter?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [random_image(3, 84, 56), random_image(4, 60, 100)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    expected = _hf_generate(reference, inputs)
    ids = inputs["input_ids"][0].tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    starts = [i for i, t in enumerate(ids) if t == image_token and ids[i - 1] != image_token]
    per_image = split_per_image({k: v.numpy() for k, v in inputs.items()}, len(images))
    served, items = list(ids), []
    for k, start in enumerate(starts):
        length = next(j for j in range(start, len(ids)) if ids[j] != image_token) - start
        served[start:start + length] = [IMAGE_PAD_BASE + k] * length
        tensors = {name: ArenaTensor(arena.name, arena.put(array.tobytes()), list(array.shape), str(array.dtype))
                   for name, array in per_image[k].items()}
        items.append(ImageItem(offset=start, length=length, tensors=tensors))
    assert [item.length for item in items] == [6, 8]  # 4x6 and 8x4 patches, merged 2x2
    text_ids = processor.tokenizer.encode("The capital of France is")
    text_expected = _hf_generate(reference, {"input_ids": torch.tensor([text_ids]),
                                             "attention_mask": torch.ones(1, len(text_ids), dtype=torch.long)})
    driver = PlanDriver(runner)
    seqs = [driver.start(served, images=items), driver.start(text_ids)]
    driver.prefill(seqs, chunk=chunk)
    driver.decode(seqs, NEW_TOKENS - 1)
    assert seqs[0].output == expected
    assert seqs[1].output == text_expected
