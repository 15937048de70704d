"""LLaVA 1.5 (CLIP tower + projector + Llama LM) and LLaVA-NeXT (anyres tiles, unpadding, image newlines), tiny random
checkpoints built and saved by transformers, against transformers in float32: greedy tokens with two images of
different sizes in one prompt, prefilled whole and in chunks that cut through the image spans, batched with a
text-only request; a prefix that ends inside an image (a radix-cache hit there)."""

from __future__ import annotations

import pytest
import torch

from runtime.messages import IMAGE_PAD_BASE
from tests.model_fixtures import _CACHE_ARG, PlanDriver, hf_greedy
from tests.multimodal_fixtures import image_item, kinds_on_devices, random_image, save_tiny_llava, vision_runner

NEW_TOKENS = 8


@pytest.fixture(scope="module", params=kinds_on_devices(("llava", "llava_next", "llava_onevision")))
def llava(request, tmp_path_factory):
    kind, device = request.param
    folder = str(tmp_path_factory.mktemp(kind))
    reference = save_tiny_llava(folder, kind)
    for processor, runner, arena in vision_runner(folder, device, "llava"):
        yield reference, processor, runner, arena


def _prompt(processor, arena, text: str, images: list[tuple[int, int, int]]):
    """The processor's inputs, and what the ingress sends: image runs (separated by text) as pad ids, tensors in the
    arena. `images`: (seed, width, height) each."""
    inputs = processor(text=text, images=[random_image(*image) for image in images], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    starts = [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token)]
    served, items = list(ids), []
    for k, start in enumerate(starts):
        length = next((j for j in range(start, len(ids)) if ids[j] != image_token), len(ids)) - start
        served[start:start + length] = [IMAGE_PAD_BASE + images[k][0]] * length
        others = {"image_sizes": inputs["image_sizes"][k:k + 1]} if "image_sizes" in inputs else {}
        items.append(image_item(arena, start, length, inputs["pixel_values"][k:k + 1], **others))
    return ids, inputs, served, items


def _hf_greedy(model, ids, inputs):
    with torch.inference_mode():
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **extra)
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
    ids, inputs, served, items = _prompt(processor, arena, "USER: <image>\nand <image>\nWhich is brighter?",
                                         [(3, 40, 32), (4, 20, 61)])
    expected = _hf_greedy(reference, ids, inputs)
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
    ids, inputs, served, items = _prompt(processor, arena, "USER: <image>\nDescribe it.", [(5, 50, 50)])
    expected = _hf_greedy(reference, ids, inputs)
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


def test_image_tokens_without_images_are_refused(llava):
    """A scheduler bug (image ids in a row that got no images) is a clear error, not an out-of-range lookup."""
    _, _, runner, _ = llava
    driver = PlanDriver(runner)
    seq = driver.start([1, 2, IMAGE_PAD_BASE + 7, 3])
    with pytest.raises(ValueError, match="image tokens in a row that has no images"):
        driver.prefill([seq])


def test_original_repository_layout(tmp_path):
    """LLaVA-OneVision in LLaVA's own layout (lmms-lab/...: LlavaQwenForCausalLM, no processor) serves as its
    transformers conversion does: the same greedy tokens from the processor built for it."""
    from tests.multimodal_fixtures import save_original_llava_onevision

    reference, folder = save_original_llava_onevision(str(tmp_path))
    for processor, runner, arena in vision_runner(folder, "cpu", "llavaorig"):
        assert runner.model_config.architecture == "LlavaOnevisionForConditionalGeneration"
        ids, inputs, served, items = _prompt(processor, arena, "USER: <image>\nWhat is it?", [(6, 30, 50)])
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == reference.config.image_token_index
        driver = PlanDriver(runner)
        seq = driver.start(served, images=items)
        driver.prefill([seq], chunk=9)
        driver.decode([seq], NEW_TOKENS - 1)
        assert seq.output == _hf_greedy(reference, ids, inputs)
