"""VisionInputs: a request's images -> prompt ids and ImageItems, in the ingress.

1. load: every image the request names is read and decoded on the media threads (runtime/multimodal/media.py),
   after the per-request count limit (--limit-mm-per-prompt);
2. preprocess, on one processor thread (never the event loop, never the scheduler): the chat template renders the
   conversation with the model's image placeholder (the checkpoint processor's template by default, or
   --chat-template), and the checkpoint's own HF processor (AutoProcessor: its image processor and its placeholder
   expansion) turns text and images into input ids and pixel tensors (numpy: the ingress runs without torch);
3. place, right before the request is sent: each image's token run is rewritten as ids from IMAGE_PAD_BASE drawn
   from a hash of its tensors (the radix cache then shares KV between prompts with the same image at the same place,
   and never between different images), and the tensors are copied into one block of the image arena (one block per
   request: allocated and sent in the same order, so the scheduler can release blocks in order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np

from runtime.messages import IMAGE_PAD_BASE, ArenaTensor, ImageItem
from runtime.multimodal.media import ImageRef, MediaError, MediaLimits, load_image
from shm.arena import Arena, ArenaBlock, ArenaTimeout

DETAILS = ("auto", "low", "high")
ALIGN = 64  # each tensor's bytes start at a multiple of this in the request's block
ARENA_WAIT_S = 5.0  # how long a request waits for room in a full image arena before its 503
ARENA_POLL_S = 0.002


@dataclass
class ProcessedImage:
    offset: int  # first token of its run in the prompt
    length: int
    tensors: dict[str, np.ndarray]
    pad_ids: list[int]


@dataclass
class ProcessedPrompt:
    input_ids: list[int]  # the processor's ids, image runs as 0 (in any vocabulary) until place() writes them
    images: list[ProcessedImage]


class VisionInputs:
    def __init__(self, args, arenas: list[Arena]):
        """`arenas`: the image arena of each data-parallel replica."""
        from runtime.chat_templates import load_chat_template
        from runtime.multimodal.processor import load_processor

        self.processor = load_processor(args.model_path)
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = load_chat_template(args.chat_template) if args.chat_template else (
            getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template)
        self.limits = MediaLimits.from_args(args)
        self.max_images = parse_mm_limit(args.limit_mm_per_prompt)["image"]
        self.arenas = arenas
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="media-fetch")
        # One thread: the processor's tokenizer keeps its state unshared.
        self._process_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="media-process")

    # ------------------------------------------------------------------ requests
    async def chat(self, messages: list[dict], refs: list[ImageRef], tools: list | None, add_generation_prompt: bool,
                   continue_final_message: bool, template_kwargs: dict | None = None) -> ProcessedPrompt:
        """`messages` as chat_message_dicts makes them with image parts kept ({"type": "image"} in their content);
        `template_kwargs`: variables of the template (OpenAI chat's chat_template_kwargs, already checked)."""
        images = await self._load(refs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._process_pool, self._chat, messages, images, tools,
                                          add_generation_prompt, continue_final_message, refs, template_kwargs or {})

    async def prompt(self, text: str, refs: list[ImageRef]) -> ProcessedPrompt:
        """SGLang's /generate text with image_data: the text's image placeholders (the processor's image token) take
        the images in order; a text without any gets one per image in front, as LLaVA's prompts put them."""
        placeholders = text.count(self.image_token)
        if placeholders == 0:
            text = (self.image_token + "\n") * len(refs) + text
        elif placeholders != len(refs):
            raise MediaError("image_data", f"the text has {placeholders} image placeholders ({self.image_token}) for "
                                           f"{len(refs)} images")
        images = await self._load(refs)
        return await asyncio.get_running_loop().run_in_executor(self._process_pool, self._process, text, images,
                                                                True, refs)

    async def wait_for_room(self, prompt: ProcessedPrompt, timeout: float = ARENA_WAIT_S) -> None:
        """Wait (up to `timeout`) until every replica's arena can take the prompt's images now: requests in flight
        give their blocks back as they finish. place() answers 503 if there is still no room."""
        nbytes = block_bytes(prompt)
        if any(nbytes > arena.capacity for arena in self.arenas):
            return  # never fits: place() says so
        deadline = time.monotonic() + timeout
        while not all(arena.can_alloc(nbytes) for arena in self.arenas) and time.monotonic() < deadline:
            await asyncio.sleep(ARENA_POLL_S)

    def place(self, prompt: ProcessedPrompt, replica: int = 0) -> tuple[list[int], list[ImageItem]]:
        """The ids to send (image runs as pad ids) and the ImageItems, their tensors copied into one new block of the
        replica's arena. Call right before sending the request to that replica (see the module docstring); raises
        MediaError(503) when the arena is full."""
        if not self.arenas:
            raise MediaError("images", "this server has no image arena (--nnodes > 1 takes no images)", 500)
        arena = self.arenas[replica]
        ids = list(prompt.input_ids)
        layout, total = [], 0
        for image in prompt.images:
            for name, array in image.tensors.items():
                layout.append((image, name, array, total))
                total += aligned(array.nbytes)
        try:
            block, view = arena.alloc(total, timeout=0)
        except ArenaTimeout:
            raise MediaError("images", "the images of requests in flight fill the image arena (--image-arena-mb); "
                                       "retry later", 503) from None
        except ValueError:
            raise MediaError("images", f"the request's images need {total} bytes; the image arena holds "
                                       f"{arena.capacity} (--image-arena-mb)") from None
        tensors: dict[int, dict[str, ArenaTensor]] = {id(image): {} for image in prompt.images}
        try:
            for image, name, array, offset in layout:
                view[offset:offset + array.nbytes] = memoryview(np.ascontiguousarray(array)).cast("B")
                tensors[id(image)][name] = ArenaTensor(arena.name, ArenaBlock(block.start + offset, array.nbytes,
                                                                                   block.end),
                                                       list(array.shape), str(array.dtype))
        finally:
            view.release()
        items = []
        for image in prompt.images:
            ids[image.offset:image.offset + image.length] = image.pad_ids
            items.append(ImageItem(offset=image.offset, length=image.length, tensors=tensors[id(image)]))
        return ids, items

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._process_pool.shutdown(wait=False, cancel_futures=True)
        for arena in self.arenas:
            arena.close()

    # ------------------------------------------------------------------ steps
    async def _load(self, refs: list[ImageRef]) -> list:
        if len(refs) > self.max_images:
            raise MediaError(refs[self.max_images].field, f"{len(refs)} images in one request; this server takes at "
                                                          f"most {self.max_images} (--limit-mm-per-prompt)")
        for ref in refs:
            if ref.detail not in DETAILS:
                raise MediaError(ref.field + ".detail", f"must be one of {', '.join(DETAILS)}, got {ref.detail!r}")
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._fetch_pool, load_image, ref.source, ref.field,
                                                                self.limits, ref.detail) for ref in refs)))

    def _chat(self, messages, images, tools, add_generation_prompt, continue_final_message, refs,
              template_kwargs) -> ProcessedPrompt:
        if not self.chat_template:
            raise MediaError("messages", "the model has no chat template for images; start the server with "
                                         "--chat-template")
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tools=tools,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message,
                                                      **template_kwargs)
        except Exception as err:  # jinja2 and template errors: the conversation is at fault
            raise MediaError("messages", f"the chat template cannot render them: {err}") from None
        if text.count(self.image_token) != len(images):
            raise MediaError("messages", f"the chat template placed {text.count(self.image_token)} image "
                                         f"placeholders for {len(images)} images")
        return self._process(text, images, False, refs)

    def _process(self, text: str, images: list, add_special_tokens: bool, refs: list[ImageRef]) -> ProcessedPrompt:
        try:
            out = self.processor(text=[text], images=images or None, return_tensors="np",
                                 add_special_tokens=add_special_tokens)
        except (ValueError, TypeError, OSError) as err:
            raise MediaError(refs[0].field if len(refs) == 1 else "images", f"the image processor refused the "
                                                                              f"images: {err}") from None
        ids = [int(t) for t in out["input_ids"][0]]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        for i in positions:  # place() writes the images' ids there; the image token itself may lie past the vocabulary
            ids[i] = 0
        counts = self._tokens_per_image(len(positions), images)
        processed, start = [], 0
        for k, (count, own) in enumerate(zip(counts, split_per_image(out, len(images)))):
            offset = positions[start]
            if positions[start + count - 1] != offset + count - 1:
                raise MediaError(refs[k].field, "the processor split an image's tokens")
            processed.append(ProcessedImage(offset, count, own, pad_ids(own, count)))
            start += count
        return ProcessedPrompt(ids, processed)

    def _tokens_per_image(self, total: int, images: list) -> list[int]:
        """How many of the prompt's image tokens each image has (adjacent images' runs touch): the processor says
        for size-dependent counts (anyres), else they share the total evenly."""
        if not images and total == 0:
            return []
        counts_for = getattr(self.processor, "_get_num_multimodal_tokens", None)
        counts = None
        if images and counts_for is not None:
            counts = getattr(counts_for(image_sizes=[(image.height, image.width) for image in images]),
                             "num_image_tokens", None)
        if counts is None and images and total % len(images) == 0:
            counts = [total // len(images)] * len(images)
        if counts is None or sum(counts) != total or len(counts) != len(images):
            raise MediaError("images", f"the processor made {total} image tokens for {len(images)} images")
        return list(counts)


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def block_bytes(prompt: ProcessedPrompt) -> int:
    """The size of the arena block place() allocates for the prompt's images."""
    return sum(aligned(array.nbytes) for image in prompt.images for array in image.tensors.values())


def split_per_image(out, num_images: int) -> list[dict[str, np.ndarray]]:
    """The processor's image tensors, image by image: those with a row per image, and those whose rows are all images'
    patches end to end (Qwen2-VL's pixel_values, image_grid_thw giving each image's patch count); tensors per prompt
    (batch_num_images and the like) are left out."""
    arrays = {k: np.asarray(v) for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    patch_rows = np.prod(arrays["image_grid_thw"], axis=1) if "image_grid_thw" in arrays else None
    images: list[dict[str, np.ndarray]] = [{} for _ in range(num_images)]
    for name, array in arrays.items():
        if patch_rows is not None and name != "image_grid_thw" and array.shape[0] == patch_rows.sum():
            for k, part in enumerate(np.split(array, np.cumsum(patch_rows)[:-1])):
                images[k][name] = part
        elif array.shape[:1] == (num_images,):
            for k in range(num_images):
                images[k][name] = array[k:k + 1]
    return images


def pad_ids(tensors: dict[str, np.ndarray], length: int) -> list[int]:
    """`length` ids from IMAGE_PAD_BASE up, 30 bits each, cycling through a 256-bit hash of the image's tensors."""
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    words = np.frombuffer(digest.digest(), dtype="<u4") & ((1 << 30) - 1)
    return [IMAGE_PAD_BASE + int(words[j % len(words)]) for j in range(length)]


def parse_mm_limit(value: str) -> dict[str, int]:
    """--limit-mm-per-prompt (vLLM's flag, validated by runtime.server_args): JSON like {"image": 8}."""
    return {"image": 8, **json.loads(value)}
