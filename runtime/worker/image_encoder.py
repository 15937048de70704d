"""ImageEncoder: the images of each request-table row, encoded by the model's vision tower when a step needs them.

A row's images come with its NewRow (runtime.messages.ImageItem): where their tokens sit in the prompt and the
processor's tensors in a shared-memory arena, by handle. A step that computes any position of an image span encodes
that image (all images the step needs in one batch, `model.encode_images`), keeps its embeddings until a step has
passed the span's end, and overwrites the span's positions in the step's input embeddings. A chunk may therefore start
or end inside an image (chunked prefill, or a radix-cache hit that ends there): each chunk takes its slice of the
image's embeddings, so no split breaks an image. The arena blocks are only read here; the scheduler releases them
once the request has finished (it alone knows when no later admission can need them again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.messages import IMAGE_PAD_BASE, ArenaTensor, BatchPlan, ImageItem
from shm.arena import Arena


@dataclass
class _NeededImage:
    plan_index: int
    row: int
    index: int  # the image's index among its row's images
    item: ImageItem


class ImageEncoder:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.rows: dict[int, list[ImageItem]] = {}
        self.embeddings: dict[tuple[int, int], torch.Tensor] = {}  # (row, image index) -> [length, hidden]
        self.arenas: dict[str, Arena] = {}

    def add_row(self, row: int, images: list[ImageItem]) -> None:
        self.free_row(row)
        if images:
            if not hasattr(self.model, "encode_images"):
                raise ValueError(f"a request with images reached {type(self.model).__name__}, which has no vision "
                                 "tower")
            self.rows[row] = list(images)

    def free_row(self, row: int) -> None:
        if self.rows.pop(row, None) is not None:
            for key in [key for key in self.embeddings if key[0] == row]:
                del self.embeddings[key]

    def needs(self, plan: BatchPlan) -> bool:
        """Whether the step computes any image position."""
        return bool(self.rows) and bool(self._needed(plan))

    def input_embeds(self, plan: BatchPlan, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings [T, hidden] with its image positions filled, or None when it has none."""
        needed = self._needed(plan) if self.rows else []
        if not needed:
            return None
        missing = [n for n in needed if (n.row, n.index) not in self.embeddings]
        if missing:
            encoded = self.model.encode_images([self._tensors(n.item) for n in missing])
            for n, embedding in zip(missing, encoded):
                if embedding.shape[0] != n.item.length:
                    raise ValueError(f"image {n.index} of row {n.row}: the vision tower made {embedding.shape[0]} "
                                     f"embeddings for {n.item.length} image tokens")
                self.embeddings[(n.row, n.index)] = embedding
        text_ids = torch.where(input_ids >= IMAGE_PAD_BASE, 0, input_ids)
        embeds = self.model.model.embed_tokens(text_ids)
        starts = _running_sum(plan.extend_lens)
        for n in needed:
            lo = plan.prefix_lens[n.plan_index]
            hi = lo + plan.extend_lens[n.plan_index]
            end = n.item.offset + n.item.length
            first, last = max(lo, n.item.offset), min(hi, end)
            at = starts[n.plan_index] + first - lo
            embedding = self.embeddings[(n.row, n.index)]
            embeds[at:at + last - first] = embedding[first - n.item.offset:last - n.item.offset].to(embeds.dtype)
            if hi >= end:
                del self.embeddings[(n.row, n.index)]
        return embeds

    def _needed(self, plan: BatchPlan) -> list[_NeededImage]:
        needed = []
        for i, row in enumerate(plan.rows):
            lo = plan.prefix_lens[i]
            hi = lo + plan.extend_lens[i]
            for k, item in enumerate(self.rows.get(row, ())):
                if item.offset < hi and item.offset + item.length > lo:
                    needed.append(_NeededImage(i, row, k, item))
        return needed

    def _tensors(self, item: ImageItem) -> dict[str, torch.Tensor]:
        return {name: self._read(tensor) for name, tensor in item.tensors.items()}

    def _read(self, tensor: ArenaTensor) -> torch.Tensor:
        """A device copy of the arena bytes (the block may be reused once the request finishes)."""
        arena = self.arenas.get(tensor.arena)
        if arena is None:
            arena = self.arenas[tensor.arena] = Arena.attach(tensor.arena)
        view = arena.view(tensor.block)
        try:
            host = torch.frombuffer(view, dtype=getattr(torch, tensor.dtype))
            out = host.reshape(tensor.shape).to(self.device, copy=True)
            del host
        finally:
            view.release()
        return out

    def close(self) -> None:
        for arena in self.arenas.values():
            arena.close()
        self.arenas.clear()


def _running_sum(lengths: list[int]) -> list[int]:
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    return starts
