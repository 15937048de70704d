"""ImageEncoder: the images of each request-table row, encoded by the model's vision tower when a step needs them.

A row's images come with its NewRow (runtime.messages.ImageItem): where their tokens sit in the prompt and the
processor's tensors in a shared-memory arena, by handle. A step that computes any position of an image span encodes
that image (all images the step needs in one batch, `model.encode_images`), keeps its embeddings until a step has
passed the span's end, and overwrites the span's positions in the step's input embeddings. A chunk may therefore start
or end inside an image (chunked prefill, or a radix-cache hit that ends there): each chunk takes its slice of the
image's embeddings, so no split breaks an image. The arena blocks are only read here; the scheduler releases them
once the request has finished (it alone knows when no later admission can need them again).

M-RoPE models (Qwen2-VL: `model.image_rope`) also get every step's three position ids for the rows that hold images
(`rope_positions`): inside an image its grid ids from where it starts, elsewhere the position moved on by what the
images before it changed (their extent minus their token count), decode steps included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.messages import IMAGE_PAD_BASE, ArenaTensor, BatchPlan, ImageItem
from shm.arena import Arena


@dataclass
class _RopeSpan:
    offset: int
    length: int
    grid: np.ndarray  # [3, length] ids relative to the image's start
    extent: int  # the positions after the image continue from its start + extent


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
        self.rope_rows: dict[int, list[_RopeSpan]] = {}  # M-RoPE models: the rows' image spans

    def add_row(self, row: int, images: list[ImageItem]) -> None:
        self.free_row(row)
        if images:
            if not hasattr(self.model, "encode_images"):
                raise ValueError(f"a request with images reached {type(self.model).__name__}, which has no vision "
                                 "tower")
            self.rows[row] = list(images)
            if hasattr(self.model, "image_rope"):
                spans = []
                for item in sorted(images, key=lambda i: i.offset):
                    grid, extent = self.model.image_rope({name: self._read_host(t) for name, t in item.tensors.items()
                                                          if name != "pixel_values"})
                    spans.append(_RopeSpan(item.offset, item.length, grid, extent))
                self.rope_rows[row] = spans

    def free_row(self, row: int) -> None:
        self.rope_rows.pop(row, None)
        if self.rows.pop(row, None) is not None:
            for key in [key for key in self.embeddings if key[0] == row]:
                del self.embeddings[key]

    def needs(self, plan: BatchPlan) -> bool:
        """Whether the step computes any image position, or needs M-RoPE ids."""
        if self.rope_rows and any(row in self.rope_rows for row in plan.rows):
            return True
        return bool(self.rows) and bool(self._needed(plan))

    def rope_positions(self, plan: BatchPlan) -> torch.Tensor | None:
        """[3, T] M-RoPE ids of the step, or None when none of its rows holds images (the ids are then equal)."""
        if not self.rope_rows or not any(row in self.rope_rows for row in plan.rows):
            return None
        parts = []
        for row, prefix, extend in zip(plan.rows, plan.prefix_lens, plan.extend_lens):
            positions = np.arange(prefix, prefix + extend)
            ids = np.broadcast_to(positions, (3, extend)).copy()
            shift = 0  # how far the images before a position moved it
            for span in self.rope_rows.get(row, ()):
                start = span.offset + shift  # the image's first id
                end = span.offset + span.length
                inside = (positions >= span.offset) & (positions < end)
                if inside.any():
                    ids[:, inside] = start + span.grid[:, positions[inside] - span.offset]
                shift += span.extent - span.length
                after = positions >= end
                ids[:, after] += span.extent - span.length
            parts.append(ids)
        return torch.from_numpy(np.concatenate(parts, axis=1)).to(self.device, non_blocking=True)

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

    def _read_host(self, tensor: ArenaTensor) -> np.ndarray:
        arena = self.arenas.get(tensor.arena)
        if arena is None:
            arena = self.arenas[tensor.arena] = Arena.attach(tensor.arena)
        view = arena.view(tensor.block)
        try:
            return np.frombuffer(view, dtype=tensor.dtype).reshape(tensor.shape).copy()
        finally:
            view.release()

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
