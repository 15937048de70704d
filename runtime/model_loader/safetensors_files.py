"""HF checkpoint folders: one or several *.safetensors files (sharded ones listed by
model.safetensors.index.json)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm


def safetensors_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        missing = [path for path in files if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"model.safetensors.index.json names missing files: {', '.join(missing)}")
        return files
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    progress = tqdm(total=len(files), desc="Loading safetensors shards", unit="file")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        progress.update(1)
    progress.close()
