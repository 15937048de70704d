"""LLaVA 1.5 (CLIP tower + projector + Llama LM), a tiny random checkpoint built and saved by transformers, against
transformers in float32: greedy tokens with two images in one prompt, prefilled whole and in chunks that cut through
the image spans, batched with a text-only request; a prefix that ends inside an image (a radix-cache hit there)."""

from __future__ import annotations

import uuid

import pytest
import torch

from runtime.messages import IMAGE_PAD_BASE
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from shm import Arena, run_prefix, sweep
from tests.model_fixtures import _CACHE_ARG, PlanDriver, hf_greedy
from tests.multimodal_fixtures import image_item, random_image, save_tiny_llava

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import transformers as tf

    folder = str(tmp_path_factory.mktemp("llava"))
    reference = save_tiny_llava(folder)
    processor = tf.AutoProcessor.from_pretrained(folder)
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=1024,
                                           max_running_requests=4))
    prefix = f"{run_prefix()}llava{uuid.uuid4().hex[:6]}_"
    arena = Arena.create(prefix + "images", 1 << 20)
    yield reference, processor, runner, arena
    runner.image_encoder.close()
    arena.close()
    sweep(prefix)


def _prompt(processor, arena, text: str, seeds: list[int]):
    """The processor's ids and pixels, and what the ingress sends: image runs as pad ids, pixels in the arena."""
    inputs = processor(text=text, images=[random_image(s) for s in seeds], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    starts = [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token)]
    length = ids.count(image_token) // len(seeds)
    served, items = list(ids), []
    for k, (start, seed) in enumerate(zip(starts, seeds)):
        served[start:start + length] = [IMAGE_PAD_BASE + seed] * length
        items.append(image_item(arena, start, length, inputs["pixel_values"][k:k + 1]))
    return ids, inputs["pixel_values"], served, items


def _hf_greedy(model, ids, pixel_values):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        cache = getattr(out, _CACHE_ARG)
        for _ in range(NEW_TOKENS - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{_CACHE_ARG: cache})
            cache = getattr(out, _CACHE_ARG)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("chunk", [None, 7])
def test_greedy_with_images_matches_transformers(llava, chunk):
    reference, processor, runner, arena = llava
    ids, pixels, served, items = _prompt(processor, arena, "USER: <image>\nand <image>\nWhich is brighter?", [3, 4])
    expected = _hf_greedy(reference, ids, pixels)
    text_ids = processor.tokenizer.encode("The capital of France is")
    _, text_expected = hf_greedy(_text_lm(reference), text_ids, NEW_TOKENS)
    driver = PlanDriver(runner)
    seqs = [driver.start(served, images=items), driver.start(text_ids)]
    driver.prefill(seqs, chunk=chunk)
    driver.decode(seqs, NEW_TOKENS - 1)
    assert seqs[0].output == expected
    assert seqs[1].output == text_expected
    assert not runner.image_encoder.embeddings  # every image's embeddings were dropped once its span was computed


def test_prefix_hit_inside_an_image(llava):
    """A second request with the same image whose cached prefix ends inside the image span encodes the image again
    and takes only the positions it computes."""
    reference, processor, runner, arena = llava
    ids, pixels, served, items = _prompt(processor, arena, "USER: <image>\nDescribe it.", [5])
    expected = _hf_greedy(reference, ids, pixels)
    driver = PlanDriver(runner)
    first = driver.start(served, images=items)
    driver.prefill([first])
    cut = items[0].offset + 5
    second = driver.start(served, images=items, prefix_of=first, prefix_len=cut)
    driver.prefill([second])
    driver.decode([second], NEW_TOKENS - 1)
    assert second.output == expected


def _text_lm(reference):
    """transformers' LLaVA as a text-only causal LM (same weights): the reference for a request without images."""
    class TextOnly(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return reference(input_ids=input_ids, **kwargs)

    return TextOnly()
