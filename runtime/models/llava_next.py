"""LLaVA-NeXT / LLaVA 1.6 (LlavaNextForConditionalGeneration): LLaVA 1.5's tower, projector and language model with
"anyres" images: the processor cuts an image into tiles of the tower's input size on the best grid of
`image_grid_pinpoints` plus one downscaled base tile; every tile is encoded, the grid's features are stitched back
into one feature map, the padding the processor added is cut off (unpad), and a learned `image_newline` embedding
ends each row. An image's token count therefore depends on its size (the ingress asks the processor for it).

Each image arrives as pixel_values [1, max tiles, 3, H, W] (padded to the longest image of its request) and
image_sizes [1, 2] (its height and width): the real tile count comes from the size, so the padding tiles are never
encoded. Tiles of all images of a step run through the tower as one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.model_loader.weight_map import WeightTarget
from runtime.models.llava import LlavaForConditionalGeneration


def unpad(features: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] feature map of a letterboxed image -> the part that covers the image (height, width) itself."""
    original_height, original_width = original_size
    height, width = features.shape[1:]
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return features[:, padding:height - padding, :]
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return features[:, :, padding:width - padding]


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config, max_positions, tp, dtype, device):
        super().__init__(config, max_positions, tp, dtype, device)
        full = config.hf["vision_language"]
        self.grid_pinpoints = [list(p) for p in full["image_grid_pinpoints"]]
        self.tile_size = int(full["vision_config"]["image_size"])
        self.tile_tokens_side = self.tile_size // int(full["vision_config"]["patch_size"])
        with device:
            self.image_newline = nn.Parameter(torch.empty(config.hidden_size, dtype=dtype))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Tiles down and across of an image of (height, width)."""
        # Imported here: the module pulls in transformers' modeling code, seconds of start-up for every text model.
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution(list(image_size), self.grid_pinpoints)
        return height // self.tile_size, width // self.tile_size

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        sizes = [tuple(int(v) for v in image["image_sizes"].reshape(2).tolist()) for image in images]
        counts = [1 + rows * cols for rows, cols in map(self.grid, sizes)]
        tiles = torch.cat([image["pixel_values"].reshape(-1, *image["pixel_values"].shape[-3:])[:count]
                           for image, count in zip(images, counts)])
        features = self.image_features(tiles.to(self.dtype)).split(counts)
        return [self.pack(feature, size) for feature, size in zip(features, sizes)]

    def pack(self, tiles: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[tiles, tokens per tile, hidden] -> [the image's tokens, hidden]: base tile, then the unpadded grid with
        a newline after each row (transformers' order: tile rows, token rows, tile columns, token columns)."""
        base = tiles[0]
        if tiles.shape[0] == 1:
            return torch.cat([base, self.image_newline[None]])
        rows, cols = self.grid(image_size)
        side = self.tile_tokens_side
        grid = tiles[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = self.shrink(unpad(grid, image_size))
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        return torch.cat([base, torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)])

    def shrink(self, grid: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT keeps the whole unpadded map (OneVision caps it)."""
        return grid

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if name.removeprefix("model.") == "image_newline":
            return [WeightTarget("image_newline", tensor)]
        return super().weight_targets(name, tensor)
